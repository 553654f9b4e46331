"""Names beside scatter points that overlap neither each other nor the frame."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from adjustText import adjust_text
from matplotlib.lines import Line2D

from .style import LABEL_GID


def _overlap(a, b, pad: float) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


def _free_spot(box, placed: list, frame, pad: float) -> tuple[float, float]:
    """Smallest shift (display units) that clears ``box`` of every box in ``placed``, inside
    ``frame`` if possible."""
    steps = sorted(((i * 0.5 * box.width, j * (box.height + pad)) for i in range(-4, 5) for j in range(-12, 13)),
                   key=lambda s: np.hypot(*s))
    outside = None
    for dx, dy in steps:
        moved = box.translated(dx, dy)
        if any(_overlap(moved, other, pad) for other in placed):
            continue
        if frame.x0 <= moved.x0 and moved.x1 <= frame.x1 and frame.y0 <= moved.y0 and moved.y1 <= frame.y1:
            return dx, dy
        outside = outside or (dx, dy)
    return outside or (0.0, max(other.y1 for other in placed) + pad - box.y0)


def label_points(ax: plt.Axes, xs, ys, labels, fontsize: float = 7) -> list:
    """Name each point with a text that overlaps no other: adjustText spreads them, a last pass
    moves any that still touch, and a grey line joins a text that moved away to its point.
    Call it last: the figure's layout and the axes' limits must be final (they are frozen here)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys, labels = xs[keep], ys[keep], [str(label) for label, k in zip(labels, keep) if k]
    if not labels:
        return []
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    texts = [ax.text(x, y, label, fontsize=fontsize, gid=LABEL_GID, zorder=5) for x, y, label in zip(xs, ys, labels)]
    adjust_text(texts, x=xs, y=ys, ax=ax, iter_lim=60, expand=(1.1, 1.3), max_move=(15, 15))
    renderer = ax.figure.canvas.get_renderer()
    frame, pad = ax.get_window_extent(renderer), 1.5
    boxes = [text.get_window_extent(renderer) for text in texts]
    placed = []
    for i in sorted(range(len(texts)), key=lambda i: (boxes[i].y0, boxes[i].x0)):
        box = boxes[i]
        if any(_overlap(box, other, pad) for other in placed):
            dx, dy = _free_spot(box, placed, frame, pad)
            box = box.translated(dx, dy)
            centre = ax.transData.transform(texts[i].get_position()) + (dx, dy)
            texts[i].set_position(ax.transData.inverted().transform(centre))
        placed.append(box)
        target = ax.transData.transform((xs[i], ys[i]))
        gap = np.array([max(box.x0 - target[0], 0, target[0] - box.x1), max(box.y0 - target[1], 0, target[1] - box.y1)])
        if np.hypot(*gap) > 6:  # the text sits away from its point: a line from the box's edge to it
            centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
            d = target - centre
            s = min(box.width / 2 / abs(d[0]) if d[0] else np.inf, box.height / 2 / abs(d[1]) if d[1] else np.inf)
            (sx, sy), (tx, ty) = ax.transData.inverted().transform([centre + s * d, target])
            ax.add_line(Line2D([sx, tx], [sy, ty], lw=0.5, color="0.55", zorder=2))
    return texts
