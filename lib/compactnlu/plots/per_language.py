"""Notebook 09's figures: variants by locale, what quantization costs each task, length."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


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
