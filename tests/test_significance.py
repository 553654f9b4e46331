"""``compactnlu.metric_statistics`` (sufficient statistics) against ``task_metrics``, and the behaviour of
``compactnlu.significance``'s tests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from compactnlu.compose import LabelSpace
from compactnlu.metrics import METRIC_COLUMNS, task_metrics
from compactnlu.metric_statistics import column_sums, example_statistics, metric_from_sums, metric_value
from scipy import stats as scipy_stats

from compactnlu.significance import (
    REQUIRED_COLUMNS, TABLE_COLUMNS, approximate_randomization, compare, holm, paired_bootstrap, paired_over_seeds,
    seeds_table, welch_over_seeds,
)

# i10, i11 and s5 occur only as wrong predictions, i12 and s6 nowhere: sklearn's macro-F1
# still averages over them (as zeros).
LABELS = LabelSpace(intents=tuple(f"i{k}" for k in range(13)), scenarios=tuple(f"s{k}" for k in range(7)),
                    slot_types=("date", "time", "place", "person"))


def gold_tags(rng: np.random.Generator, length: int) -> list[str]:
    tags, k = [], 0
    while k < length:
        if rng.random() < 0.3:
            kind = rng.choice(LABELS.slot_types)
            span = min(int(rng.integers(1, 4)), length - k)
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (span - 1)
            k += span
        else:
            tags.append("O")
            k += 1
    return tags


def realistic_frame(n: int, seed: int = 0, error: float = 0.3) -> pd.DataFrame:
    """Random composed-test-like predictions with the awkward cases task_metrics must handle.

    Predicted sets may be empty, lose or gain labels (including labels never in gold);
    predicted tags include broken BIO (an I- without a B-, a type change mid-span).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        intents = sorted(rng.choice(LABELS.intents[:10], size=k, replace=False).tolist())
        scenarios = sorted(rng.choice(LABELS.scenarios[:5], size=min(k, 2), replace=False).tolist())
        intents_pred, scenarios_pred = list(intents), list(scenarios)
        if rng.random() < error:
            extra = rng.choice(LABELS.intents[:12], size=int(rng.integers(0, 2)))
            intents_pred = sorted(set(intents_pred[1:]) | set(extra))
        if rng.random() < error:
            scenarios_pred = sorted(set(rng.choice(LABELS.scenarios[:6], size=int(rng.integers(0, 3)))))
        tags = gold_tags(rng, int(rng.integers(1, 16)))
        pred = list(tags)
        if rng.random() < error:
            for j in rng.choice(len(pred), size=int(rng.integers(1, len(pred) + 1)), replace=False):
                pred[j] = str(rng.choice(LABELS.tags))  # random tags give I- after O and type switches
        rows.append(dict(uid=f"u{i}", locale=("hi-IN", "ta-IN")[i % 2], n_parts=k,
                         intents_gold=intents, scenarios_gold=scenarios, tags_gold=tags,
                         intents_pred=intents_pred, scenarios_pred=scenarios_pred, tags_pred=pred))
    df = pd.DataFrame(rows)
    # make sure the awkward cases are present whatever the draw
    df.at[0, "intents_pred"], df.at[1, "scenarios_pred"] = [], []
    df.at[2, "tags_gold"], df.at[2, "tags_pred"] = ["O", "B-date", "I-date", "O"], ["I-date", "I-date", "O", "I-time"]
    return df


def perfect(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for task in ("intents", "scenarios", "tags"):
        out[f"{task}_pred"] = out[f"{task}_gold"].map(list)
    return out


def half_wrong(df: pd.DataFrame) -> pd.DataFrame:
    """Every other example wrong in every task: other labels, and every tag flipped."""
    out = perfect(df)
    flip = {"O": "B-place"}
    for i in range(0, len(out), 2):
        out.at[i, "intents_pred"] = ["i11"]
        out.at[i, "scenarios_pred"] = ["s5"]
        out.at[i, "tags_pred"] = [flip.get(t, "O") for t in out.at[i, "tags_gold"]]
    return out


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return realistic_frame(1500)


@pytest.fixture(scope="module")
def stats(frame):
    return example_statistics(frame, LABELS)


# ---------------------------------------------------------------- statistics vs task_metrics

def test_full_sample_equals_task_metrics(frame, stats):
    expected = task_metrics(frame, LABELS)
    for metric in METRIC_COLUMNS:
        assert metric_value(stats, metric) == pytest.approx(expected[metric], abs=1e-12, rel=0), metric
    # the frame is not degenerate: every metric is strictly between 0 and 1
    assert all(0 < expected[m] < 1 for m in METRIC_COLUMNS)


def test_weighted_sums_equal_task_metrics_on_a_resampled_frame(frame, stats):
    # a bootstrap resample with repeated rows, scored the slow way
    idx = np.random.default_rng(5).integers(0, len(frame), size=len(frame))
    counts = np.bincount(idx, minlength=len(frame))
    expected = task_metrics(frame.iloc[idx].reset_index(drop=True), LABELS)
    for metric in METRIC_COLUMNS:
        got = metric_from_sums(metric, column_sums(stats, metric, counts[None]))[0]
        assert got == pytest.approx(expected[metric], abs=1e-12, rel=0), metric


def test_statistics_shapes_and_missing_task(frame, stats):
    assert stats["id_tp"].shape == (len(frame), len(LABELS.intents))
    assert stats["dc_fn"].shape == (len(frame), len(LABELS.scenarios))
    assert stats["sf_words"].sum() == sum(map(len, frame.tags_gold))
    no_tags = example_statistics(frame.drop(columns="tags_pred"), LABELS)
    assert "sf_words" not in no_tags and "id_tp" in no_tags


def test_broken_bio_spans_follow_seqeval(stats):
    # row 2: gold date(1-2); predicted I-date I-date -> date(0-1), I-time -> time(3-3)
    assert (stats["sf_span_gold"][2], stats["sf_span_pred"][2], stats["sf_span_correct"][2]) == (1, 2, 0)


def test_unequal_tag_lengths_raise(frame):
    bad = frame.head(3).copy()
    bad.at[1, "tags_pred"] = bad.at[1, "tags_pred"] + ["O"]
    with pytest.raises(ValueError, match="example 1"):
        example_statistics(bad, LABELS)


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_std_shrinks_with_n():
    small = example_statistics(realistic_frame(100, seed=1, error=0.5), LABELS)
    # the same examples 16 times over: same metric, a quarter of the standard error
    large = {k: np.concatenate([v] * 16) for k, v in small.items()}
    for metric in ("id_acc", "sf_f1"):
        s = paired_bootstrap(small, small, metric, n_resamples=400, seed=0).a_std
        big = paired_bootstrap(large, large, metric, n_resamples=400, seed=0).a_std
        assert s > 0 and 0.15 * s < big < 0.4 * s, (metric, s, big)


def test_bootstrap_std_is_zero_for_perfect_predictions():
    df = perfect(realistic_frame(200, seed=2))
    st, expected = example_statistics(df, LABELS), task_metrics(df, LABELS)
    for metric in METRIC_COLUMNS:
        r = paired_bootstrap(st, st, metric, n_resamples=200, seed=0)
        # macro-F1 stays below 1: labels never seen nor predicted score 0 in sklearn
        assert r.a_full == expected[metric] and r.a_std < 1e-12 and r.b_std < 1e-12, metric


def test_identical_predictions_are_not_different(stats):
    for metric in METRIC_COLUMNS:
        boot = paired_bootstrap(stats, stats, metric, n_resamples=300, seed=0)
        low, high = boot.ci("diff")
        assert low <= 0 <= high and boot.p_value == 1.0, metric
        assert boot.a_std > 0, metric  # the resamples did vary
        assert approximate_randomization(stats, stats, metric, n_rounds=300, seed=0).p_value == 1.0, metric


def test_resamples_are_paired(stats):
    # same stats on both sides must give the same value in every resample, not just on average
    boot = paired_bootstrap(stats, stats, "id_f1", n_resamples=100, seed=3)
    np.testing.assert_array_equal(boot.a, boot.b)


def test_seeds_reproduce_and_differ(stats):
    other = example_statistics(realistic_frame(1500, seed=9), LABELS)
    one = paired_bootstrap(stats, other, "sf_f1", n_resamples=200, seed=7)
    again = paired_bootstrap(stats, other, "sf_f1", n_resamples=200, seed=7)
    different = paired_bootstrap(stats, other, "sf_f1", n_resamples=200, seed=8)
    np.testing.assert_array_equal(one.a, again.a)
    np.testing.assert_array_equal(one.b, again.b)
    assert not np.array_equal(one.a, different.a)
    ar = [approximate_randomization(stats, other, "id_acc", n_rounds=200, seed=s).diffs for s in (7, 7, 8)]
    np.testing.assert_array_equal(ar[0], ar[1])
    assert not np.array_equal(ar[0], ar[2])


# ---------------------------------------------------------------- clearly better b

def test_clearly_better_b_is_significant_under_both_tests():
    gold = realistic_frame(400, seed=4)
    table = compare(half_wrong(gold), perfect(gold), LABELS, "base", "kd", n_resamples=1000, seed=0)
    assert list(table.columns[:len(REQUIRED_COLUMNS)]) == REQUIRED_COLUMNS
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == 2 * len(METRIC_COLUMNS)
    assert set(table.test) == {"paired_bootstrap", "approximate_randomization"}
    assert (table.p_value < 0.01).all(), table[["metric", "test", "p_value"]]
    best = task_metrics(perfect(gold), LABELS)
    assert (table.b_mean == table.metric.map(best)).all() and (table.a_mean < table.b_mean - 0.1).all()
    # no resample or permutation reaches the other side: the smallest p each method can give
    assert (table[table.test == "approximate_randomization"].p_value == 1 / 1001).all()
    assert (table[table.test == "paired_bootstrap"].p_value == 2 / 1001).all()
    boot = table[table.test == "paired_bootstrap"]
    assert (boot.ci_low > 0).all() and np.allclose(boot["diff"], boot.b_mean - boot.a_mean)
    # and the same comparison the other way round stays significant, with the sign flipped
    reverse = compare(perfect(gold), half_wrong(gold), LABELS, "kd", "base", metrics=["id_acc"], n_resamples=300)
    assert (reverse.p_value < 0.01).all() and (reverse["diff"] < 0).all()


def test_compare_matches_task_metrics_and_handles_a_missing_task(frame):
    other = realistic_frame(1500, seed=11)
    other["uid"] = frame["uid"]
    table = compare(frame, other.drop(columns="tags_pred"), LABELS, "a", "b", n_resamples=50)
    full = table[table.test == "paired_bootstrap"].set_index("metric")
    expected = task_metrics(frame, LABELS)
    for metric in ("id_acc", "id_f1", "dc_acc", "dc_f1"):
        assert full.at[metric, "a_mean"] == pytest.approx(expected[metric], abs=1e-12)
    assert math.isnan(full.at["sf_f1", "p_value"]) and "missing" in full.at["sf_f1", "note"]


def test_mismatched_uids_raise(frame):
    a = frame.head(20)
    b = a.copy()
    b.loc[7, "uid"] = "elsewhere"
    with pytest.raises(ValueError, match=r"row 7 .*'u7'.*'elsewhere'"):
        compare(a, b, LABELS, "a", "b", n_resamples=10)
    with pytest.raises(ValueError, match="row 19"):
        compare(a, a.head(19), LABELS, "a", "b", n_resamples=10)


# ---------------------------------------------------------------- over seeds

def test_welch_with_one_seed_returns_nan():
    out = welch_over_seeds([0.8], [0.9, 0.91])
    assert math.isnan(out["p_value"]) and "fewer than 2" in out["note"]
    assert out["a_mean"] == 0.8 and math.isnan(out["a_std"])


def test_welch_matches_scipy_and_detects_a_gap():
    a, b = [0.80, 0.81, 0.79, 0.80], [0.90, 0.91, 0.89, 0.905]
    out = welch_over_seeds(a, b)
    assert out["p_value"] < 1e-4 and out["ci_low"] > 0
    assert out["a_std"] == pytest.approx(np.std(a, ddof=1))
    assert welch_over_seeds(a, a)["p_value"] == pytest.approx(1.0)
    assert math.isnan(welch_over_seeds([0.5, 0.5], [0.5, 0.5])["p_value"])
    # identical up to the last bit (a macro average summed in another order) is still no variance
    last_bit = welch_over_seeds([0.7048, 0.7048 + 1e-16, 0.7048], [0.5823] * 3)
    assert math.isnan(last_bit["p_value"]) and "no variance" in last_bit["note"]


def test_seeds_table_layout():
    per_seed = pd.DataFrame({"variant": ["base"] * 3 + ["kd"] * 3 + ["other"], "train_seed": [0, 1, 2, 0, 1, 2, 0],
                             "id_acc": [0.7, 0.72, 0.71, 0.8, 0.82, 0.81, 0.0],
                             "sf_f1": [0.6, 0.61, 0.62, 0.6, 0.6, 0.6, 1.0]})
    table = seeds_table(per_seed, "base", "kd", metrics=["id_acc", "sf_f1", "dc_acc"])
    assert list(table.columns) == TABLE_COLUMNS and sorted(set(table.test)) == ["paired_t", "welch_t"]
    for test in ("paired_t", "welch_t"):
        rows = table[table.test == test].set_index("metric")
        assert rows.at["id_acc", "b_mean"] == pytest.approx(0.81) and rows.at["id_acc", "n_a"] == 3
        assert math.isnan(rows.at["dc_acc", "p_value"]) and math.isnan(rows.at["dc_acc", "p_holm"])
    welch = table[table.test == "welch_t"].set_index("metric")
    assert welch.at["id_acc", "p_value"] < 0.01 and welch.at["id_acc", "p_holm"] == pytest.approx(2 * welch.at["id_acc", "p_value"])
    # kd is base + 0.1 on every seed: no spread in the differences, so no t
    assert "do not vary" in table[table.test == "paired_t"].set_index("metric").at["id_acc", "note"]


def test_paired_test_pairs_by_seed_and_matches_scipy():
    a = pd.Series([0.70, 0.80, 0.75], index=[0, 1, 2])
    b = pd.Series([0.815, 0.76, 0.71], index=[1, 2, 0])  # another order: paired by seed, not by position
    out = paired_over_seeds(a, b)
    want = scipy_stats.ttest_rel([0.71, 0.815, 0.76], [0.70, 0.80, 0.75])
    assert out["p_value"] == pytest.approx(want.pvalue) and out["n_a"] == out["n_b"] == 3
    assert out["diff"] == pytest.approx(0.0116667, abs=1e-6) and out["ci_low"] < out["diff"] < out["ci_high"]
    # seed spread swamps a small, consistent gain in Welch's test, not in the paired one
    assert out["p_value"] < 0.05 < welch_over_seeds(a, b)["p_value"]
    lonely = paired_over_seeds(a, pd.Series([0.9], index=[5]))
    assert math.isnan(lonely["p_value"]) and "fewer than 2" in lonely["note"]


def test_holm_adjusts_step_down_and_keeps_nan():
    adjusted = holm([0.01, 0.04, float("nan"), 0.03, 0.5])
    assert adjusted[0] == pytest.approx(0.04) and adjusted[3] == pytest.approx(0.09)
    assert adjusted[1] == pytest.approx(0.09)  # 2 x 0.04 = 0.08, raised to the step before it
    assert adjusted[4] == pytest.approx(0.5) and math.isnan(adjusted[2])
