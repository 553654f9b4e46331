"""Tokenizer training, first-subword label alignment, the collator and the cached study data."""

from __future__ import annotations

import json

import pytest
import torch

import compactnlu.features as features
from compactnlu.compose import LabelSpace
from compactnlu.config import load_profile
from compactnlu.features import (
    IGNORE, METASPACE, SPLITS, MultiTaskCollator, build_study_data, encode_words, load_tokenizer, train_tokenizer,
)
from compactnlu.synthetic import SCENARIOS, SIZES, SLOTS_BY_SCENARIO

from conftest import TEST_LOCALES, labelled_positions


@pytest.fixture(scope="module")
def tokenizer(records):
    return train_tokenizer(records["utt"], vocab_size=200)


@pytest.fixture(scope="module")
def tag_to_id(records):
    return {t: i for i, t in enumerate(LabelSpace.from_records(records).tags)}


@pytest.fixture(scope="module")
def sample(records):
    """A few records of every test locale, with and without slots."""
    rows = []
    for loc in TEST_LOCALES:
        mine = [r for r in records if r["locale"] == loc]
        rows += mine[:8] + [r for r in mine if set(r["tags"]) == {"O"}][:2]
    assert any(set(r["tags"]) == {"O"} for r in rows) and any(set(r["tags"]) != {"O"} for r in rows)
    return rows


# ---------------------------------------------------------------- alignment

def test_labels_sit_on_the_first_subword_of_each_word(tokenizer, tag_to_id, sample):
    words = [r["words"] for r in sample]
    tags = [r["tags"] for r in sample]
    out = encode_words(tokenizer, words, tags, tag_to_id, max_length=512)
    reference = tokenizer(words, is_split_into_words=True)
    for i, r in enumerate(sample):
        ids, labels = out["input_ids"][i], out["slot_labels"][i]
        assert ids == reference["input_ids"][i]
        assert len(labels) == len(ids) == len(out["attention_mask"][i]) == out["n_subwords"][i]
        assert out["attention_mask"][i] == [1] * len(ids)
        assert out["truncated_words"][i] == 0
        assert sum(1 for x in labels if x != IGNORE) == len(r["words"])

        word_ids = reference.word_ids(i)
        assert word_ids[0] is None and word_ids[-1] is None
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert labels[0] == IGNORE and labels[-1] == IGNORE
        labelled = {pos: wid for wid, pos in
                    labelled_positions(ids, word_ids, tokenizer.convert_tokens_to_ids(METASPACE)).items()}
        for pos in range(len(ids)):
            assert labels[pos] == (tag_to_id[r["tags"][labelled[pos]]] if pos in labelled else IGNORE)


def test_words_split_into_several_subwords(tokenizer, sample):
    # With a 200-piece vocabulary most words need more than one piece, so the test above
    # really exercises the "other subwords get -100" rule.
    enc = tokenizer([r["words"] for r in sample], is_split_into_words=True)
    assert any(len(ids) - 2 > len(r["words"]) for ids, r in zip(enc["input_ids"], sample))


def test_a_roomy_vocabulary_keeps_most_words_whole(records):
    # The synthetic corpus has a few hundred distinct words of two or three syllables; with room for
    # 1500 pieces a Unigram vocabulary should hold most of them whole. tokenizers' trainer,
    # used before, split them into about 4 pieces each, almost characters.
    words = [r["words"] for r in records]
    enc = train_tokenizer(records["utt"], vocab_size=1500)(words, is_split_into_words=True,
                                                           add_special_tokens=False)
    pieces_per_word = sum(map(len, enc["input_ids"])) / sum(map(len, words))
    assert pieces_per_word < 3.0


def test_train_tokenizer_refuses_empty_text():
    with pytest.raises(ValueError, match="the 2 training texts are all empty"):
        train_tokenizer(["", "  "], vocab_size=200)


def test_train_tokenizer_names_a_vocabulary_too_small_for_the_characters(records):
    with pytest.raises(ValueError, match=r"cannot train a 20-piece tokenizer on \d+ texts: .*required_chars"):
        train_tokenizer(records["utt"], vocab_size=20)


def _expected_truncated(ids, word_ids, bare_space_id, n_words, max_length):
    kept = [w for w, pos in labelled_positions(ids, word_ids, bare_space_id).items() if pos < max_length - 1]
    return n_words - len(kept)


def test_truncation_counts_the_words_that_lost_their_first_subword(tokenizer, tag_to_id, sample):
    r = max(sample, key=lambda x: len(x["words"]))
    reference = tokenizer([r["words"]], is_split_into_words=True)
    full_ids, word_ids = reference["input_ids"][0], reference.word_ids(0)
    assert len(full_ids) > 12
    seen = set()
    for max_length in range(3, len(full_ids)):
        out = encode_words(tokenizer, [r["words"]], [r["tags"]], tag_to_id, max_length=max_length)
        ids, labels = out["input_ids"][0], out["slot_labels"][0]
        assert len(ids) == len(labels) == max_length
        assert ids[-1] == tokenizer.eos_token_id
        assert ids[:-1] == full_ids[: max_length - 1]
        assert labels[-1] == IGNORE
        assert out["n_subwords"][0] == len(full_ids)
        expected = _expected_truncated(full_ids, word_ids, tokenizer.convert_tokens_to_ids(METASPACE), len(r["words"]),
                                       max_length)
        assert out["truncated_words"][0] == expected, max_length
        assert sum(1 for x in labels if x != IGNORE) == len(r["words"]) - expected
        seen.add(expected)
    assert len(seen) > 2  # several different truncation counts were checked
    # Exactly long enough: nothing is cut.
    out = encode_words(tokenizer, [r["words"]], [r["tags"]], tag_to_id, max_length=len(full_ids))
    assert out["input_ids"][0] == full_ids and out["truncated_words"][0] == 0


def test_saved_tokenizer_loads_back_and_encodes_identically(tokenizer, sample, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    words = [r["words"] for r in sample]
    a = tokenizer(words, is_split_into_words=True)
    b = loaded(words, is_split_into_words=True)
    assert a["input_ids"] == b["input_ids"]
    assert [a.word_ids(i) for i in range(len(words))] == [b.word_ids(i) for i in range(len(words))]
    texts = [r["utt"] for r in sample]
    assert tokenizer(texts)["input_ids"] == loaded(texts)["input_ids"]
    assert len(loaded) == len(tokenizer) == 200


@pytest.mark.parametrize("which", ["trained", "reloaded"])
def test_tokenizer_has_xlmr_special_tokens(tokenizer, tmp_path, which):
    if which == "reloaded":
        tokenizer.save_pretrained(tmp_path / "tok")
        tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    assert tokenizer.cls_token == "<s>" and tokenizer.sep_token == "</s>"


# ---------------------------------------------------------------- collator

def test_collator_pads_and_builds_multi_hot_targets():
    collate = MultiTaskCollator(pad_token_id=1, n_intents=5, n_scenarios=4)
    batch = collate([
        {"input_ids": [0, 7, 2], "slot_labels": [IGNORE, 3, IGNORE], "intent_ids": [2], "scenario_ids": [1]},
        {"input_ids": [0, 7, 8, 9, 2], "slot_labels": [IGNORE, 0, 1, 2, IGNORE],
         "intent_ids": [0, 1, 4], "scenario_ids": [0, 3, 2]},
    ])
    assert set(batch) == {"input_ids", "attention_mask", "slot_labels", "intent_labels", "domain_labels"}
    assert batch["input_ids"].tolist() == [[0, 7, 2, 1, 1], [0, 7, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["slot_labels"].tolist() == [[IGNORE, 3, IGNORE, IGNORE, IGNORE], [IGNORE, 0, 1, 2, IGNORE]]
    assert batch["intent_labels"].tolist() == [[0, 0, 1, 0, 0], [1, 1, 0, 0, 1]]
    assert batch["domain_labels"].tolist() == [[0, 1, 0, 0], [1, 0, 1, 1]]
    assert batch["input_ids"].dtype == torch.long and batch["slot_labels"].dtype == torch.long
    assert batch["intent_labels"].dtype.is_floating_point and batch["domain_labels"].dtype.is_floating_point


# ---------------------------------------------------------------- build_study_data

@pytest.fixture
def smoke(artifacts_dir, tmp_path):
    """The smoke profile, with its synthetic corpus written under tmp_path too."""
    return load_profile("smoke", {"massive_dir": str(tmp_path / "synthetic-massive")})


def test_build_study_data_builds_then_loads_from_cache(smoke, artifacts_dir, monkeypatch):
    built = build_study_data(smoke)
    assert set(built.features) == set(SPLITS) == {"train", "dev", "test", "test_single"}
    assert (artifacts_dir / "features").is_dir() and (artifacts_dir / "tokenizer").is_dir()
    assert built.tokenizer_path.parent == artifacts_dir / "tokenizer"

    def no_compose(*args, **kwargs):
        raise AssertionError("compose() called: the cache was not used")

    monkeypatch.setattr(features, "compose", no_compose)
    monkeypatch.setattr(features, "train_tokenizer", no_compose)
    cached = build_study_data(smoke)
    for split in SPLITS:
        assert cached.features[split].to_list() == built.features[split].to_list()
    assert cached.labels == built.labels
    assert cached.report == built.report
    # rebuild=True ignores the cache.
    with pytest.raises(AssertionError, match="cache was not used"):
        build_study_data(smoke, rebuild=True)


def test_study_data_counts_match_the_synthetic_corpus(smoke):
    data = build_study_data(smoke)
    n_locales = len(smoke.locales)
    assert data.labels.intents == tuple(sorted(i for items in SCENARIOS.values() for i in items))
    assert data.labels.scenarios == tuple(sorted(SCENARIOS))
    assert data.labels.slot_types == tuple(sorted({s for items in SLOTS_BY_SCENARIO.values() for s in items}))
    assert data.tag_names == data.labels.tags
    # composed_per_utterance is 1: as many composed examples as utterances.
    assert smoke.composed_per_utterance == 1.0
    for split in ("train", "dev", "test"):
        assert len(data.features[split]) == SIZES[split] * n_locales
    assert len(data.features["test_single"]) == SIZES["test"] * n_locales
    assert set(data.features["train"]["locale"]) == set(smoke.locales)
    counts = data.report["counts"]
    assert len(counts) == 3 * n_locales
    for row in counts:
        assert row["utterances"] == row["composed_examples"] == SIZES[row["partition"]]
    # Encoded label ids index the label space.
    ex = data.features["train"][0]
    assert [data.labels.intents[i] for i in ex["intent_ids"]] == ex["intents"]
    assert [data.labels.scenarios[i] for i in ex["scenario_ids"]] == ex["scenarios"]
    assert len(ex["input_ids"]) <= smoke.max_length


def test_changing_max_length_builds_a_new_cache_entry(smoke, artifacts_dir):
    first = build_study_data(smoke)
    shorter = load_profile("smoke", {"massive_dir": smoke.massive_dir, "max_length": 12})
    second = build_study_data(shorter)
    assert len(list((artifacts_dir / "features").iterdir())) == 2
    # The tokenizer does not depend on max_length, so it is shared.
    assert len(list((artifacts_dir / "tokenizer").iterdir())) == 1
    assert second.tokenizer_path == first.tokenizer_path
    assert max(len(x) for x in second.features["train"]["input_ids"]) == 12
    assert max(len(x) for x in first.features["train"]["input_ids"]) > 12
    assert sum(second.features["train"]["truncated_words"]) > 0
    assert sum(r["truncated_words"] for r in second.report["counts"]) > 0


def test_max_utterances_per_partition_keeps_every_split(artifacts_dir, tmp_path):
    profile = load_profile("smoke", {"massive_dir": str(tmp_path / "synthetic-massive"),
                                     "max_utterances_per_partition": 60})
    data = build_study_data(profile)
    assert set(data.features) == set(SPLITS)
    assert all(len(data.features[split]) > 0 for split in SPLITS)


def test_a_word_split_off_a_bare_metaspace_is_labelled_on_its_first_real_subword(tokenizer, tag_to_id):
    # A word the vocabulary has no "▁word…" piece for starts with a bare "▁", which says nothing
    # about the word: its slot label goes on the subword after it.
    bare = tokenizer.convert_tokens_to_ids(METASPACE)
    words = ["ꙮꙮ", "alarm"]  # a character the synthetic corpus never has, then an ordinary word
    encoded = tokenizer([words], is_split_into_words=True)
    ids, word_ids = encoded["input_ids"][0], encoded.word_ids(0)
    assert ids[1] == bare and word_ids[1] == word_ids[2] == 0  # the case this test is about
    out = encode_words(tokenizer, [words], [["B-time", "O"]], tag_to_id, max_length=64)
    assert out["slot_labels"][0][1] == IGNORE
    assert out["slot_labels"][0][2] == tag_to_id["B-time"]
    assert sum(x != IGNORE for x in out["slot_labels"][0]) == 2


def test_an_edited_label_list_or_tokenizer_file_is_refused_on_load(smoke):
    """The label order and the tokenizer shape every model's inputs and outputs: both folders
    record their files' SHA-256 and every load checks them."""
    from compactnlu.features import load_study_data

    data = build_study_data(smoke)
    labels = next(p for p in (data.tokenizer_path.parent.parent / "features").glob("*/labels.json"))
    original = labels.read_text(encoding="utf-8")
    record = json.loads(original)
    record["intents"] = record["intents"][::-1]  # same size, same names, another order
    labels.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels\.json is corrupt or truncated"):
        load_study_data(smoke)
    labels.write_text(original, encoding="utf-8")
    load_study_data(smoke)

    tokenizer_file = next(p for p in data.tokenizer_path.iterdir() if p.suffix == ".json" and p.name != "integrity.json")
    tokenizer_file.write_text(tokenizer_file.read_text(encoding="utf-8") + " ", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{tokenizer_file.name} is corrupt or truncated"):
        load_study_data(smoke)


def test_a_file_added_to_a_sealed_folder_is_refused(smoke):
    """A tokenizer reads whatever json its folder holds, so a file its record does not list is refused."""
    from compactnlu.features import load_study_data

    data = build_study_data(smoke)
    (data.tokenizer_path / "added_tokens.json").write_text('{"wake": 7}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) its integrity\.json does not record, e\.g\. added_tokens"):
        load_study_data(smoke)
