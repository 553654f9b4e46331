"""One function a figure. Each returns the matplotlib Figure; :func:`save` writes it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from adjustText import adjust_text
from matplotlib.lines import Line2D

sns.set_theme(style="whitegrid", context="notebook")

METRICS = ("id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1")
LABEL_GID = "point-label"  # gid of the texts that name points (tests find them by it)


def _palette(n: int) -> list:
    """seaborn's rule for hue colours: the current palette, or husl when it has too few."""
    return sns.color_palette(None if n <= len(sns.color_palette()) else "husl", max(n, 1))


def _error_bars(ax: plt.Axes, x, y, err, **style) -> None:
    """Vertical ±``err`` bars at (x, y); points whose error is NaN (one seed) get none."""
    x, y, err = (np.asarray(v, dtype=float) for v in (x, y, err))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(err)
    if ok.any():
        ax.errorbar(x[ok], y[ok], yerr=err[ok], fmt="none", **{"ecolor": "0.2", "elinewidth": 0.9, "capsize": 2.5,
                                                               "zorder": 3, **style})


def _std_of(table: pd.DataFrame, metric: str) -> np.ndarray:
    """``<metric>_std`` of each row, NaN where the column is absent."""
    column = f"{metric}_std"
    return table[column].to_numpy(dtype=float) if column in table else np.full(len(table), np.nan)


def _mean_std(table: pd.DataFrame, id_column: str, metrics) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per id, in the order ids first appear: the mean of each metric and its spread, taken from
    ``<metric>_std`` where the table has it, else the std over the id's rows (NaN for one row)."""
    grouped = table.groupby(id_column, sort=False)
    means = grouped[list(metrics)].mean()
    stds = pd.DataFrame({m: grouped[f"{m}_std"].first() if f"{m}_std" in table else grouped[m].std(ddof=1)
                         for m in metrics}, index=means.index)
    return means, stds


def _grouped_bars(ax: plt.Axes, table: pd.DataFrame, id_column: str, metrics) -> None:
    """One group of bars per metric, one bar per id, mean ± std error bars."""
    metrics = [m for m in metrics if m in table]
    means, stds = _mean_std(table, id_column, metrics)
    width = 0.8 / max(len(means), 1)
    x = np.arange(len(metrics), dtype=float)
    for i, (colour, (name, mean)) in enumerate(zip(_palette(len(means)), means.iterrows())):
        pos = x - 0.4 + width * (i + 0.5)
        shown = mean.notna().to_numpy()
        ax.bar(pos[shown], mean.to_numpy()[shown], width, color=colour, label=str(name))
        _error_bars(ax, pos, mean.to_numpy(), stds.loc[name].to_numpy())
    ax.set_xticks(x, metrics)
    ax.set_xlim(-0.5, len(metrics) - 0.5)


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


def _label_points(ax: plt.Axes, xs, ys, labels, fontsize: float = 7) -> list:
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


def save(fig: plt.Figure, folder: Path | str, name: str) -> Path:
    """Write ``name.png`` into ``folder`` (made if missing) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def data_counts(counts: pd.DataFrame) -> plt.Figure:
    """Official utterances and composed examples per locale and partition."""
    long = counts.melt(id_vars=["locale", "partition"], value_vars=["utterances", "composed_examples"],
                       var_name="kind", value_name="count")
    grid = sns.catplot(data=long, x="locale", y="count", hue="partition", col="kind", kind="bar",
                       height=3.5, aspect=1.4)
    grid.set_titles("{col_name}")
    grid.figure.suptitle("Examples per locale and partition", y=1.03)
    return grid.figure


def label_frequencies(freqs: dict[str, pd.Series], top: int = 30) -> plt.Figure:
    """Bar charts of intent (top N), scenario and slot-type frequencies."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 7), gridspec_kw={"width_ratios": [1.2, 0.8, 1.0]})
    for ax, (name, series) in zip(axes, freqs.items()):
        shown = series.head(top)
        sns.barplot(x=shown.values, y=shown.index, ax=ax, color="C0")
        ax.set_title(f"{name} ({len(series)} labels{', top ' + str(top) if len(series) > top else ''})")
        ax.set_xlabel("training utterances" if name != "slot" else "slot spans")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def lengths(df: pd.DataFrame) -> plt.Figure:
    """Distribution of words and subwords per example, by locale, single vs composed."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=False)
    for ax, column in zip(axes, ["n_words", "n_subwords"]):
        sns.boxplot(data=df, x="locale", y=column, hue="split", ax=ax, fliersize=1)
        ax.set_title(column.replace("n_", "") + " per example")
    fig.tight_layout()
    return fig


def parts_per_example(df: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.countplot(data=df[df["split"] == "train"], x="n_parts", hue="locale", ax=ax)
    ax.set_title("Utterances joined per composed training example")
    return fig


def learning_curves(histories: dict[str, list[dict]]) -> plt.Figure:
    """Training loss per logging step and dev loss per epoch, one colour a model."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, history) in enumerate(histories.items()):
        train = pd.DataFrame([h for h in history if "loss" in h])
        dev = pd.DataFrame([h for h in history if "eval_loss" in h])
        if not train.empty:
            ax.plot(train["epoch"], train["loss"], color=f"C{i}", alpha=0.5, label=f"{name} train")
        if not dev.empty:
            ax.plot(dev["epoch"], dev["eval_loss"], "o-", color=f"C{i}", label=f"{name} dev")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (weighted sum of task losses)")
    ax.legend(fontsize=8)
    ax.set_title("Learning curves")
    return fig


def metrics_by_locale(df: pd.DataFrame, title: str, columns=None) -> plt.Figure:
    """Heatmap: locales (and 'all') against metrics."""
    columns = columns or [c for c in ["id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"] if c in df]
    table = df.set_index("locale")[columns]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.45 * len(table) + 1.5))
    sns.heatmap(table, annot=True, fmt=".3f", cmap="viridis", vmin=0, vmax=1, ax=ax, cbar=False)
    ax.set_title(title)
    ax.set_ylabel("")
    return fig


def ours_vs_paper(ours: pd.DataFrame, paper: pd.DataFrame, id_column: str, columns, title: str) -> plt.Figure:
    """Grouped bars of each metric, ours beside the paper's, per model."""
    long = pd.concat([
        ours.melt(id_vars=[id_column], value_vars=columns).assign(source="ours"),
        paper.melt(id_vars=[id_column], value_vars=columns).assign(source="paper"),
    ]).dropna()
    grid = sns.catplot(data=long, x="variable", y="value", hue="source", col=id_column, kind="bar",
                       height=3.3, aspect=1.3)
    grid.set_axis_labels("", "")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(title, y=1.04)
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", rotation=45)
        ax.set_ylim(0, 1)
    return grid.figure


def fusion_weights(weights: pd.DataFrame) -> plt.Figure:
    """Average attention weight of each teacher, per task and locale."""
    grid = sns.catplot(data=weights, x="locale", y="weight", hue="teacher", col="task", kind="bar",
                       height=3.3, aspect=1.2)
    grid.set_titles("{col_name}")
    grid.figure.suptitle("What fusion learned: mean weight of each teacher on the test set", y=1.04)
    for ax in grid.axes.flat:
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.tick_params(axis="x", rotation=45)
    return grid.figure


def models_by_task(table: pd.DataFrame, id_column: str | None = None, title: str = "") -> plt.Figure:
    """Grouped bars: each metric, one bar per model (mean ± std over training seeds where the
    table has ``<metric>_std``). ``id_column``: ``variant`` if the table has it, else ``model``."""
    id_column = id_column or ("variant" if "variant" in table else "model")
    fig, ax = plt.subplots(figsize=(10, 4))
    _grouped_bars(ax, table, id_column, METRICS)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=3)
    return fig


def calibration_sweep(sweep: pd.DataFrame, reference: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy of static PTQ against the number of calibration batches, per model;
    dashed lines: the fp32 model's value."""
    metrics = ["id_acc", "dc_acc", "sf_f1"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharex=True)
    for ax, metric in zip(axes, metrics):
        sns.lineplot(data=sweep, x="n_batches", y=metric, hue="model", marker="o", ax=ax)
        if reference is not None:
            for i, (name, row) in enumerate(reference.set_index("model").iterrows()):
                ax.axhline(row[metric], color=f"C{i}", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.axvline(75, color="grey", lw=0.6, ls=":")
        ax.set_title(metric)
    fig.suptitle("Static PTQ: calibration batches (dotted: the paper's plateau at 75; dashed: fp32)", y=1.02)
    fig.tight_layout()
    return fig


def policy_heatmap(tables: dict[str, pd.DataFrame]) -> plt.Figure:
    """Frozen bits per component (rows) and layer (columns), one panel per policy."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.6), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        sns.heatmap(table.astype(float), annot=True, fmt=".0f", cmap="viridis", vmin=4, vmax=16, cbar=False,
                    ax=ax, linewidths=0.5)
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def search_history(histories: dict[str, pd.DataFrame]) -> plt.Figure:
    """Expected bits of each group over the search steps, one panel per λ."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.4), sharey=True, squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items()):
        for column in [c for c in history.columns if c.startswith("bits:")]:
            ax.plot(history["step"], history[column], label=column[5:], lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("expected bits")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def pareto(points: pd.DataFrame, metrics=("id_acc", "sf_f1")) -> plt.Figure:
    """Artifact size against accuracy: ``points`` has ``model`` (fp32 source), ``kind``
    (λ sweep, uniform, sensitivity, dynamic int8, fp32), ``label`` and ``size_mb`` + metrics
    (optional ``<metric>_std``: error bars over training seeds)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.4), squeeze=False)
    markers = {"λ sweep": "o", "uniform": "s", "sensitivity": "D", "dynamic int8": "^", "static int8": "v",
               "fp32": "*", "selected": "P"}
    for ax, metric in zip(axes[0], metrics):
        sns.scatterplot(data=points, x="size_mb", y=metric, hue="model", style="kind", markers=markers, s=90,
                        ax=ax)
        _error_bars(ax, points["size_mb"], points[metric], _std_of(points, metric))
        for model, part in points[points.kind == "λ sweep"].sort_values("size_mb").groupby("model"):
            ax.plot(part.size_mb, part[metric], lw=0.8, alpha=0.5, color="grey")
        ax.set_xlabel("artifact size on disk (MB)")
        ax.set_title(metric)
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    for ax, metric in zip(axes[0], metrics):
        _label_points(ax, points["size_mb"], points[metric], points["label"], fontsize=6)
    return fig


def size_vs_accuracy(table: pd.DataFrame, metrics=("id_acc", "dc_acc", "sf_f1")) -> plt.Figure:
    """Fig. 4: artifact size against accuracy, one panel per metric, one point per variant
    (error bars: ± std over training seeds, where the table has ``<metric>_std``)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.scatterplot(data=table, x="size_mb", y=metric, hue="variant", s=80, ax=ax, legend=ax is axes[0][-1])
        _error_bars(ax, table["size_mb"], table[metric], _std_of(table, metric))
        ax.set_xlabel("size on disk (MB)")
        ax.set_title(metric)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    for ax, metric in zip(axes[0], metrics):
        _label_points(ax, table["size_mb"], table[metric], table["variant"], fontsize=6)
    return fig


def accuracy_by_task(table: pd.DataFrame, metrics=("id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1")
                     ) -> plt.Figure:
    """Fig. 5: every metric for every variant, mean ± std over training seeds."""
    fig, ax = plt.subplots(figsize=(13, 4.2))
    _grouped_bars(ax, table, "variant", metrics)
    ax.set_xlabel("metric")
    ax.set_ylabel("score")
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy by task (composed test set; error bars: ± std over training seeds)")
    fig.tight_layout()
    return fig


def efficiency(table: pd.DataFrame, colour: str = "id_acc") -> plt.Figure:
    """Fig. 6: inference time against size, accuracy as colour, latency p50 as marker size."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = ax.scatter(table["size_mb"], table["inference_s"], c=table[colour], s=40 + 20 * table["latency_p50_ms"],
                        cmap="viridis", edgecolor="k")
    fig.colorbar(points, ax=ax, label=colour)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("inference over the composed test set (s)")
    ax.set_title("Efficiency: time against size (marker area ~ latency p50)")
    fig.tight_layout()
    _label_points(ax, table["size_mb"], table["inference_s"], table["variant"], fontsize=7)
    return fig


def _cell(mean: float, std: float, fmt: str) -> str:
    if pd.isna(mean):
        return ""
    return format(mean, fmt) + ("" if pd.isna(std) else "\n±" + format(std, fmt))


def variants_by_locale(table: pd.DataFrame, metrics=("id_acc", "dc_acc", "sf_f1"), fmt: str = ".3f") -> plt.Figure:
    """Heatmaps of variant × locale, one panel per metric (``table``: variant, locale, metrics;
    where it has ``<metric>_std``, each cell reads "mean ±std" on two lines, coloured by the mean)."""
    spread = any(f"{m}_std" in table for m in metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics),
                                                       (0.7 if spread else 0.42) * table.variant.nunique() + 1.8),
                             squeeze=False)
    order = list(dict.fromkeys(table.variant))
    for ax, metric in zip(axes[0], metrics):
        grid = table.pivot(index="variant", columns="locale", values=metric).reindex(order)
        annot, cell_fmt = True, fmt
        if f"{metric}_std" in table:
            std = table.pivot(index="variant", columns="locale", values=f"{metric}_std").reindex(
                index=grid.index, columns=grid.columns)
            annot = np.array([[_cell(m, s, fmt) for m, s in zip(means, stds)]
                              for means, stds in zip(grid.to_numpy(), std.to_numpy())], dtype=object)
            cell_fmt = ""
        sns.heatmap(grid, annot=annot, fmt=cell_fmt, cmap="viridis", ax=ax, cbar=False, annot_kws={"fontsize": 7})
        ax.set_title(metric)
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def task_drops(drop: pd.DataFrame) -> plt.Figure:
    """Change of each metric (points) from the fp32 model to each quantized variant."""
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.barplot(data=drop, x="metric", y="delta", hue="variant", ax=ax)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("change vs fp32 (points)")
    ax.set_title("What quantization costs each task")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def by_length(table: pd.DataFrame, metrics=("id_acc", "dc_acc", "sf_f1")) -> plt.Figure:
    """Metrics by utterance length (words) and by parts joined, one line per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, grouping in zip(axes, ["words", "n_parts"]):
        part = table[table.grouping == grouping].melt(id_vars=["variant", "group"], value_vars=list(metrics),
                                                      var_name="metric", value_name="score")
        sns.lineplot(data=part, x="group", y="score", hue="metric", style="variant", marker="o", ax=ax)
        ax.set_title(f"by {grouping}")
        ax.set_xlabel(grouping)
        ax.tick_params(axis="x", rotation=30)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    axes[0].get_legend().remove()
    fig.tight_layout()
    return fig


def paper_scale(table: pd.DataFrame) -> plt.Figure:
    """Notebook 11: time of a batch of 32 against size on disk at XLM-R-base's shape, one point
    per variant, named in the legend (points of one size sit on one vertical line, so labels
    beside them would overlap); dashed lines at the issue's bars (0.40x fp32 size, 0.5x fp32 time)."""
    markers = {"torch float": "o", "torch.ao": "s", "paper path": "v", "fast path": "^", "ONNX Runtime": "D"}
    shown = table.dropna(subset=["size_mb", "time_b32_s"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colours = sns.color_palette("tab20", n_colors=max(len(shown), 1))
    for i, row in shown.iterrows():
        label = f"{row['variant']} ({row['size_vs_fp32']:.2f}x, {row['time_b32_vs_fp32']:.2f}x)"
        ax.scatter(row["size_mb"], row["time_b32_s"], marker=markers.get(row["path"], "o"), s=70, color=colours[i],
                   edgecolor="k", label=label)
    fp32 = table.set_index("variant").loc["fp32"] if "fp32" in set(table["variant"]) else None
    if fp32 is not None and pd.notna(fp32["size_mb"]) and pd.notna(fp32["time_b32_s"]):
        ax.axvline(0.40 * fp32["size_mb"], color="grey", ls="--", lw=1)
        ax.axhline(0.5 * fp32["time_b32_s"], color="grey", ls="--", lw=1)
        ax.annotate("bars: 0.40x fp32 size, 0.5x fp32 time", (0.40 * fp32["size_mb"], 0.5 * fp32["time_b32_s"]),
                    xytext=(4, 4), textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("seconds per batch of 32")
    ax.set_title("At XLM-R-base's shape: time against size (legend: size, time vs fp32)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="variant", title_fontsize=8)
    fig.tight_layout()
    return fig
