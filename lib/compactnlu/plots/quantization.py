"""Notebooks 05 and 07's figures: calibration, precision policies and their search."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .labels import label_points
from .style import error_bars, std_of


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
        error_bars(ax, points["size_mb"], points[metric], std_of(points, metric))
        for model, part in points[points.kind == "λ sweep"].sort_values("size_mb").groupby("model"):
            ax.plot(part.size_mb, part[metric], lw=0.8, alpha=0.5, color="grey")
        ax.set_xlabel("artifact size on disk (MB)")
        ax.set_title(metric)
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    for ax, metric in zip(axes[0], metrics):
        label_points(ax, points["size_mb"], points[metric], points["label"], fontsize=6)
    return fig
