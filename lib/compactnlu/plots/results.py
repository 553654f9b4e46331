"""Notebooks 08 and 11's figures: every variant's size, accuracy and time."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .labels import label_points
from .style import error_bars, grouped_bars, std_of


def size_vs_accuracy(table: pd.DataFrame, metrics=("id_acc", "dc_acc", "sf_f1")) -> plt.Figure:
    """Fig. 4: artifact size against accuracy, one panel per metric, one point per variant
    (error bars: ± std over training seeds, where the table has ``<metric>_std``)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.scatterplot(data=table, x="size_mb", y=metric, hue="variant", s=80, ax=ax, legend=ax is axes[0][-1])
        error_bars(ax, table["size_mb"], table[metric], std_of(table, metric))
        ax.set_xlabel("size on disk (MB)")
        ax.set_title(metric)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    for ax, metric in zip(axes[0], metrics):
        label_points(ax, table["size_mb"], table[metric], table["variant"], fontsize=6)
    return fig


def accuracy_by_task(table: pd.DataFrame, metrics=("id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1")
                     ) -> plt.Figure:
    """Fig. 5: every metric for every variant, mean ± std over training seeds."""
    fig, ax = plt.subplots(figsize=(13, 4.2))
    grouped_bars(ax, table, "variant", metrics)
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
    label_points(ax, table["size_mb"], table["inference_s"], table["variant"], fontsize=7)
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
