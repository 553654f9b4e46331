"""Paired significance tests between two model variants, from saved per-example predictions.

Every corpus-level metric is a function of column sums of per-example statistics
(:mod:`compactnlu.metric_statistics`), so a resample or a permutation costs one matrix
product instead of a metric recomputation.

What each test assumes:

* ``paired_bootstrap`` and ``approximate_randomization`` treat the composed test
  *example* as the unit of resampling: the examples are taken as independent draws from
  one population. That holds only approximately: each source utterance anchors one
  composed example and may be drawn again as a partner in others (about k = 2 parts per
  example), so examples are positively correlated and the standard errors and p-values
  are somewhat optimistic. Both tests condition on one trained model per variant and say
  nothing about training-seed variance.
* ``paired_over_seeds`` pairs the two variants' corpus-level metrics by training seed: seed
  *s* of the baseline and of the student start from the same initialisation and data order,
  and a PTQ variant of seed *s* is made from that seed's fp32 model, so the seed's own
  effect cancels in the difference. It is the test of "would another training run give the
  same ordering", on the per-seed differences (a paired t-test: with 3 seeds, its normality
  assumption cannot be checked, and an exact sign-flip test could not go below p = 0.25).
* ``welch_over_seeds`` treats the seeds of the two variants as independent draws (unequal
  variances): it ignores the pairing, kept beside the paired test for comparison.
* ``holm`` adjusts the p-values of one pair's metrics for being read together.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .compose import LabelSpace
from .metric_statistics import METRIC_KEYS, example_statistics, has_metric, metric_from_sums, metric_value
from .metrics import METRIC_COLUMNS

REQUIRED_COLUMNS = ["metric", "a", "b", "a_mean", "a_std", "b_mean", "b_std", "p_value", "test"]
EXTRA_COLUMNS = ["diff", "ci_low", "ci_high", "n_a", "n_b", "resamples", "p_holm", "note"]
TABLE_COLUMNS = REQUIRED_COLUMNS + EXTRA_COLUMNS

# Resampling weights are built in chunks of about this many float64 cells (32 MB).
_CHUNK_CELLS = 4_000_000


# ---------------------------------------------------------------- resampling tests

def _n_examples(stats_a, stats_b) -> int:
    n_a, n_b = len(stats_a["n"]), len(stats_b["n"])
    if n_a != n_b:
        raise ValueError(f"paired tests need the same examples: {n_a} vs {n_b}")
    return n_a


def _stacked(stats: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, dict[str, slice]]:
    """The needed statistics side by side as one float [n, k] matrix, so one product serves them all."""
    blocks, slices, start = [], {}, 0
    for key in METRIC_KEYS[metric]:
        block = stats[key].astype(np.float64).reshape(len(stats[key]), -1)
        blocks.append(block)
        slices[key] = slice(start, start + block.shape[1])
        start += block.shape[1]
    return np.concatenate(blocks, axis=1), slices


def _unstack(sums: np.ndarray, slices: dict[str, slice], stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # 1-D statistics come back without their singleton label axis
    return {k: sums[:, s] if stats[k].ndim > 1 else sums[:, s.start] for k, s in slices.items()}


def _chunks(total: int, n: int):
    size = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, total, size):
        yield min(size, total - start)


def _bootstrap_counts(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """[m, n] counts of each example in m resamples of size n drawn with replacement."""
    idx = rng.integers(0, n, size=(m, n))
    flat = (idx + n * np.arange(m)[:, None]).ravel()
    return np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float64)


@dataclass(frozen=True)
class BootstrapResult:
    """Per-resample metric values of both variants on the same resampled examples.

    ``p_value`` inverts the percentile interval of the difference d = b - a: it is twice
    the smaller tail fraction of resampled differences on either side of zero,
    ``2 * min(1 + #(d <= 0), 1 + #(d >= 0)) / (1 + R)`` capped at 1 (the +1 keeps a
    finite number of resamples from claiming p = 0). Identical variants get p = 1.
    """

    metric: str
    a: np.ndarray  # [R] metric of variant a per resample
    b: np.ndarray
    a_full: float  # metric on the full sample
    b_full: float

    @property
    def diff(self) -> np.ndarray:
        return self.b - self.a

    @property
    def a_std(self) -> float:
        return _std(self.a)

    @property
    def b_std(self) -> float:
        return _std(self.b)

    def ci(self, which: str = "diff", level: float = 0.95) -> tuple[float, float]:
        """Percentile interval of ``a``, ``b`` or ``diff`` (b - a)."""
        values = {"a": self.a, "b": self.b, "diff": self.diff}[which]
        tail = 100 * (1 - level) / 2
        low, high = np.nanpercentile(values, [tail, 100 - tail])
        return float(low), float(high)

    @property
    def p_value(self) -> float:
        d = self.diff[~np.isnan(self.diff)]
        if len(d) == 0:
            return float("nan")
        below, above = 1 + np.sum(d <= 0), 1 + np.sum(d >= 0)
        return float(min(1.0, 2 * min(below, above) / (1 + len(d))))


def _std(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def paired_bootstrap(stats_a: dict[str, np.ndarray], stats_b: dict[str, np.ndarray], metric: str,
                     n_resamples: int = 1000, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap of ``metric``: both variants are scored on the same resampled examples.

    Each resample draws n examples with replacement; the draws depend only on ``seed``,
    n and ``n_resamples``, so every metric of one comparison sees the same resamples.
    """
    n = _n_examples(stats_a, stats_b)
    x_a, slices = _stacked(stats_a, metric)
    x_b, _ = _stacked(stats_b, metric)
    x = np.concatenate([x_a, x_b], axis=1)  # one product per chunk for both variants
    k = x_a.shape[1]
    rng = np.random.default_rng(seed)
    a_values, b_values = [], []
    for m in _chunks(n_resamples, n):
        sums = _bootstrap_counts(rng, m, n) @ x
        a_values.append(metric_from_sums(metric, _unstack(sums[:, :k], slices, stats_a)))
        b_values.append(metric_from_sums(metric, _unstack(sums[:, k:], slices, stats_b)))
    return BootstrapResult(metric, np.concatenate(a_values) if a_values else np.empty(0),
                           np.concatenate(b_values) if b_values else np.empty(0),
                           metric_value(stats_a, metric), metric_value(stats_b, metric))


@dataclass(frozen=True)
class RandomizationResult:
    """Approximate randomization: observed difference b - a and the permuted differences."""

    metric: str
    observed: float
    diffs: np.ndarray  # [n_rounds] b - a after random per-example swaps
    p_value: float


def approximate_randomization(stats_a: dict[str, np.ndarray], stats_b: dict[str, np.ndarray], metric: str,
                              n_rounds: int = 1000, seed: int = 0) -> RandomizationResult:
    """Paired permutation test: each round swaps a's and b's outputs on each example with probability 1/2.

    Under H0 (the variants are exchangeable on every example) the swapped differences
    are as likely as the observed one. ``p = (1 + #(|d_r| >= |d_obs|)) / (1 + n_rounds)``.
    """
    n = _n_examples(stats_a, stats_b)
    x_a, slices = _stacked(stats_a, metric)
    x_b, _ = _stacked(stats_b, metric)
    delta = x_b - x_a
    sum_a, sum_b = x_a.sum(0), x_b.sum(0)
    observed = float(metric_from_sums(metric, _unstack(sum_b[None], slices, stats_b))[0]
                     - metric_from_sums(metric, _unstack(sum_a[None], slices, stats_a))[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for m in _chunks(n_rounds, n):
        moved = rng.integers(0, 2, size=(m, n)).astype(np.float64) @ delta
        perm_a = metric_from_sums(metric, _unstack(sum_a + moved, slices, stats_a))
        perm_b = metric_from_sums(metric, _unstack(sum_b - moved, slices, stats_b))
        diffs.append(perm_b - perm_a)
    diffs = np.concatenate(diffs) if diffs else np.empty(0)
    # sums of integers are exact, but a metric reached by another summation order can
    # differ from the observed one in the last bit: ties must count as "as extreme"
    extreme = np.sum(np.abs(diffs) >= abs(observed) - 1e-12)
    p = float((1 + extreme) / (1 + len(diffs))) if not np.isnan(observed) else float("nan")
    return RandomizationResult(metric, observed, diffs, p)


# ---------------------------------------------------------------- over training seeds

def _constant(values: np.ndarray) -> bool:
    # Seeds that change nothing can still differ in the last bit (a macro average summed in
    # another order); t would then be huge and p spuriously 0.
    return float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def welch_over_seeds(values_a, values_b) -> dict:
    """Welch's t-test (unequal variances) of per-seed metric values of a vs b; never raises.

    Returns ``a_mean, a_std, b_mean, b_std`` (std with ddof=1), ``n_a, n_b``, ``diff``
    (b - a), ``ci_low, ci_high`` (95% Welch interval of the difference), ``p_value`` and
    ``note``. NaN values (a seed without that task) are dropped; with fewer than two
    values per side, or no variance on either side, p is NaN and ``note`` says why.
    """
    a = np.asarray(values_a, dtype=np.float64).ravel()
    b = np.asarray(values_b, dtype=np.float64).ravel()
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    out = {
        "a_mean": float(a.mean()) if len(a) else float("nan"), "a_std": _std(a),
        "b_mean": float(b.mean()) if len(b) else float("nan"), "b_std": _std(b),
        "n_a": len(a), "n_b": len(b), "p_value": float("nan"),
        "ci_low": float("nan"), "ci_high": float("nan"), "note": "",
    }
    out["diff"] = out["b_mean"] - out["a_mean"]
    if len(a) < 2 or len(b) < 2:
        out["note"] = f"fewer than 2 seeds per variant (a: {len(a)}, b: {len(b)}): no test"
        return out
    if _constant(a) and _constant(b):
        out["note"] = "no variance across seeds in either variant: t undefined"
        return out
    with warnings.catch_warnings():
        # one variant with identical values on every seed is legitimate; scipy warns about it
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        result = scipy_stats.ttest_ind(b, a, equal_var=False)
        ci = result.confidence_interval(0.95)
    out.update(p_value=float(result.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    return out


def paired_over_seeds(values_a: pd.Series, values_b: pd.Series) -> dict:
    """Paired t-test of b - a over the training seeds both have (``values_*`` indexed by seed);
    never raises. Returns :func:`welch_over_seeds`' fields, ``n_a = n_b`` the number of pairs,
    ``ci_low, ci_high`` the 95% interval of the mean difference; NaN p with a ``note`` for
    fewer than two pairs or differences that do not vary."""
    both = pd.concat({"a": pd.Series(values_a, dtype="float64"), "b": pd.Series(values_b, dtype="float64")},
                     axis=1).dropna()
    a, b = both["a"].to_numpy(), both["b"].to_numpy()
    out = {"a_mean": float(a.mean()) if len(a) else float("nan"), "a_std": _std(a),
           "b_mean": float(b.mean()) if len(b) else float("nan"), "b_std": _std(b),
           "n_a": len(a), "n_b": len(b), "p_value": float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan"), "note": ""}
    out["diff"] = out["b_mean"] - out["a_mean"]
    if len(a) < 2:
        out["note"] = f"fewer than 2 seeds in both variants ({len(a)}): no test"
        return out
    if _constant(b - a):
        out["note"] = "the per-seed differences do not vary: t undefined"
        return out
    result = scipy_stats.ttest_rel(b, a)
    ci = result.confidence_interval(0.95)
    out.update(p_value=float(result.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    return out


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN left out of the family and kept).
    statsmodels' ``multipletests(method="holm")`` computes the same; it is not a dependency of
    the study, and scipy has only Benjamini-Hochberg (``false_discovery_control``)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------- tables

def check_paired(df_a: pd.DataFrame, df_b: pd.DataFrame) -> None:
    """Raise ValueError unless both frames hold the same uids in the same order."""
    for name, df in (("a", df_a), ("b", df_b)):
        if "uid" not in df:
            raise ValueError(f"predictions {name} have no uid column")
    uids_a, uids_b = df_a["uid"].to_numpy(), df_b["uid"].to_numpy()
    common = min(len(uids_a), len(uids_b))
    differ = np.flatnonzero(uids_a[:common] != uids_b[:common])
    if len(differ):
        i = int(differ[0])
        raise ValueError(f"predictions are not paired: row {i} has uid {uids_a[i]!r} in a, {uids_b[i]!r} in b")
    if len(uids_a) != len(uids_b):
        longer, side = (uids_a, "a") if len(uids_a) > len(uids_b) else (uids_b, "b")
        raise ValueError(f"predictions are not paired: row {common} (uid {longer[common]!r}) is only in {side} "
                         f"({len(uids_a)} vs {len(uids_b)} rows)")


def _row(metric, name_a, name_b, test, **values) -> dict:
    row = {c: float("nan") for c in TABLE_COLUMNS}
    row.update(metric=metric, a=name_a, b=name_b, test=test, note="")
    row.update(values)
    return row


def compare(df_a: pd.DataFrame, df_b: pd.DataFrame, labels: LabelSpace, name_a: str, name_b: str,
            metrics=METRIC_COLUMNS, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap and approximate randomization of b vs a, per metric, on one prediction set each.

    One row per metric and test. ``a_mean``/``b_mean`` are the full-sample metrics and
    ``a_std``/``b_std`` the bootstrap standard errors (repeated on the randomization rows);
    ``diff`` is b - a on the full sample, ``ci_low``/``ci_high`` its 95% bootstrap percentile
    interval (bootstrap rows only). ``n_rounds`` of the randomization test = ``n_resamples``.
    A metric whose task either variant lacks gets NaN values and a note.
    """
    check_paired(df_a, df_b)
    stats_a, stats_b = example_statistics(df_a, labels), example_statistics(df_b, labels)
    n = len(df_a)
    rows = []
    for metric in metrics:
        common = dict(n_a=n, n_b=n, resamples=n_resamples)
        if not (has_metric(stats_a, metric) and has_metric(stats_b, metric)):
            for test in ("paired_bootstrap", "approximate_randomization"):
                rows.append(_row(metric, name_a, name_b, test, **common, note="task missing in a variant"))
            continue
        boot = paired_bootstrap(stats_a, stats_b, metric, n_resamples, seed)
        ar = approximate_randomization(stats_a, stats_b, metric, n_resamples, seed)
        means = dict(a_mean=boot.a_full, a_std=boot.a_std, b_mean=boot.b_full, b_std=boot.b_std,
                     diff=boot.b_full - boot.a_full, **common)
        low, high = boot.ci("diff")
        rows.append(_row(metric, name_a, name_b, "paired_bootstrap", **means, p_value=boot.p_value,
                         ci_low=low, ci_high=high))
        rows.append(_row(metric, name_a, name_b, "approximate_randomization", **means, p_value=ar.p_value))
    return with_holm(pd.DataFrame(rows, columns=TABLE_COLUMNS))


def seeds_table(per_seed: pd.DataFrame, name_a: str, name_b: str, metrics=METRIC_COLUMNS,
                seed_column: str = "train_seed") -> pd.DataFrame:
    """Rows in :func:`compare`'s layout from a ``variant, <seed_column>, <metrics>`` frame: the
    paired t-test over seeds (``test="paired_t"``) and Welch's (``"welch_t"``), each with
    ``p_holm`` adjusted over ``metrics``."""
    rows = []
    for metric in metrics:
        values = {}
        for side, name in (("a", name_a), ("b", name_b)):
            chosen = per_seed[per_seed["variant"] == name]
            values[side] = (chosen.set_index(seed_column)[metric] if metric in per_seed
                            else pd.Series(dtype="float64"))
        rows.append(_row(metric, name_a, name_b, "paired_t", resamples=0,
                         **paired_over_seeds(values["a"], values["b"])))
        rows.append(_row(metric, name_a, name_b, "welch_t", resamples=0,
                         **welch_over_seeds(values["a"], values["b"])))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return with_holm(table)


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``p_holm``: Holm's adjustment over the metrics of each pair and test."""
    out = table.copy()
    for _, rows in out.groupby(["a", "b", "test"], sort=False):
        out.loc[rows.index, "p_holm"] = holm(rows["p_value"])
    return out
