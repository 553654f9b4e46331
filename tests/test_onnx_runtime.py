"""``compactnlu.onnx_runtime``: the ONNX Runtime fp32 export and its int8 dynamic quantization.

The fp32 graph reproduces torch's logits (padding, two different shapes: the axes are
dynamic for real) and ``metrics.predict`` decodes the same predictions from it; the int8
graph is smaller and its logits stay close; a task-pair model exports only its heads;
loading runs no pickle and leaves no pickled file around.
"""

from __future__ import annotations

import json
import pickle

import datasets
import numpy as np
import pytest
import torch

from compactnlu.bench import artifact_size_mb
from compactnlu.compose import LabelSpace
from compactnlu.features import IGNORE, MultiTaskCollator
from compactnlu.metrics import predict
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.onnx_runtime import CRF_FILE, ONNX_FILE, OnnxNLU, export_onnx, quantize_onnx_dynamic

# Bigger than the other tests' toy encoder (vocab 50, width 16) so that weights, not the
# graph's structure, make up most of the file, as in a real model: the int8 size test
# then measures what quantization does. Still exports in seconds.
ENCODER = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
TOY_ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
LABELS = LabelSpace(intents=("i0", "i1", "i2", "i3"), scenarios=("d0", "d1", "d2"), slot_types=("a", "b"))
TAGS = LABELS.tags  # O, B-a, I-a, B-b, I-b
ALL_LOGITS = ("intent_logits", "domain_logits", "slot_logits")
FP32_TOL = 1e-4
# int8 (QInt8 per-tensor weights, uint8 dynamic activations), measured max |error| against
# torch over these shapes and (8, 38), (16, 30): intent 0.008, domain 0.006, slot 0.024, for
# logits of magnitude up to 0.56, 0.31 and 1.8. The fp32 graph's worst was 7e-7. On 200
# tiny_dataset examples the int8 graph's decisions matched torch's for 98% of intent sets,
# 100% of domain sets and 99.5% of tag sequences.
INT8_TOL = 0.06


def make_model(tasks=("id", "dc", "sf"), encoder=ENCODER, seed=0, **kw) -> MultiTaskNLU:
    torch.manual_seed(seed)
    config = NLUConfig(n_intents=len(LABELS.intents), n_domains=len(LABELS.scenarios), tags=TAGS, tasks=tasks,
                       encoder=dict(encoder), **kw)
    model = MultiTaskNLU(config).eval()
    if "sf" in tasks:  # trained-looking transitions, so that Viterbi paths are not argmax paths
        with torch.no_grad():
            for p in model.crf.parameters():
                p.copy_(torch.randn(p.shape) * 2)
    return model


def make_batch(seed: int, rows: int, length: int, vocab: int = ENCODER["vocab_size"]) -> dict[str, torch.Tensor]:
    """``<s> tokens </s> <pad>...``; row r is r tokens shorter (at least 3), so most rows pad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), 1)
    for r in range(rows):
        n = max(length - r, 3)
        ids[r, 0], ids[r, n - 1] = 0, 2
        ids[r, 1:n - 1] = torch.randint(3, vocab, (n - 2,), generator=g)
    return dict(input_ids=ids, attention_mask=(ids != 1).long())


SHAPES = [(3, 9), (5, 17), (1, 4)]  # batch, sequence: different from the export's example and each other


def torch_logits(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: out[k] for k in ALL_LOGITS if k in out}


def max_errors(a: dict, b: dict) -> dict[str, float]:
    assert set(a) == set(b)
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


@pytest.fixture(scope="module")
def student() -> MultiTaskNLU:
    return make_model()


@pytest.fixture(scope="module")
def fp32_dir(student, tmp_path_factory):
    return export_onnx(student, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, tmp_path_factory):
    return quantize_onnx_dynamic(fp32_dir, tmp_path_factory.mktemp("onnx") / "int8")


# ---------------------------------------------------------------- fp32

def test_export_writes_the_deployed_files(student, fp32_dir):
    assert sorted(p.name for p in fp32_dir.iterdir()) == ["config.json", CRF_FILE, ONNX_FILE]
    assert NLUConfig.from_json((fp32_dir / "config.json").read_text()) == student.config
    # the CRF file is counted as part of the artifact
    assert artifact_size_mb(fp32_dir) == pytest.approx(sum(p.stat().st_size for p in fp32_dir.iterdir()) / 1e6)


def test_fp32_logits_match_torch_for_several_shapes(student, fp32_dir):
    onnx_model = OnnxNLU.load(fp32_dir, threads=1)
    assert onnx_model.tasks == student.tasks
    assert onnx_model.eval() is onnx_model
    for i, (rows, length) in enumerate(SHAPES):
        batch = make_batch(i, rows, length)
        batch["slot_labels"] = torch.zeros(rows, length, dtype=torch.long)  # ignored, like any extra key
        got = onnx_model(**batch)
        want = torch_logits(student, batch)
        assert set(got) == set(ALL_LOGITS)
        for key in got:
            assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape, key
        errors = max_errors(got, want)
        assert max(errors.values()) < FP32_TOL, ((rows, length), errors)


def tiny_dataset(n: int = 40, seed: int = 3) -> datasets.Dataset:
    """Composed-style examples of 2-12 words, some words split into two subwords."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        n_words = int(rng.integers(2, 13))
        ids, slot_labels, tags = [0], [IGNORE], []
        for _ in range(n_words):
            tag = int(rng.integers(len(TAGS)))
            tags.append(TAGS[tag])
            pieces = int(rng.integers(1, 3))
            ids += rng.integers(3, ENCODER["vocab_size"], pieces).tolist()
            slot_labels += [tag] + [IGNORE] * (pieces - 1)
        ids.append(2)
        slot_labels.append(IGNORE)
        intent_ids = sorted(set(rng.integers(len(LABELS.intents), size=int(rng.integers(1, 3))).tolist()))
        scenario_ids = sorted(set(rng.integers(len(LABELS.scenarios), size=int(rng.integers(1, 3))).tolist()))
        rows.append(dict(uid=str(k), locale=("hi-IN", "ta-IN")[k % 2], n_parts=len(intent_ids),
                         intents=[LABELS.intents[i] for i in intent_ids],
                         scenarios=[LABELS.scenarios[i] for i in scenario_ids], tags=tags,
                         input_ids=ids, attention_mask=[1] * len(ids), slot_labels=slot_labels,
                         n_subwords=len(ids), intent_ids=intent_ids, scenario_ids=scenario_ids))
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


def run_predict(model, dataset):
    collator = MultiTaskCollator(pad_token_id=1, n_intents=len(LABELS.intents), n_scenarios=len(LABELS.scenarios))
    return predict(model, dataset, collator, LABELS, batch_size=8)


def test_predict_gives_the_same_decisions_as_torch(student, fp32_dir, dataset):
    """Identical decoded predictions (label sets, top intent, Viterbi tag paths); the
    reported top probability agrees to float32 rounding, not bit for bit."""
    want = run_predict(student, dataset)
    got = run_predict(OnnxNLU.load(fp32_dir, threads=1), dataset)
    for column in ("intents_pred", "scenarios_pred", "intent_top", "tags_pred"):
        assert got[column].tolist() == want[column].tolist(), column
    assert np.allclose(got.intent_top_prob, want.intent_top_prob, atol=1e-5)
    # not a vacuous comparison: the CRF's paths differ from the per-word argmax somewhere
    assert any(len(set(t)) > 1 for t in got.tags_pred)
    assert np.isnan(got.attrs["eval_loss"])  # no labels-based loss from the ONNX graph


# ---------------------------------------------------------------- int8

def test_int8_is_smaller_and_close(student, fp32_dir, int8_dir):
    assert sorted(p.name for p in int8_dir.iterdir()) == ["config.json", CRF_FILE, ONNX_FILE, "quantization.json"]
    details = json.loads((int8_dir / "quantization.json").read_text())
    assert details["method"] == "onnxruntime_dynamic"
    assert details["weight_type"] == "QInt8" and details["per_channel"] is False
    # every Linear (2 layers x 6, plus 3 heads) runs as an integer matmul; 3 embedding tables are int8
    assert details["quantized_ops"]["MatMulInteger"] == 2 * 6 + 3
    assert details["quantized_ops"]["DequantizeLinear"] == 3
    assert (int8_dir / CRF_FILE).read_bytes() == (fp32_dir / CRF_FILE).read_bytes()

    fp32_size, int8_size = (fp32_dir / ONNX_FILE).stat().st_size, (int8_dir / ONNX_FILE).stat().st_size
    assert int8_size < 0.4 * fp32_size, (fp32_size, int8_size)  # weights 4 bytes -> 1 (plus scales, graph)
    assert artifact_size_mb(int8_dir) < artifact_size_mb(fp32_dir)

    quantized = OnnxNLU.load(int8_dir, threads=1)
    assert quantized.quantization["method"] == "onnxruntime_dynamic"
    for i, (rows, length) in enumerate(SHAPES):
        batch = make_batch(10 + i, rows, length)
        errors = max_errors(quantized(**batch), torch_logits(student, batch))
        assert max(errors.values()) < INT8_TOL, ((rows, length), errors)
        assert max(errors.values()) > 0  # it really is a different (quantized) graph


# ---------------------------------------------------------------- task subsets, threads, pickle

def test_task_pair_model_exports_only_its_logits(tmp_path):
    model = make_model(tasks=("id", "sf"), encoder=TOY_ENCODER, pooling="cls").train()
    folder = export_onnx(model, tmp_path / "idsf")
    assert model.training  # the caller's model is left as it was

    loaded = OnnxNLU.load(folder, threads=1)
    assert loaded.tasks == ("id", "sf")
    assert loaded.output_names == ["intent_logits", "slot_logits"]
    batch = make_batch(0, 3, 8, vocab=TOY_ENCODER["vocab_size"])
    got = loaded(**batch)
    want = torch_logits(model.eval(), batch)
    assert set(got) == set(want) == {"intent_logits", "slot_logits"}
    assert max(max_errors(got, want).values()) < FP32_TOL
    word_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    word_mask[:, 1:4] = True
    assert loaded.decode_slots(got["slot_logits"], word_mask) == model.decode_slots(want["slot_logits"], word_mask)


def test_session_threads(fp32_dir):
    assert OnnxNLU.load(fp32_dir, threads=2).threads == 2
    assert OnnxNLU.load(fp32_dir).threads == torch.get_num_threads()


def test_loading_runs_no_pickle(fp32_dir, int8_dir, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    batch = make_batch(0, 2, 6)
    for folder in (fp32_dir, int8_dir):
        model = OnnxNLU.load(folder, threads=1)
        out = model(**batch)
        model.decode_slots(out["slot_logits"], batch["attention_mask"].bool())
        assert {p.suffix for p in folder.iterdir()} <= {".onnx", ".json", ".safetensors"}
