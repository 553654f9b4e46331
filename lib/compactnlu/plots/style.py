"""What every figure shares: the theme, error bars, grouped bars and :func:`save`."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import provenance

sns.set_theme(style="whitegrid", context="notebook")

METRICS = ("id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1")
LABEL_GID = "point-label"  # gid of the texts that name points (tests find them by it)


def _palette(n: int) -> list:
    """seaborn's rule for hue colours: the current palette, or husl when it has too few."""
    return sns.color_palette(None if n <= len(sns.color_palette()) else "husl", max(n, 1))


def error_bars(ax: plt.Axes, x, y, err, **style) -> None:
    """Vertical ±``err`` bars at (x, y); points whose error is NaN (one seed) get none."""
    x, y, err = (np.asarray(v, dtype=float) for v in (x, y, err))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(err)
    if ok.any():
        ax.errorbar(x[ok], y[ok], yerr=err[ok], fmt="none", **{"ecolor": "0.2", "elinewidth": 0.9, "capsize": 2.5,
                                                               "zorder": 3, **style})


def std_of(table: pd.DataFrame, metric: str) -> np.ndarray:
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


def grouped_bars(ax: plt.Axes, table: pd.DataFrame, id_column: str, metrics) -> None:
    """One group of bars per metric, one bar per id, mean ± std error bars."""
    metrics = [m for m in metrics if m in table]
    means, stds = _mean_std(table, id_column, metrics)
    width = 0.8 / max(len(means), 1)
    x = np.arange(len(metrics), dtype=float)
    for i, (colour, (name, mean)) in enumerate(zip(_palette(len(means)), means.iterrows())):
        pos = x - 0.4 + width * (i + 0.5)
        shown = mean.notna().to_numpy()
        ax.bar(pos[shown], mean.to_numpy()[shown], width, color=colour, label=str(name))
        error_bars(ax, pos, mean.to_numpy(), stds.loc[name].to_numpy())
    ax.set_xticks(x, metrics)
    ax.set_xlim(-0.5, len(metrics) - 0.5)


def save(fig: plt.Figure, folder: Path | str, name: str) -> Path:
    """Write ``name.png`` into ``folder`` (made if missing) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    provenance.note(path)
    return path
