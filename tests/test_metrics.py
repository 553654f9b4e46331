"""``compactnlu.metrics`` on hand-made predictions, with every expected value worked out by hand."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest

from compactnlu.compose import LabelSpace
from compactnlu.interface import decide_sets
from compactnlu.metrics import (
    METRIC_COLUMNS, by_locale, load_predictions, massive_metrics, one_label_per_word, save_predictions,
    task_metrics,
)

LABELS = LabelSpace(intents=("a", "b", "c"), scenarios=("x", "y"), slot_types=("t", "u"))


def frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


@pytest.fixture
def toy() -> pd.DataFrame:
    """Four composed examples in two locales.

    Intents (labels a, b, c):
      gold {a}   pred {a}      exact
      gold {a,b} pred {a}      b missed
      gold {c}   pred {b}      wrong
      gold {b}   pred {b,c}    c extra
    per label: a TP2 FP0 FN0 -> F1 1; b TP1 FP1 FN1 -> F1 .5; c TP0 FP1 FN1 -> F1 0
    macro F1 = .5; micro: TP3 FP2 FN2 -> .6; exact-set accuracy = 1/4.

    Scenarios (x, y): rows 1, 2 and 4 exact, row 3 predicts {x,y} for {y}.
    per label: x TP2 FP1 FN0 -> 0.8; y TP3 FP0 FN0 -> 1; macro .9; exact 3/4.

    Tags: 10 words, 8 right; gold spans t(0-1), u(3) | u(0) | t(1-2) | none; predicted
    t(0-1) | u(0) | t(1) | none: 2 of 4 gold spans right, 3 predicted -> P 2/3, R 1/2, F1 4/7.
    """
    return frame(
        locale=["hi-IN", "hi-IN", "ta-IN", "ta-IN"],
        intents_gold=[["a"], ["a", "b"], ["c"], ["b"]],
        intents_pred=[["a"], ["a"], ["b"], ["b", "c"]],
        scenarios_gold=[["x"], ["x", "y"], ["y"], ["y"]],
        scenarios_pred=[["x"], ["x", "y"], ["x", "y"], ["y"]],
        tags_gold=[["B-t", "I-t", "O", "B-u"], ["B-u", "O"], ["O", "B-t", "I-t"], ["O"]],
        tags_pred=[["B-t", "I-t", "O", "O"], ["B-u", "O"], ["O", "B-t", "O"], ["O"]],
        intent_top=["a", "a", "b", "c"],
    )


# ---------------------------------------------------------------- decision rule

def test_decide_takes_every_label_at_or_above_threshold():
    probs = np.array([[0.6, 0.7, 0.1], [0.5, 0.1, 0.5], [0.9, 0.95, 0.99]])
    assert decide_sets(probs, 0.5) == [[0, 1], [0, 2], [0, 1, 2]]


def test_decide_falls_back_to_the_argmax():
    probs = np.array([[0.2, 0.4, 0.3], [0.01, 0.02, 0.49], [0.6, 0.1, 0.2]])
    assert decide_sets(probs, 0.5) == [[1], [2], [0]]
    assert decide_sets(probs, 0.7) == [[1], [2], [0]]
    assert decide_sets(probs, 0.25) == [[1, 2], [2], [0]]


def test_decide_does_not_change_its_input():
    probs = np.array([[0.2, 0.4]])
    decide_sets(probs, 0.5)
    assert probs.tolist() == [[0.2, 0.4]]


# ---------------------------------------------------------------- task metrics

def test_task_metrics_by_hand(toy):
    m = task_metrics(toy, LABELS)
    assert set(METRIC_COLUMNS) <= set(m)
    assert m["id_acc"] == pytest.approx(0.25)
    assert m["id_f1"] == pytest.approx(0.5)
    assert m["id_f1_micro"] == pytest.approx(0.6)
    assert m["dc_acc"] == pytest.approx(0.75)
    assert m["dc_f1"] == pytest.approx(0.9)
    assert m["dc_f1_micro"] == pytest.approx(2 * 5 / 6 * 1 / (5 / 6 + 1))
    assert m["sf_acc"] == pytest.approx(8 / 10)
    assert m["sf_f1"] == pytest.approx(4 / 7)


def test_span_f1_one_of_two_spans():
    df = frame(tags_gold=[["B-t", "I-t", "O", "B-u"]], tags_pred=[["B-t", "I-t", "O", "O"]],
               intents_gold=[["a"]], scenarios_gold=[["x"]])
    m = task_metrics(df, LABELS)
    assert m["sf_f1"] == pytest.approx(2 / 3)  # P 1, R 1/2
    assert m["sf_acc"] == pytest.approx(3 / 4)


def test_span_f1_counts_a_span_with_the_wrong_boundary_as_wrong():
    df = frame(tags_gold=[["B-t", "I-t", "O"]], tags_pred=[["B-t", "O", "O"]])
    m = task_metrics(df, LABELS)
    assert m["sf_f1"] == 0.0
    assert m["sf_acc"] == pytest.approx(2 / 3)


def test_perfect_predictions_score_one(toy):
    perfect = toy.assign(intents_pred=toy.intents_gold, scenarios_pred=toy.scenarios_gold, tags_pred=toy.tags_gold)
    m = task_metrics(perfect, LABELS)
    for column in METRIC_COLUMNS + ["id_f1_micro", "dc_f1_micro"]:
        assert m[column] == pytest.approx(1.0), column


def test_label_order_in_a_set_does_not_matter(toy):
    shuffled = toy.assign(intents_pred=[["a"], ["a"], ["b"], ["c", "b"]],
                          intents_gold=[["a"], ["b", "a"], ["c"], ["b"]])
    assert task_metrics(shuffled, LABELS)["id_f1"] == pytest.approx(0.5)


@pytest.mark.parametrize("missing,nan_columns", [
    ("intents_pred", ["id_acc", "id_f1", "id_f1_micro"]),
    ("scenarios_pred", ["dc_acc", "dc_f1", "dc_f1_micro"]),
    ("tags_pred", ["sf_acc", "sf_f1"]),
])
def test_missing_task_gives_nan(toy, missing, nan_columns):
    m = task_metrics(toy.drop(columns=[missing]), LABELS)
    for column in nan_columns:
        assert math.isnan(m[column]), column
    present = [c for c in METRIC_COLUMNS if c not in nan_columns]
    assert all(not math.isnan(m[c]) for c in present)


# ---------------------------------------------------------------- by locale

def test_by_locale_has_one_row_per_locale_and_all(toy):
    table = by_locale(toy, LABELS)
    assert table["locale"].tolist() == ["hi-IN", "ta-IN", "all"]
    assert set(METRIC_COLUMNS) <= set(table.columns)
    rows = table.set_index("locale")
    assert rows.loc["hi-IN", "id_acc"] == pytest.approx(0.5)
    assert rows.loc["ta-IN", "id_acc"] == pytest.approx(0.0)
    assert rows.loc["hi-IN", "sf_acc"] == pytest.approx(5 / 6)
    assert rows.loc["ta-IN", "sf_acc"] == pytest.approx(3 / 4)
    for column in METRIC_COLUMNS:
        assert rows.loc["all", column] == pytest.approx(task_metrics(toy, LABELS)[column]), column


def test_by_locale_takes_a_metric_function(toy):
    table = by_locale(toy, LABELS, metric_fn=lambda part: {"n": len(part)})
    assert table.set_index("locale")["n"].to_dict() == {"hi-IN": 2, "ta-IN": 2, "all": 4}


# ---------------------------------------------------------------- MASSIVE single-utterance metrics

def test_massive_metrics_by_hand():
    df = frame(
        intents_gold=[["a"], ["b"], ["c"], ["a"]],
        intent_top=["a", "b", "a", "a"],
        tags_gold=[["B-t", "O"], ["B-u", "I-u"], ["O"], ["O", "B-t"]],
        tags_pred=[["B-t", "O"], ["B-u", "O"], ["O"], ["O", "B-t"]],
    )
    m = massive_metrics(df)
    assert m["intent_acc"] == pytest.approx(3 / 4)
    # spans: gold t, u(0-1), t; predicted t, u(0), t -> P 2/3, R 2/3
    assert m["slot_span_f1"] == pytest.approx(2 / 3)
    # row 1 both right; row 2 tags wrong; row 3 intent wrong (tags right); row 4 both right
    assert m["exact_match"] == pytest.approx(2 / 4)


def test_massive_metrics_without_slots_or_intents():
    no_tags = massive_metrics(frame(intents_gold=[["a"], ["b"]], intent_top=["a", "a"]))
    assert no_tags["intent_acc"] == pytest.approx(0.5)
    assert math.isnan(no_tags["slot_span_f1"]) and math.isnan(no_tags["exact_match"])

    no_intents = massive_metrics(frame(intents_gold=[["a"]], tags_gold=[["B-t"]], tags_pred=[["B-t"]]))
    assert math.isnan(no_intents["intent_acc"]) and math.isnan(no_intents["exact_match"])
    assert no_intents["slot_span_f1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- persistence

def test_save_and_load_predictions_round_trip(toy, tmp_path, monkeypatch):
    toy.attrs["eval_loss"] = 1.25
    path = save_predictions(toy, tmp_path / "preds" / "baseline.parquet")
    assert path == tmp_path / "preds" / "baseline.parquet"
    raw = path.read_bytes()
    assert raw[:4] == b"PAR1" and raw[-4:] == b"PAR1"
    assert [p.name for p in path.parent.iterdir()] == ["baseline.parquet"]  # no temporary left behind

    def refuse(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    back = load_predictions(path)
    monkeypatch.undo()

    assert list(back.columns) == list(toy.columns)
    for column in ("intents_gold", "intents_pred", "scenarios_gold", "scenarios_pred", "tags_gold", "tags_pred"):
        assert all(isinstance(v, list) for v in back[column]), column
        assert back[column].tolist() == toy[column].tolist(), column
    assert back.locale.tolist() == toy.locale.tolist()
    assert back.intent_top.tolist() == toy.intent_top.tolist()
    assert task_metrics(back, LABELS) == task_metrics(toy, LABELS)
    assert back.attrs.get("eval_loss") == 1.25  # the docstring's promise: it travels in the file's metadata


# ---------------------------------------------------------------- the official MASSIVE definition

def official_convert_to_bio(seq_tags: list[str], outside: str = "Other") -> list[str]:
    """alexa/massive src/massive/utils/training_utils.py ``convert_to_bio`` (commit f966f21),
    for per-word labels without merged subwords: a run of one label is one span."""
    bio, prev = [], None
    for tag in seq_tags:
        if tag == outside:
            bio.append("O")
        elif tag != prev:
            bio.append("B-" + tag)
        else:
            bio.append("I-" + prev)
        prev = tag
    return bio


def official_eval_preds(pred_intents, lab_intents, pred_slots, lab_slots, pad: str = "Other") -> dict:
    """alexa/massive src/massive/utils/training_utils.py ``eval_preds`` (commit f966f21):
    intent accuracy, seqeval F1 of the BIO-converted per-word labels, and exact match
    (intent equal and converted slot sequences equal). Predictions are padded or cut to the
    gold length with ``pad``."""
    from seqeval.metrics import f1_score as seqeval_f1

    bio_labels, bio_preds = [], []
    for lab, pred in zip(lab_slots, pred_slots):
        pred = pred[:len(lab)] + [pad] * (len(lab) - len(pred))
        bio_labels.append(official_convert_to_bio(lab))
        bio_preds.append(official_convert_to_bio(pred))
    matches = sum(p == l and ps == ls for p, l, ps, ls in zip(pred_intents, lab_intents, bio_preds, bio_labels))
    return {"intent_acc": float(np.mean([p == l for p, l in zip(pred_intents, lab_intents)])),
            "slot_micro_f1": float(seqeval_f1(bio_labels, bio_preds)),
            "ex_match_acc": matches / len(lab_intents)}


def per_word_labels(bio_tags: list[str]) -> list[str]:
    """MASSIVE's own slot format: each word's slot type, or "Other"."""
    return ["Other" if tag == "O" else tag[2:] for tag in bio_tags]


# gold, predicted tags: every row is a case where the study's BIO and MASSIVE's per-word reading might part
OFFICIAL_CASES = [
    (["B-t", "I-t", "O"], ["B-t", "B-t", "O"]),            # B-x B-x: one span to MASSIVE
    (["B-t", "I-t", "I-t"], ["B-t", "I-t", "B-t"]),        # I-x B-x
    (["B-t", "O", "B-t"], ["B-t", "B-t", "B-t"]),          # two gold spans, three predicted side by side
    (["B-t", "I-t", "B-u"], ["I-t", "I-t", "B-u"]),        # an I- at the start
    (["O", "B-u", "I-u"], ["O", "I-u", "I-u"]),            # an I- after O
    (["B-t", "B-u", "I-u"], ["B-t", "I-u", "I-u"]),        # an I- after another type
    (["B-t", "I-t", "O", "B-u"], ["B-t", "I-t", "O", "O"]),
    (["O", "O"], ["O", "B-t"]),
    (["B-u"], ["B-u"]),
]


@pytest.mark.parametrize("rows", [range(len(OFFICIAL_CASES)), [0], [1, 2], [3, 4, 5], [6, 7, 8]])
def test_massive_metrics_equal_the_official_definition(rows):
    gold = [OFFICIAL_CASES[i][0] for i in rows]
    pred = [OFFICIAL_CASES[i][1] for i in rows]
    intents_gold = [["a"], ["b"], ["c"], ["a"], ["a"], ["b"], ["c"], ["a"], ["b"]][:len(gold)]
    intent_top = ["a", "b", "a", "a", "c", "b", "c", "a", "b"][:len(gold)]
    df = frame(intents_gold=intents_gold, intent_top=intent_top, tags_gold=gold, tags_pred=pred)

    ours = massive_metrics(df)
    official = official_eval_preds(intent_top, [g[0] for g in intents_gold],
                                   [per_word_labels(p) for p in pred], [per_word_labels(g) for g in gold])

    assert ours["intent_acc"] == pytest.approx(official["intent_acc"])
    assert ours["slot_span_f1"] == pytest.approx(official["slot_micro_f1"])
    assert ours["exact_match"] == pytest.approx(official["ex_match_acc"])


def test_two_adjacent_spans_of_one_type_count_as_one():
    df = frame(intents_gold=[["a"]], intent_top=["a"], tags_gold=[["B-t", "I-t", "O"]], tags_pred=[["B-t", "B-t", "O"]])
    m = massive_metrics(df)
    assert m["slot_span_f1"] == pytest.approx(1.0)
    assert m["exact_match"] == pytest.approx(1.0)


def test_one_label_per_word():
    assert one_label_per_word(["B-t", "B-t", "I-t", "B-t", "O", "I-t", "B-u", "I-t"]) == \
        ["B-t", "I-t", "I-t", "I-t", "O", "B-t", "B-u", "B-t"]
    assert one_label_per_word(["B-date", "B-date_time", "I-date"]) == ["B-date", "B-date_time", "B-date"]
    assert one_label_per_word([]) == []
