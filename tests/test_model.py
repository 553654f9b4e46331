"""``MultiTaskNLU``: which heads exist per task set, the loss, persistence and from_pretrained."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

from compactnlu.artifacts import RECORD_DIGEST, record_digest
from compactnlu.model import MultiTaskNLU, NLUConfig, pack_words

ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
TAGS = ("O", "B-a", "I-a", "B-b", "I-b")
N_INTENTS, N_DOMAINS = 4, 3
HEADS = {"id": ["id_head"], "dc": ["dc_head"], "sf": ["sf_head", "crf"]}
LOGITS = {"id": "intent_logits", "dc": "domain_logits", "sf": "slot_logits"}



def tiny_config(tasks=("id", "dc", "sf"), **kw) -> NLUConfig:
    return NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=TAGS, tasks=tasks, encoder=dict(ENCODER), **kw)


def make_model(tasks=("id", "dc", "sf"), seed=0, **kw) -> MultiTaskNLU:
    torch.manual_seed(seed)
    return MultiTaskNLU(tiny_config(tasks, **kw)).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Two examples (one padded), first-subword slot labels, multi-hot targets."""
    input_ids = torch.tensor([[0, 7, 8, 9, 10, 11, 2], [0, 12, 13, 14, 2, 1, 1]])
    attention_mask = (input_ids != 1).long()
    slot_labels = torch.tensor([[-100, 1, -100, 2, 0, 3, -100], [-100, 0, 3, 4, -100, -100, -100]])
    intent_labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    domain_labels = torch.tensor([[1.0, 1, 0], [0, 0, 1]])
    return dict(input_ids=input_ids, attention_mask=attention_mask, slot_labels=slot_labels,
                intent_labels=intent_labels, domain_labels=domain_labels)


def inputs_only(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


# ---------------------------------------------------------------- heads per task set

@pytest.mark.parametrize("tasks", [("id", "dc", "sf"), ("id", "dc"), ("dc", "sf"), ("id", "sf")])
def test_only_the_heads_of_the_tasks_exist(tasks, batch):
    model = make_model(tasks)
    assert model.tasks == tasks
    for task, attributes in HEADS.items():
        for attribute in attributes:
            assert hasattr(model, attribute) == (task in tasks), (task, attribute)

    out = model(**batch)
    for task, key in LOGITS.items():
        assert (key in out) == (task in tasks), key
    assert set(out["losses"]) == set(tasks)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in out["losses"].values()), rel=1e-6)
    if "id" in tasks:
        assert out["intent_logits"].shape == (2, N_INTENTS)
    if "dc" in tasks:
        assert out["domain_logits"].shape == (2, N_DOMAINS)
    if "sf" in tasks:
        assert out["slot_logits"].shape == (2, 7, len(TAGS))


def test_no_labels_no_loss(batch):
    out = make_model()(**inputs_only(batch))
    assert "loss" not in out and "losses" not in out
    assert {"intent_logits", "domain_logits", "slot_logits"} <= set(out)


def test_task_order_is_canonical():
    assert tiny_config(("sf", "id")).tasks == ("id", "sf")


@pytest.mark.parametrize("tasks", [(), ("ner",)])
def test_config_without_tasks_raises(tasks):
    with pytest.raises(ValueError):
        tiny_config(tasks)


def test_loss_weights_scale_the_loss(batch):
    one = make_model(("id",), loss_weights={"id": 1.0})
    two = make_model(("id",), loss_weights={"id": 2.0})
    l1, l2 = one(**batch)["loss"], two(**batch)["loss"]
    assert l1.item() > 0
    assert l2.item() == pytest.approx(2 * l1.item(), rel=1e-6)


def test_loss_weights_weigh_each_task(batch):
    base = make_model(("id", "dc", "sf"), loss_weights={"id": 1.0, "dc": 1.0, "sf": 1.0})(**batch)
    weighted = make_model(("id", "dc", "sf"), loss_weights={"id": 0.5, "dc": 3.0, "sf": 0.0})(**batch)
    losses = base["losses"]
    expected = 0.5 * losses["id"] + 3.0 * losses["dc"]
    assert weighted["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_slot_loss_is_mean_crf_nll_per_word(batch):
    model = make_model(("sf",))
    out = model(**batch)
    word_mask = batch["slot_labels"] != -100
    packed, mask = pack_words(out["slot_logits"], word_mask)
    gold, _ = pack_words(batch["slot_labels"].clamp(min=0), word_mask)
    expected = model.crf.nll(packed, gold, mask).sum() / word_mask.sum()
    assert out["losses"]["sf"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_decode_slots_gives_one_tag_per_word(batch):
    model = make_model()
    out = model(**inputs_only(batch))
    paths = model.decode_slots(out["slot_logits"], batch["slot_labels"] != -100)
    assert [len(p) for p in paths] == [4, 3]
    assert all(0 <= t < len(TAGS) for p in paths for t in p)


def test_cls_pooling_uses_the_pooler(batch):
    model = make_model(("id",), pooling="cls")
    assert model.encoder.pooler is not None
    assert make_model(("id",)).encoder.pooler is None
    assert torch.isfinite(model(**batch)["loss"])


def test_backward_reaches_every_head(batch):
    model = make_model().train()
    model(**batch)["loss"].backward()
    for name in ("id_head.weight", "dc_head.weight", "sf_head.weight", "crf.transitions",
                 "encoder.embeddings.word_embeddings.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


# ---------------------------------------------------------------- persistence

def test_save_load_round_trip(tmp_path, batch, monkeypatch):
    model = make_model(seed=3)
    with torch.no_grad():  # non-zero CRF parameters, so they have to travel too
        model.crf.transitions.normal_()
        model.crf.end_transitions.normal_()
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    json.loads((tmp_path / "m" / "config.json").read_text())  # plain JSON

    def refuse(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = MultiTaskNLU.load(tmp_path / "m")
    monkeypatch.undo()

    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.tasks == model.tasks
    original, restored = model.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for key in ("intent_logits", "domain_logits", "slot_logits", "loss"):
        assert torch.equal(a[key], b[key]), key
    mask = batch["slot_labels"] != -100
    assert model.decode_slots(a["slot_logits"], mask) == loaded.decode_slots(b["slot_logits"], mask)


def test_save_load_round_trip_of_a_task_pair(tmp_path, batch):
    model = make_model(("dc", "sf"), seed=4, loss_weights={"dc": 2.0, "sf": 0.5})
    model.save(tmp_path / "pair")
    loaded = MultiTaskNLU.load(tmp_path / "pair")
    assert loaded.tasks == ("dc", "sf") and not hasattr(loaded, "id_head")
    assert loaded.config.loss_weights == {"dc": 2.0, "sf": 0.5}
    with torch.no_grad():
        assert torch.equal(model(**batch)["loss"], loaded(**batch)["loss"])


def test_config_json_round_trip():
    config = tiny_config(("id", "sf"), loss_weights={"id": 2.0, "sf": 1.0}, pooling="cls")
    again = NLUConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.tags, tuple) and isinstance(again.tasks, tuple)


# ---------------------------------------------------------------- from_pretrained

@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-xlmr"
    torch.manual_seed(123)
    encoder = XLMRobertaModel(XLMRobertaConfig(**ENCODER))
    with torch.no_grad():  # make the weights unmistakable (not what a fresh init would draw)
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    encoder.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in encoder.state_dict().items()}


def test_from_pretrained_loads_the_saved_encoder(pretrained_dir):
    folder, saved = pretrained_dir
    torch.manual_seed(0)
    model = MultiTaskNLU(NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=TAGS, pretrained=str(folder)))
    mine = model.encoder.state_dict()
    assert mine  # mean pooling: no pooler, every other weight comes from the folder
    for key, value in mine.items():
        assert key in saved, key
        assert torch.equal(value, saved[key]), key
    assert model.encoder.config.hidden_size == ENCODER["hidden_size"]
    assert model.config.encoder["vocab_size"] == ENCODER["vocab_size"]


def test_from_pretrained_with_cls_pooling_keeps_the_pooler(pretrained_dir):
    folder, saved = pretrained_dir
    model = MultiTaskNLU(NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=TAGS, pooling="cls",
                                   pretrained=str(folder)))
    assert torch.equal(model.encoder.pooler.dense.weight, saved["pooler.dense.weight"])


def test_pretrained_model_saves_and_loads_without_the_original_folder(pretrained_dir, tmp_path, batch):
    folder, _ = pretrained_dir
    model = MultiTaskNLU(NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=TAGS,
                                   pretrained=str(folder))).eval()
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["pretrained"] = str(tmp_path / "does-not-exist")  # load must not touch it
    config[RECORD_DIGEST] = record_digest(config)  # as if saved so
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = MultiTaskNLU.load(tmp_path / "m")
    assert loaded.config.pretrained is None
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a["intent_logits"], b["intent_logits"])
    assert torch.equal(a["slot_logits"], b["slot_logits"])
    assert math.isfinite(b["loss"].item())


def test_loading_a_model_needs_no_data_stack(tmp_path):
    """A deployment that loads a saved model reads no corpus: neither ``datasets`` nor the
    tokenizer's libraries, nor ``compactnlu.features``, come with ``compactnlu.model``."""
    make_model().save(tmp_path)
    code = (f"import sys; from compactnlu.model import MultiTaskNLU; MultiTaskNLU.load({str(tmp_path)!r}); "
            "print(sorted({'datasets', 'sentencepiece', 'compactnlu.features'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
