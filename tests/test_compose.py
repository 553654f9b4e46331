"""Composing multi-intent, cross-domain examples from the synthetic corpus."""

from __future__ import annotations

from collections import Counter

import pytest

from compactnlu.compose import SEPARATORS, LabelSpace, compose, singles
from compactnlu.massive import FEATURES as RECORD_FEATURES
from compactnlu.massive import load_massive, rows_to_dataset
from compactnlu.synthetic import SLOTS_BY_SCENARIO

from conftest import TEST_LOCALES


def by_key(records) -> dict[tuple[str, str], dict]:
    """Records keyed by (locale, id): ids are shared across locales, as in MASSIVE."""
    return {(r["locale"], r["id"]): r for r in records}


def group_sizes(records) -> Counter:
    return Counter((r["locale"], r["partition"]) for r in records)


@pytest.fixture(scope="module")
def composed(records):
    return compose(records, seed=13)


def test_splits_are_the_three_partitions(composed):
    assert set(composed) == {"train", "dev", "test"}


def test_same_seed_gives_identical_examples(records, composed):
    again = compose(records, seed=13)
    for split in composed:
        assert again[split].to_list() == composed[split].to_list()


def test_different_seed_gives_different_examples(records, composed):
    other = compose(records, seed=14)
    assert other["train"]["source_ids"] != composed["train"]["source_ids"]
    assert other["test"]["source_ids"] != composed["test"]["source_ids"]


def test_a_locale_composes_the_same_whatever_else_is_loaded(synthetic_dir, composed):
    alone = compose(load_massive(synthetic_dir, ["ta-IN"], verify=False), seed=13)
    for split in composed:
        ta = [e for e in composed[split].to_list() if e["locale"] == "ta-IN"]
        assert alone[split].to_list() == ta


def test_no_leakage_between_partitions_or_locales(records, composed):
    ids_of = {}
    for r in records:
        ids_of.setdefault((r["locale"], r["partition"]), set()).add(r["id"])
    for split, ds in composed.items():
        for ex in ds:
            assert ex["partition"] == split
            assert set(ex["source_ids"]) <= ids_of[(ex["locale"], split)], ex["uid"]


def test_parts_come_from_distinct_scenarios(composed):
    for ds in composed.values():
        for ex in ds:
            assert len(ex["scenarios"]) == ex["n_parts"] == len(ex["source_ids"])
            assert len(set(ex["scenarios"])) == ex["n_parts"], ex["uid"]


def test_labels_follow_the_source_records(records, composed):
    source = by_key(records)
    checked_multi = 0
    for ds in composed.values():
        for ex in ds:
            parts = [source[(ex["locale"], i)] for i in ex["source_ids"]]
            sep = SEPARATORS[ex["locale"]]
            assert ex["intents"] == [p["intent"] for p in parts]
            assert ex["scenarios"] == [p["scenario"] for p in parts]
            words, tags = [], []
            for n, p in enumerate(parts):
                if n:
                    words.append(sep)
                    tags.append("O")
                words += p["words"]
                tags += p["tags"]
            assert ex["words"] == words
            assert ex["tags"] == tags
            assert len(ex["tags"]) == len(ex["words"])
            assert " ".join(ex["words"]) == ex["utt"]
            checked_multi += ex["n_parts"] > 1
    assert checked_multi > 100


@pytest.mark.parametrize("locale, separator", [("hi-IN", "।"), ("bn-BD", "।"), ("ta-IN", ".")])
def test_separator_is_natural_to_the_script(composed, locale, separator):
    assert SEPARATORS[locale] == separator
    seen = 0
    for ex in composed["train"]:
        if ex["locale"] != locale or ex["n_parts"] < 2:
            continue
        assert ex["words"].count(separator) == ex["n_parts"] - 1
        other = "." if separator == "।" else "।"
        assert other not in ex["words"]
        seen += 1
    assert seen > 0


def test_dravidian_locales_use_the_full_stop():
    assert {SEPARATORS[loc] for loc in ("te-IN", "kn-IN", "ml-IN")} == {"."}


@pytest.mark.parametrize("k_probs, n_parts", [((1, 0, 0), 1), ((0, 1, 0), 2), ((0, 0, 1), 3), ((0, 0, 0, 1), 4)])
def test_degenerate_k_probs_fix_the_number_of_parts(records, k_probs, n_parts):
    out = compose(records, k_probs=k_probs, seed=1)
    for ds in out.values():
        assert set(ds["n_parts"]) == {n_parts}


def test_n_parts_roughly_follow_k_probs(records):
    out = compose(records, k_probs=(0.3, 0.4, 0.3), per_utterance=3.0, seed=5)
    n_parts = [n for ds in out.values() for n in ds["n_parts"]]
    share = Counter(n_parts)
    total = len(n_parts)
    assert total > 1000
    for k, p in zip((1, 2, 3), (0.3, 0.4, 0.3)):
        assert abs(share[k] / total - p) < 0.05, (k, share[k] / total)


@pytest.mark.parametrize("per_utterance", [1.0, 0.5, 0.35, 1.7])
def test_number_of_examples_per_locale_and_partition(records, per_utterance):
    out = compose(records, per_utterance=per_utterance, seed=3)
    produced = Counter((ex["locale"], ex["partition"]) for ds in out.values() for ex in ds)
    expected = {key: int(round(n * per_utterance)) for key, n in group_sizes(records).items()}
    assert dict(produced) == expected


@pytest.mark.parametrize("per_utterance", [1.0, 1.7])
def test_every_record_is_used_when_per_utterance_at_least_one(records, per_utterance):
    out = compose(records, per_utterance=per_utterance, seed=4)
    used = {(ex["locale"], i) for ds in out.values() for ex in ds for i in ex["source_ids"]}
    assert used == set(by_key(records))


def test_uids_are_unique(composed):
    uids = [u for ds in composed.values() for u in ds["uid"]]
    assert len(uids) == len(set(uids))


def _with_test_record_changed(records, **change):
    """The records with the first hi-IN test record changed (as a record not from load_massive could be)."""
    rows = records.to_list()
    n = next(i for i, r in enumerate(rows) if r["locale"] == "hi-IN" and r["partition"] == "test")
    rows[n].update(change)
    return rows_to_dataset(rows, RECORD_FEATURES), rows[n]


def test_an_id_in_two_partitions_is_refused(records):
    train_id = next(r["id"] for r in records if r["locale"] == "hi-IN" and r["partition"] == "train")
    leaky, _ = _with_test_record_changed(records, id=train_id)
    with pytest.raises(ValueError, match=f"id '{train_id}' of hi-IN is in both train and test"):
        compose(leaky)


def test_the_same_id_in_two_locales_is_fine(records):
    # MASSIVE ids are per locale: the same id is the same request in every language.
    assert len({r["id"] for r in records}) < len(records)
    compose(records, per_utterance=0.01)


@pytest.mark.parametrize("change, message", [
    ({"scenario": None}, "scenario is None, not a label"),
    ({"intent": ""}, "intent is '', not a label"),
    ({"words": [], "tags": []}, "empty utterance"),
])
def test_records_that_would_break_composing_are_refused(records, change, message):
    bad, row = _with_test_record_changed(records, **change)
    with pytest.raises(ValueError, match=f"record '{row['id']}' of hi-IN test: {message}"):
        compose(bad)


@pytest.mark.parametrize("k_probs", [(0.5, 0.6), (-0.2, 0.6, 0.6), (0.2, 0.2, 0.2), ()])
def test_invalid_k_probs_raise(records, k_probs):
    with pytest.raises(ValueError, match="compose_k_probs"):
        compose(records, k_probs=k_probs)


def test_singles_yield_one_example_per_test_record(records):
    tests = [r for r in records if r["partition"] == "test"]
    out = singles(records)
    assert len(out) == len(tests) == 30 * len(TEST_LOCALES)
    for ex, r in zip(out, tests):
        assert ex["source_ids"] == [r["id"]]
        assert ex["locale"] == r["locale"]
        assert ex["partition"] == "test"
        assert ex["n_parts"] == 1
        assert ex["words"] == r["words"] and ex["tags"] == r["tags"]
        assert ex["intents"] == [r["intent"]] and ex["scenarios"] == [r["scenario"]]
        assert ex["utt"] == r["utt"]
    assert len(set(out["uid"])) == len(out)
    assert len(singles(records, "dev")) == 24 * len(TEST_LOCALES)


def test_label_space_tags_and_round_trip(records, tmp_path):
    labels = LabelSpace.from_records(records)
    slot_types = sorted({s for slots in SLOTS_BY_SCENARIO.values() for s in slots})
    assert labels.slot_types == tuple(slot_types)
    assert labels.intents == tuple(sorted(set(records["intent"])))
    assert labels.scenarios == tuple(sorted(set(records["scenario"])))
    tags = labels.tags
    assert tags[0] == "O"
    assert len(tags) == 1 + 2 * len(slot_types)
    for n, slot in enumerate(slot_types):
        assert tags[1 + 2 * n] == f"B-{slot}"
        assert tags[2 + 2 * n] == f"I-{slot}"
    # Every tag the data uses is in the vocabulary.
    assert {t for ts in records["tags"] for t in ts} <= set(tags)

    path = tmp_path / "labels.json"
    labels.save(path)
    loaded = LabelSpace.load(path)
    assert loaded == labels
    assert loaded.tags == labels.tags


# ---------------------------------------------------------------- known bugs (strict xfail: fix, then drop the mark)

def test_a_group_rounded_to_zero_examples_is_empty_not_an_error(records):
    out = compose(records, per_utterance=0.01, seed=1)   # train: round(0.9) = 1, dev/test: round(0.24) = 0
    assert len(out["train"]) == len(TEST_LOCALES)
    assert sum(len(ds) for name, ds in out.items() if name != "train") == 0


def test_singles_of_an_empty_partition_is_an_empty_dataset(records):
    out = singles(records.filter(lambda r: r["partition"] == "train"), "test")
    assert len(out) == 0
    assert set(out.column_names) == set(singles(records)[0])
