"""Notebooks 02-04's figures: training, the fp32 models' metrics, teachers and fusion."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .style import METRICS, grouped_bars


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
    grouped_bars(ax, table, id_column, METRICS)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=3)
    return fig
