"""Notebook 01's figures: the composed data set."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


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
