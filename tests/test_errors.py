"""``compactnlu.errors`` on hand-made prediction frames whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from compactnlu.compose import LabelSpace
from compactnlu.errors import (
    FAMILY, confused_intent_pairs, domain_overprediction, errors_by_length, extra_domains, family_domain_errors,
    flip_rates, pair_count, quantization_drop, task_sensitivity, two_proportion_test, undirected_pairs,
)
from compactnlu.metrics import METRIC_COLUMNS

LABELS = LabelSpace(intents=("alarm_set", "calendar_query", "calendar_set", "music_query", "play_music"),
                    scenarios=("alarm", "calendar", "email", "music"), slot_types=("song", "time"))


def frame(intents_gold, intents_pred, scenarios_gold, scenarios_pred, tags_gold=None, tags_pred=None,
          locale=None) -> pd.DataFrame:
    """A prediction frame; tags default to one right song span per example."""
    n = len(intents_gold)
    tags_gold = tags_gold or [["B-song", "O"]] * n
    tags_pred = tags_pred or [list(t) for t in tags_gold]
    return pd.DataFrame({
        "uid": [f"u{i}" for i in range(n)], "locale": locale or ["hi-IN"] * n,
        "n_parts": [len(s) for s in scenarios_gold],
        "intents_gold": intents_gold, "scenarios_gold": scenarios_gold, "tags_gold": tags_gold,
        "intents_pred": intents_pred, "scenarios_pred": scenarios_pred, "tags_pred": tags_pred,
    })


# ---------------------------------------------------------------- domains

@pytest.fixture
def domains() -> pd.DataFrame:
    """Domain predictions, gold -> predicted:

    ml-IN  {music} -> {music, alarm}           1 extra
    ml-IN  {music} -> {music, alarm, email}    2 extra
    ml-IN  {music, calendar} -> {music}        calendar missed, no extra
    hi-IN  {alarm} -> {alarm}                  right
    hi-IN  {music} -> {email}                  1 extra, music missed
    hi-IN  {calendar, alarm} -> same           right
    """
    sg = [["music"], ["music"], ["music", "calendar"], ["alarm"], ["music"], ["calendar", "alarm"]]
    sp = [["music", "alarm"], ["music", "alarm", "email"], ["music"], ["alarm"], ["email"], ["alarm", "calendar"]]
    ig = [["alarm_set"]] * 6
    return frame(ig, ig, sg, sp, locale=["ml-IN"] * 3 + ["hi-IN"] * 3)


def test_domain_overprediction_counts_extra_domains(domains):
    out = domain_overprediction(domains).set_index("locale")
    assert list(out.index) == ["hi-IN", "ml-IN", "all"]
    ml, hi, every = out.loc["ml-IN"], out.loc["hi-IN"], out.loc["all"]
    assert ml.n == 3 and ml.overpred_rate == pytest.approx(2 / 3) and ml.mean_extra == pytest.approx(1.0)
    assert ml.underpred_rate == pytest.approx(1 / 3) and ml.dc_error_rate == pytest.approx(1.0)
    assert (ml.top_extra, ml.top_extra_count) == ("alarm", 2)
    assert hi.overpred_rate == pytest.approx(1 / 3) and hi.mean_extra == pytest.approx(1 / 3)
    assert hi.dc_error_rate == pytest.approx(1 / 3) and hi.top_extra == "email"
    assert every.n == 6 and every.overpred_rate == pytest.approx(0.5) and every.mean_extra == pytest.approx(4 / 6)
    assert every.dc_error_rate == pytest.approx(4 / 6)
    assert (every.top_extra, every.top_extra_count) == ("alarm", 2)  # tie with email: by name


def test_extra_domains_pairs_gold_domain_with_added_domain(domains):
    out = extra_domains(domains, top=None)
    assert list(zip(out.gold_domain, out.extra_domain, out["count"])) == [("music", "alarm", 2), ("music", "email", 2)]
    # music is gold in 4 examples; alarm was added to 2 of them
    assert list(out.n_gold) == [4, 4] and list(out.rate) == [0.5, 0.5]
    assert len(extra_domains(domains, top=1)) == 1


def test_no_overprediction_when_predictions_are_right():
    sg = [["music"], ["alarm", "email"]]
    out = domain_overprediction(frame([["a"]] * 2, [["a"]] * 2, sg, sg)).set_index("locale")
    assert out.loc["all", "overpred_rate"] == 0 and out.loc["all", "top_extra"] is None
    assert extra_domains(frame([["a"]] * 2, [["a"]] * 2, sg, sg)).empty


# ---------------------------------------------------------------- intents

@pytest.fixture
def intents() -> pd.DataFrame:
    """Intent predictions, gold -> predicted, and the pairs they add:

    {music_query} -> {play_music}                          music_query>play_music
    {play_music} -> {music_query}                          play_music>music_query
    {play_music, calendar_set} -> {music_query, calendar_query}
        2 missed x 2 extra: play_music>music_query, play_music>calendar_query,
        calendar_set>music_query, calendar_set>calendar_query
    {calendar_query} -> {calendar_set}                     calendar_query>calendar_set
    {alarm_set, music_query} -> {alarm_set}                a miss with no extra: no pair
    {alarm_set} -> {alarm_set, play_music}                 an extra with no miss: no pair
    """
    ig = [["music_query"], ["play_music"], ["play_music", "calendar_set"], ["calendar_query"],
          ["alarm_set", "music_query"], ["alarm_set"]]
    ip = [["play_music"], ["music_query"], ["music_query", "calendar_query"], ["calendar_set"],
          ["alarm_set"], ["alarm_set", "play_music"]]
    sg = [["music"]] * 6
    return frame(ig, ip, sg, sg)


def test_confused_pairs_counts_each_missed_extra_pair(intents):
    table = confused_intent_pairs(intents, top=None)
    counts = {(g, p): c for g, p, c in zip(table.gold, table.predicted, table["count"])}
    assert counts == {("play_music", "music_query"): 2, ("music_query", "play_music"): 1,
                      ("calendar_set", "calendar_query"): 1, ("calendar_query", "calendar_set"): 1,
                      ("calendar_set", "music_query"): 1, ("play_music", "calendar_query"): 1}
    first = table.iloc[0]
    assert (first["rank"], first.gold, first.predicted) == (1, "play_music", "music_query")
    assert (first.count_single, first.count_multi) == (1, 1)
    assert first.rate == pytest.approx(1.0)  # play_music is gold in 2 examples, missed for music_query in both
    assert first.share == pytest.approx(2 / 7)
    assert set(table["rank"].iloc[1:]) == {2}
    assert len(confused_intent_pairs(intents, top=2)) == 2


def test_pair_count_counts_both_directions(intents):
    table = confused_intent_pairs(intents, top=None)
    assert pair_count(table, "music_query", "play_music") == 3
    assert pair_count(table, "play_music", "music_query") == 3
    assert pair_count(table, "calendar_query", "calendar_set") == 2
    assert pair_count(table, "alarm_set", "play_music") == 0
    merged = undirected_pairs(table)
    assert list(zip(merged["rank"], merged.intent_a, merged.intent_b, merged["count"]))[:2] == [
        (1, "music_query", "play_music", 3), (2, "calendar_query", "calendar_set", 2)]
    assert merged["count"].sum() == 7


# ---------------------------------------------------------------- quantization

@pytest.fixture
def reference() -> pd.DataFrame:
    """Four right predictions in two locales."""
    ig = [["music_query"], ["play_music", "alarm_set"], ["calendar_set"], ["calendar_query"]]
    sg = [["music"], ["music", "alarm"], ["calendar"], ["calendar"]]
    tags = [["B-song", "I-song", "O"], ["O", "B-time"], ["B-time", "O"], ["O", "B-song"]]
    return frame(ig, [list(x) for x in ig], sg, [list(x) for x in sg], tags, [list(t) for t in tags],
                 locale=["hi-IN", "hi-IN", "ta-IN", "ta-IN"])


def noisy(ref: pd.DataFrame) -> pd.DataFrame:
    """SF wrong on every example, ID wrong on one, DC untouched."""
    out = ref.copy()
    out["tags_pred"] = [["O"] * len(t) for t in ref.tags_gold]
    out["intents_pred"] = [["play_music"]] + [list(x) for x in ref.intents_gold[1:]]
    return out


def test_flip_rates_zero_for_identical_and_one_for_all_changed(reference):
    same = reference.copy()
    same["intents_pred"] = [list(reversed(x)) for x in reference.intents_pred]  # same sets, other order
    assert flip_rates(reference, same) == {"id": 0.0, "dc": 0.0, "sf": 0.0}
    changed = reference.copy()
    changed["intents_pred"] = [["alarm_set", "calendar_set"]] * 4
    changed["scenarios_pred"] = [["email"]] * 4
    changed["tags_pred"] = [["O"] * len(t) for t in reference.tags_gold]
    assert flip_rates(reference, changed) == {"id": 1.0, "dc": 1.0, "sf": 1.0}
    assert flip_rates(reference, noisy(reference)) == {"id": 0.25, "dc": 0.0, "sf": 1.0}


def test_quantization_drop_signs_units_and_flips(reference):
    # "fp" against the noisy frame as its reference: a gain, so the signs must flip
    preds = {"fp": reference, "fp_same": reference.copy(), "fp_q": noisy(reference), "worse": noisy(reference)}
    out = quantization_drop(preds, LABELS, {"fp_same": "fp", "fp_q": "fp", "fp": "worse"})
    assert len(out) == 3 * len(METRIC_COLUMNS) and set(out.locale) == {"all"}
    same = out[out.variant == "fp_same"]
    assert (same.delta == 0).all() and (same.flip_rate == 0).all()
    q = out[out.variant == "fp_q"].set_index("metric")
    assert q.loc["id_acc", "delta"] == pytest.approx(-25.0)  # points: 100 -> 75
    assert q.loc["id_acc", "relative_drop"] == pytest.approx(0.25)
    assert q.loc["dc_acc", "delta"] == 0 and q.loc["sf_f1", "delta"] == pytest.approx(-100.0)
    assert (q.loc[["sf_acc", "sf_f1"], "delta"] < 0).all() and (q.loc[["sf_acc", "sf_f1"], "flip_rate"] == 1).all()
    assert q.loc["id_f1", "flip_rate"] == 0.25
    up = out[out.variant == "fp"].set_index("metric")
    assert up.loc["id_acc", "delta"] == pytest.approx(25.0) and up.loc["id_acc", "relative_drop"] < 0


def test_task_sensitivity_ranks_the_task_that_loses_most(reference):
    preds = {"fp": reference, "fp_q": noisy(reference)}
    drop = quantization_drop(preds, LABELS, {"fp_q": "fp"}, per_locale=True)
    assert set(drop.locale) == {"hi-IN", "ta-IN", "all"}
    # the ID error sits in hi-IN: ta-IN keeps its intents
    assert drop.query("locale == 'ta-IN' and metric == 'id_acc'").delta.item() == 0
    assert drop.query("locale == 'hi-IN' and task == 'id'").flip_rate.tolist() == [0.5, 0.5]
    ranks = task_sensitivity(drop).query("variant == 'fp_q' and locale == 'all'").set_index("task")["rank"]
    assert ranks.to_dict() == {"id": 2, "dc": 3, "sf": 1}
    overall = task_sensitivity(drop).query("variant == 'all' and locale == 'all'").set_index("task")
    assert overall["rank"].to_dict() == {"id": 2, "dc": 3, "sf": 1} and (overall.n_variants == 1).all()


def test_quantization_drop_refuses_misaligned_or_missing(reference):
    shuffled = reference.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="row order"):
        quantization_drop({"fp": reference, "q": shuffled}, LABELS, {"q": "fp"})
    with pytest.raises(KeyError, match="fp32"):
        quantization_drop({"q": reference}, LABELS, {"q": "fp32"})


# ---------------------------------------------------------------- families

def test_two_proportion_test_small_p_for_different_large_for_equal():
    assert two_proportion_test(50, 100, 5, 100)["p_value"] < 1e-6
    assert two_proportion_test(20, 100, 20, 100)["p_value"] > 0.5
    assert two_proportion_test(3, 10, 3, 10)["test"] == "fisher"
    assert two_proportion_test(0, 10, 0, 12)["p_value"] == 1.0
    assert math.isnan(two_proportion_test(1, 10, 0, 0)["p_value"])


def family_frame(dravidian_wrong: int, aryan_wrong: int, per_locale: int = 20) -> pd.DataFrame:
    """``per_locale`` examples in each of the six locales plus one unknown; the first k of
    each family get an extra ``alarm`` domain."""
    rows = []
    counters = {"Indo-Aryan": aryan_wrong, "Dravidian": dravidian_wrong}
    for loc in list(FAMILY) + ["xx-XX"]:
        for _ in range(per_locale):
            fam = FAMILY.get(loc)
            wrong = fam is not None and counters[fam] > 0
            if wrong:
                counters[fam] -= 1
            rows.append((loc, ["music"], ["music", "alarm"] if wrong else ["music"]))
    loc, sg, sp = zip(*rows)
    return frame([["play_music"]] * len(rows), [["play_music"]] * len(rows), list(sg), list(sp), locale=list(loc))


def test_family_domain_errors_rates_and_test():
    out = family_domain_errors(family_frame(dravidian_wrong=60, aryan_wrong=2))
    dc = out[out.measure == "dc_error"].set_index("family")
    assert dc.loc["Indo-Aryan", "n"] == 40 and dc.loc["Dravidian", "n"] == 80  # xx-XX left out
    assert dc.loc["Dravidian", "rate"] == pytest.approx(0.75) and dc.loc["Indo-Aryan", "rate"] == pytest.approx(0.05)
    assert dc.loc["Dravidian", "difference"] == pytest.approx(0.70)
    assert (dc.p_value < 1e-6).all()
    over = out[out.measure == "overpred"].set_index("family")
    assert over.loc["Dravidian", "count"] == 60 and (over.p_value < 1e-6).all()

    equal = family_domain_errors(family_frame(dravidian_wrong=20, aryan_wrong=10))
    assert (equal.rate.to_numpy() == 0.25).all() and (equal.p_value > 0.5).all()


# ---------------------------------------------------------------- length

@pytest.fixture
def lengths() -> pd.DataFrame:
    """60 examples of 1-20 words, 1-3 parts; intents right exactly when the example has at most 5 words."""
    rng = np.random.default_rng(0)
    n_words = rng.integers(1, 21, size=60)
    tags = [["O"] * (k - 1) + ["B-time"] for k in n_words]
    ig = [["alarm_set"]] * 60
    ip = [["alarm_set"] if k <= 5 else ["music_query"] for k in n_words]
    sg = [["alarm", "music", "calendar"][: 1 + i % 3] for i in range(60)]
    return frame(ig, ip, sg, [list(s) for s in sg], tags, [list(t) for t in tags])


@pytest.mark.parametrize("bins", [4, 7, [0, 5, 10, np.inf], [0, 20]])
def test_errors_by_length_bins_cover_every_example_once(lengths, bins):
    out = errors_by_length(lengths, LABELS, bins=bins)
    words = lengths.tags_gold.map(len)
    by_words = out[out.grouping == "words"]
    assert by_words.n.sum() == len(lengths)
    for row in by_words.itertuples():
        assert row.n == ((words >= row.lo) & (words <= row.hi)).sum()
    assert (by_words.lo.to_numpy()[1:] == by_words.hi.to_numpy()[:-1] + 1).all()  # adjacent, no overlap
    by_parts = out[out.grouping == "n_parts"]
    assert list(by_parts.group) == ["1", "2", "3"] and list(by_parts.n) == [20, 20, 20]
    assert out.groupby("grouping").share.sum().to_dict() == pytest.approx({"n_parts": 1.0, "words": 1.0})


def test_errors_by_length_metrics_follow_the_bins(lengths):
    out = errors_by_length(lengths, LABELS, bins=[0, 5, np.inf]).query("grouping == 'words'")
    assert list(out.group) == ["1–5", "6–∞"]
    assert list(out.id_acc) == [1.0, 0.0] and (out.dc_acc == 1.0).all()
    with pytest.raises(ValueError, match="cover"):
        errors_by_length(lengths, LABELS, bins=[0, 10])
