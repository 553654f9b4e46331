"""``compactnlu.onnx_runtime``: the ONNX Runtime fp32 export and its int8 dynamic quantization.

The fp32 graph reproduces torch's logits (padding, two different shapes: the axes are
dynamic for real) and ``metrics.predict`` decodes the same predictions from it; the int8
graph is smaller and its logits stay close (within a bound derived from the quantization
steps, and with the same decisions, on CPUs with and without VNNI); 7-bit weights are chosen
exactly where the CPU lacks VNNI, and a full-range artifact warns on such a CPU; a task-pair
model exports only its heads; NaN or inf weights are refused; loading runs no pickle and
leaves no pickled file around.
"""

from __future__ import annotations

import json
import re
import warnings

import datasets
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compactnlu.bench import artifact_size_mb
from compactnlu.compose import LabelSpace
from compactnlu.cpu import ASSUME_NO_VNNI, has_vnni
from compactnlu.features import IGNORE, MultiTaskCollator
from compactnlu.metrics import predict
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.onnx_runtime import CRF_FILE, ONNX_FILE, OnnxNLU, export_onnx
from compactnlu.quant.onnx_int8 import quantize_onnx_dynamic

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
FP32_TOL = 1e-4  # float summation order only: the fp32 graph's worst was 7e-7
# Decisions (intent and domain label sets, Viterbi tag paths) the int8 graph must share with
# torch. Measured on tiny_dataset with an AVX-512 VNNI CPU: 97.5-100% with 7-bit or 8-bit
# weights; 40 examples, so this allows 4 flips per task.
INT8_SAME_DECISIONS = 0.9


def int8_error_bound(logits: torch.Tensor, reduce_range: bool, n_layers: int) -> float:
    """A first-order bound on the int8 graph's logit error, from its quantization steps.

    One int8 matmul with per-tensor symmetric weights (step max|W|/qmax, qmax 127, or 64
    with reduce_range) and uint8 activations (step range/255, range <= 2 max|x|) is off by
    at most eps = 1/(2 qmax) + 1/255 of its output's scale (half a weight step plus half an
    activation step, summed over the row); an int8 embedding row by less. The path to a
    logit runs through the embedding, per layer Q and K (their product makes the attention
    scores), V, the attention output, FFN in and FFN out, then the head: 2 + 6 * n_layers
    steps, each with gain about 1 (LayerNorm after each block), so the errors add. The
    largest |logit| stands for the output's scale. Measured error/bound on an AVX-512 VNNI
    CPU: at most 0.16 (8-bit weights) and 0.13 (7-bit); ORT's saturating u8s8 kernels with
    8-bit weights on an AVX2-only CPU gave 0.33 absolute, about 6x this bound.
    """
    qmax = 64 if reduce_range else 127
    eps = 1 / (2 * qmax) + 1 / 255
    return (2 + 6 * n_layers) * eps * float(logits.abs().max())


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

def test_int8_is_smaller_and_close(student, fp32_dir, int8_dir, dataset):
    assert sorted(p.name for p in int8_dir.iterdir()) == ["config.json", CRF_FILE, ONNX_FILE, "quantization.json"]
    details = json.loads((int8_dir / "quantization.json").read_text())
    assert details["method"] == "onnxruntime_dynamic"
    assert details["weight_type"] == "QInt8" and details["per_channel"] is False
    assert details["reduce_range"] is (not has_vnni())
    # every Linear (2 layers x 6, plus 3 heads) runs as an integer matmul; 3 embedding tables are int8
    assert details["quantized_ops"]["MatMulInteger"] == 2 * 6 + 3
    assert details["quantized_ops"]["DequantizeLinear"] == 3
    assert (int8_dir / CRF_FILE).read_bytes() == (fp32_dir / CRF_FILE).read_bytes()

    fp32_size, int8_size = (fp32_dir / ONNX_FILE).stat().st_size, (int8_dir / ONNX_FILE).stat().st_size
    assert int8_size < 0.4 * fp32_size, (fp32_size, int8_size)  # weights 4 bytes -> 1 (plus scales, graph)
    assert artifact_size_mb(int8_dir) < artifact_size_mb(fp32_dir)

    quantized = OnnxNLU.load(int8_dir, threads=1)
    assert quantized.quantization["method"] == "onnxruntime_dynamic"
    n_layers = student.config.encoder["num_hidden_layers"]
    for i, (rows, length) in enumerate(SHAPES):
        batch = make_batch(10 + i, rows, length)
        want = torch_logits(student, batch)
        errors = max_errors(quantized(**batch), want)
        bounds = {k: int8_error_bound(want[k], details["reduce_range"], n_layers) for k in want}
        assert all(errors[k] <= bounds[k] for k in errors), ((rows, length), errors, bounds)
        assert max(errors.values()) > 0  # it really is a different (quantized) graph

    want, got = run_predict(student, dataset), run_predict(quantized, dataset)
    for column in ("intents_pred", "scenarios_pred", "tags_pred"):
        same = np.mean([a == b for a, b in zip(got[column].tolist(), want[column].tolist())])
        assert same >= INT8_SAME_DECISIONS, (column, same)


def int8_weights(folder) -> np.ndarray:
    """Every int8 weight of a quantized graph (its quantized initializers), flattened."""
    graph = onnx.load(str(folder / ONNX_FILE)).graph
    arrays = [numpy_helper.to_array(init) for init in graph.initializer]
    return np.concatenate([a.ravel().astype(np.int32) for a in arrays if a.dtype == np.int8 and a.size > 1])


@pytest.mark.parametrize("assume_no_vnni", ["1", "0"])
def test_reduce_range_follows_the_cpu(fp32_dir, tmp_path, monkeypatch, assume_no_vnni):
    """7-bit weights ([-64, 64]) exactly where the CPU lacks VNNI (or is told to act so), full
    8 bits ([-127, 127]) elsewhere; quantization.json names the choice and the CPU."""
    monkeypatch.setenv(ASSUME_NO_VNNI, assume_no_vnni)
    folder = quantize_onnx_dynamic(fp32_dir, tmp_path / "int8")
    details = json.loads((folder / "quantization.json").read_text())
    reduced = not has_vnni()
    if assume_no_vnni == "1":
        assert reduced
    assert details["reduce_range"] is reduced
    assert details["quantized_on"]["vnni"] is (not reduced)
    assert details["quantized_on"]["assume_no_vnni"] is (assume_no_vnni == "1")
    assert details["quantized_on"]["cpu"]
    assert int(np.abs(int8_weights(folder)).max()) == (64 if reduced else 127)


def test_full_range_artifact_warns_on_a_cpu_without_vnni(fp32_dir, tmp_path, monkeypatch):
    full = quantize_onnx_dynamic(fp32_dir, tmp_path / "full", reduce_range=False)
    reduced = quantize_onnx_dynamic(fp32_dir, tmp_path / "reduced", reduce_range=True)
    assert int(np.abs(int8_weights(reduced)).max()) == 64
    monkeypatch.setenv(ASSUME_NO_VNNI, "1")
    with pytest.warns(RuntimeWarning, match="no VNNI"):
        OnnxNLU.load(full, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        OnnxNLU.load(reduced, threads=1)
        OnnxNLU.load(fp32_dir, threads=1)


# ---------------------------------------------------------------- non-finite weights

def test_export_refuses_nan_weights(tmp_path):
    model = make_model(encoder=TOY_ENCODER)
    with torch.no_grad():
        model.encoder.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"encoder\.encoder\.layer\.0\.attention\.self\.query\.weight"):
        export_onnx(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_quantization_refuses_an_inf_initializer(fp32_dir, tmp_path):
    model = onnx.load(str(fp32_dir / ONNX_FILE))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.float32
                and numpy_helper.to_array(i).size > 1)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] = np.inf
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    broken = tmp_path / "broken"
    broken.mkdir()
    onnx.save(model, str(broken / ONNX_FILE))
    with pytest.raises(ValueError, match=rf"{ONNX_FILE}.*{re.escape(init.name)}.*inf"):
        quantize_onnx_dynamic(broken, tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


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


def test_session_workers_spin_only_when_asked_and_never_after_a_run(fp32_dir):
    # workers spinning after a run would take the cores from the torch Viterbi that follows it
    sleeping, spinning = OnnxNLU.load(fp32_dir, threads=2), OnnxNLU.load(fp32_dir, threads=2, spinning=True)
    assert not sleeping.spinning and spinning.spinning
    assert not sleeping.spinning_after_runs and not spinning.spinning_after_runs


def test_loading_runs_no_pickle(fp32_dir, int8_dir, refuse_pickle):
    batch = make_batch(0, 2, 6)
    for folder in (fp32_dir, int8_dir):
        model = OnnxNLU.load(folder, threads=1)
        out = model(**batch)
        model.decode_slots(out["slot_logits"], batch["attention_mask"].bool())
        assert {p.suffix for p in folder.iterdir()} <= {".onnx", ".json", ".safetensors"}
