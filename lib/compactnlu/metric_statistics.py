"""Per-example sufficient statistics of the six task metrics, and each metric from their sums.

Every corpus-level metric of :func:`compactnlu.metrics.task_metrics` is a function of
column sums of per-example statistics (:func:`example_statistics`), so a resample or a
permutation (:mod:`compactnlu.significance`) costs one matrix product instead of a metric
recomputation.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from seqeval.metrics.sequence_labeling import get_entities

from .compose import LabelSpace

# The per-example statistics each metric needs (keys of ``example_statistics``).
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "id_acc": ("n", "id_exact"),
    "id_f1": ("id_tp", "id_fp", "id_fn"),
    "dc_acc": ("n", "dc_exact"),
    "dc_f1": ("dc_tp", "dc_fp", "dc_fn"),
    "sf_acc": ("sf_word_correct", "sf_words"),
    "sf_f1": ("sf_span_correct", "sf_span_pred", "sf_span_gold"),
}


# ---------------------------------------------------------------- per-example statistics

def _multi_hot(sets: Iterable, names: tuple[str, ...]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    sets = list(sets)
    out = np.zeros((len(sets), len(names)), dtype=bool)
    for r, labels in enumerate(sets):
        out[r, [index[x] for x in labels]] = True
    return out


def _set_statistics(gold, pred, names, prefix: str) -> dict[str, np.ndarray]:
    y_true, y_pred = _multi_hot(gold, names), _multi_hot(pred, names)
    return {
        f"{prefix}_exact": (y_true == y_pred).all(1).astype(np.int32),
        f"{prefix}_tp": (y_true & y_pred).astype(np.int32),
        f"{prefix}_fp": (~y_true & y_pred).astype(np.int32),
        f"{prefix}_fn": (y_true & ~y_pred).astype(np.int32),
    }


def _tag_statistics(gold_seqs, pred_seqs) -> dict[str, np.ndarray]:
    n = len(gold_seqs)
    word_correct, words = np.zeros(n, np.int32), np.zeros(n, np.int32)
    span_correct, span_pred, span_gold = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
    for i, (gold, pred) in enumerate(zip(gold_seqs, pred_seqs)):
        gold, pred = list(gold), list(pred)
        if len(gold) != len(pred):
            # task_metrics compares the concatenated tags position by position, so a
            # length mismatch would silently shift every later example
            raise ValueError(f"example {i}: {len(gold)} gold tags but {len(pred)} predicted")
        words[i] = len(gold)
        word_correct[i] = sum(g == p for g, p in zip(gold, pred))
        # seqeval's corpus call concatenates sequences with an "O" between them, so spans
        # never cross examples and per-sequence extraction counts the same spans
        gold_spans, pred_spans = set(get_entities(gold)), set(get_entities(pred))
        span_gold[i], span_pred[i] = len(gold_spans), len(pred_spans)
        span_correct[i] = len(gold_spans & pred_spans)
    return {"sf_word_correct": word_correct, "sf_words": words, "sf_span_correct": span_correct,
            "sf_span_pred": span_pred, "sf_span_gold": span_gold}


def example_statistics(df: pd.DataFrame, labels: LabelSpace) -> dict[str, np.ndarray]:
    """Per-example sufficient statistics; every metric of ``task_metrics`` is a function of their sums.

    Keys (int arrays, first axis = example, in ``df`` order): ``n`` (ones);
    ``id_exact``/``dc_exact`` (0/1 exact-set match); ``id_tp``/``id_fp``/``id_fn`` and the
    ``dc_`` ones ([n_examples, n_labels] over ``labels.intents`` / ``labels.scenarios``);
    ``sf_word_correct``/``sf_words``; ``sf_span_correct``/``sf_span_pred``/``sf_span_gold``
    (seqeval default-mode spans: a span is correct when type, start and end match).
    A task whose prediction column is missing contributes no keys.
    """
    out: dict[str, np.ndarray] = {"n": np.ones(len(df), dtype=np.int32)}
    if "intents_pred" in df:
        out.update(_set_statistics(df.intents_gold, df.intents_pred, labels.intents, "id"))
    if "scenarios_pred" in df:
        out.update(_set_statistics(df.scenarios_gold, df.scenarios_pred, labels.scenarios, "dc"))
    if "tags_pred" in df:
        out.update(_tag_statistics(list(df.tags_gold), list(df.tags_pred)))
    return out


def has_metric(stats: dict[str, np.ndarray], metric: str) -> bool:
    return all(k in stats for k in METRIC_KEYS[metric])


# ---------------------------------------------------------------- metrics from sums

def column_sums(stats: dict[str, np.ndarray], metric: str, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Sums of the statistics ``metric`` needs, weighted per example.

    ``weights`` is None (the full sample), an [n] vector, or an [r, n] matrix of per-example
    counts (one row per resample); the sums then carry that leading axis.
    """
    keys = METRIC_KEYS[metric]
    if weights is None:
        return {k: stats[k].sum(0).astype(np.float64) for k in keys}
    w = np.asarray(weights, dtype=np.float64)
    return {k: w @ stats[k].astype(np.float64) for k in keys}


def metric_from_sums(metric: str, sums: dict[str, np.ndarray]) -> np.ndarray:
    """One metric from column sums (any leading batch shape), with task_metrics' zero-division rules."""
    if metric in ("id_acc", "dc_acc"):
        return _safe_ratio(sums[f"{metric[:2]}_exact"], sums["n"])
    if metric in ("id_f1", "dc_f1"):
        p = metric[:2]
        tp, fp, fn = sums[f"{p}_tp"], sums[f"{p}_fp"], sums[f"{p}_fn"]
        # sklearn's F1 is 2TP / (true + predicted), 0 where a label is never seen nor
        # predicted, and the macro average keeps those zeros
        denom = 2 * tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        return f1.mean(-1)
    if metric == "sf_acc":
        return _safe_ratio(sums["sf_word_correct"], sums["sf_words"])
    if metric == "sf_f1":
        # seqeval's micro route: precision and recall (0 on zero division), then 2PR/(P+R)
        tp, pred, gold = sums["sf_span_correct"], sums["sf_span_pred"], sums["sf_span_gold"]
        precision = np.where(pred > 0, tp / np.where(pred > 0, pred, 1), 0.0)
        recall = np.where(gold > 0, tp / np.where(gold > 0, gold, 1), 0.0)
        denom = precision + recall
        return 2 * precision * recall / np.where(denom == 0, 1.0, denom)
    raise KeyError(f"unknown metric {metric!r}; known: {sorted(METRIC_KEYS)}")


def metric_value(stats: dict[str, np.ndarray], metric: str, weights: np.ndarray | None = None):
    """``metric`` on the full sample (a float) or on weighted resamples (an array)."""
    value = metric_from_sums(metric, column_sums(stats, metric, weights))
    return float(value) if np.ndim(value) == 0 else value


def _safe_ratio(num, den):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
