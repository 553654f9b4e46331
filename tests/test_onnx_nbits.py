"""``compactnlu.quant.onnx_nbits``: the precision-controlled model as one ONNX Runtime graph.

The packing of the stored integers decodes (by MatMulNBits' own rule) to exactly the
stored weights; the graph holds MatMulNBits for exactly the 4/8-bit layers (with their
bits), float MatMul for the 16-bit ones and GatherBlockQuantized for a 4-bit embedding;
it is smaller than the fp32 export; at accuracy level 0 it reproduces the weight-only model
to float rounding, at level 4 within the int8 activation-rounding bound; against the
paper's path it stays within the bound derived from the paper's activation rounding, with
the same decisions at a high rate; ``OnnxNLU`` loads it without pickle.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compactnlu.bench import artifact_size_mb
from compactnlu.onnx_runtime import CRF_FILE, ONNX_FILE, OnnxNLU, export_onnx
from compactnlu.quant.groups import apply_policy, precision_groups
from compactnlu.quant.nbits_graph import block_size_for, dequantize_nbits, matmul_nbits_inputs, unsigned_blocks
from compactnlu.quant.onnx_nbits import METHOD, export_precision_onnx, logit_error_bound, weight_only_model
from compactnlu.quant.stored import PrecisionEmbedding, PrecisionLinear
from test_onnx_runtime import TOY_ENCODER, make_batch, make_model, run_predict, tiny_dataset

# Every kind of layer the export meets: 4-bit and 8-bit encoder groups and heads (MatMul
# and, for the pooled heads, Gemm in the exported graph), 16-bit ones (float), a 4-bit
# embedding. Widths 32 (hidden) and 64 (MLP): blocks of 32 and 64.
POLICY = {"embedding": 4, "layer0.attention": 4, "layer0.mlp": 8, "layer1.attention": 16, "layer1.mlp": 4,
          "head.id": 8, "head.dc": 4, "head.sf": 16}
LEVELS = (0, 4)
SHAPES = [(3, 9), (5, 17), (32, 24)]  # batch, sequence; the last is the study's benchmark shape
FLOAT_TOL = 1e-4  # level 0 against the weight-only model: float summation order only (worst seen 6e-7)
# Decisions (intent and domain label sets, Viterbi tag paths) on tiny_dataset's 40 examples.
# Against the weight-only model at level 4, int8 activations per block: 99-100% seen on 200
# examples. Against the paper's path, whose 4-bit activation rounding per tensor the graph
# does not do: 88-100% seen for this policy (the 4-bit domain head flips the most), 82-100%
# with every group at 4 bits; random-init logits sit near the 0 threshold, so 0.8 allows 8 flips.
SAME_AS_WEIGHT_ONLY_L4 = 0.95
SAME_AS_PAPER_PATH = 0.8
DECISIONS = ("intents_pred", "scenarios_pred", "tags_pred")


@pytest.fixture(scope="module")
def student():
    return make_model()


@pytest.fixture(scope="module")
def pc_model(student):
    return apply_policy(student, POLICY, precision_groups(student, embedding=True)).eval()


@pytest.fixture(scope="module")
def fp32_dir(student, tmp_path_factory):
    return export_onnx(student, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="module")
def nbits_dirs(pc_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("nbits")
    return {level: export_precision_onnx(pc_model, root / f"level{level}", accuracy_level=level) for level in LEVELS}


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


def logits(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {k: out[k] for k in ("intent_logits", "domain_logits", "slot_logits")}


def max_errors(a, b) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


def same_decisions(got, want) -> dict[str, float]:
    return {c: float(np.mean([a == b for a, b in zip(got[c].tolist(), want[c].tolist())])) for c in DECISIONS}


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("k, block", [(16, 16), (32, 32), (64, 64), (96, 32), (128, 128), (768, 256), (3072, 256),
                                      (48, 16), (40, 16), (20, 16)])
def test_block_size_is_the_largest_power_of_two_dividing_k_up_to_256(k, block):
    assert block_size_for(k) == block


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("k", [64, 40])  # 40: no power-of-two block >= 16 divides it, rows are padded
def test_matmulnbits_inputs_decode_to_the_stored_weight(bits, per_channel, k):
    torch.manual_seed(bits + k)
    layer = PrecisionLinear.from_linear(nn.Linear(k, 6), bits, per_channel)
    b, scales, block = matmul_nbits_inputs(layer)
    k_blocks = -(-k // block)
    assert b.dtype == np.uint8 and b.shape == (6, k_blocks, block * bits // 8)
    assert scales.dtype == np.float32 and scales.shape == (6, k_blocks)
    decoded = dequantize_nbits(b, scales, bits, k)  # MatMulNBits' rule: (u - 2^(bits-1)) * scale per block
    assert np.array_equal(decoded, layer.dequantized_weight().numpy())  # exactly: the stored numbers, not re-quantized
    if k % block:  # the padding decodes to zeros (the zero point), so it adds nothing to A @ B^T
        zero_point = 2 ** (bits - 1)
        codes = np.stack([b & 0xF, b >> 4], -1).reshape(6, -1) if bits == 4 else b.reshape(6, -1)
        assert (codes[:, k:] == zero_point).all()


def test_4bit_codes_are_the_stored_bytes_with_the_sign_bit_flipped():
    """Stored int4 is two's complement, low nibble first, as MatMulNBits packs; q + 8 flips
    each nibble's top bit, so the blob is the stored bytes XOR 0x88, nothing recomputed."""
    torch.manual_seed(0)
    layer = PrecisionLinear.from_linear(nn.Linear(64, 5), 4)
    b, _, _ = matmul_nbits_inputs(layer)
    assert np.array_equal(b.reshape(5, -1), layer.qweight.numpy() ^ 0x88)


def test_embedding_blocks_decode_to_the_stored_table():
    torch.manual_seed(1)
    for bits in (4, 8):
        table = PrecisionEmbedding.from_embedding(nn.Embedding(50, 32), bits)
        data = unsigned_blocks(table, 32)
        decoded = dequantize_nbits(data, table.scale.numpy().repeat(1, axis=1), bits, 32)
        assert np.array_equal(decoded, table.dequantized_weight().numpy())


# ---------------------------------------------------------------- the graph

def graph_of(folder):
    return onnx.load(str(folder / ONNX_FILE)).graph


def attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("level", LEVELS)
def test_graph_holds_matmulnbits_for_exactly_the_4_and_8_bit_groups(pc_model, nbits_dirs, level):
    folder = nbits_dirs[level]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", CRF_FILE, ONNX_FILE, "quantization.json"]
    graph = graph_of(folder)
    initializers = {i.name for i in graph.initializer}
    groups = precision_groups(pc_model, embedding=True)
    want_nbits = {name: POLICY[g] for g, members in groups.items() for name, m in members
                  if isinstance(m, PrecisionLinear) and POLICY[g] in (4, 8)}
    nbits = {n.name.rsplit("/", 1)[0]: attributes(n) for n in graph.node if n.op_type == "MatMulNBits"}
    assert {name: a["bits"] for name, a in nbits.items()} == want_nbits
    assert all(n.domain == "com.microsoft" for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    for name, a in nbits.items():
        layer = pc_model.get_submodule(name)
        assert (a["K"], a["N"], a["accuracy_level"]) == (layer.in_features, layer.out_features, level)
        assert a["block_size"] == layer.in_features  # 32 and 64: the whole row is one block
    # 16-bit groups: a float MatMul (or Gemm) on a constant weight, one per layer
    n_16bit = sum(1 for g, members in groups.items() for _, m in members if POLICY[g] == 16)
    float_linear = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers]
    assert len(float_linear) == n_16bit == 5  # layer 1's Q, K, V, attention output; the slot head
    # the 4-bit embedding is a quantized gather; position and token-type tables stay float Gathers
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and attributes(gathers[0])["bits"] == 4
    # no float copy of a quantized weight is left behind
    floats = {numpy_helper.to_array(i).tobytes() for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for name in [*want_nbits, "encoder.embeddings.word_embeddings"]:
        weight = pc_model.get_submodule(name).dequantized_weight().numpy()
        assert weight.tobytes() not in floats and np.ascontiguousarray(weight.T).tobytes() not in floats, name

    details = json.loads((folder / "quantization.json").read_text())
    assert details["method"] == METHOD and details["accuracy_level"] == level
    assert details["groups"] == POLICY and details["per_channel"] is True
    assert {n: d["block_size"] for n, d in details["layers"].items() if d["op"] == "MatMulNBits"} == \
        {n: a["block_size"] for n, a in nbits.items()}


def test_file_is_smaller_than_the_fp32_export(fp32_dir, nbits_dirs):
    fp32_size = (fp32_dir / ONNX_FILE).stat().st_size
    for folder in nbits_dirs.values():
        size = (folder / ONNX_FILE).stat().st_size
        # measured 0.37: most weights at 4 bits (1/8 of fp32), a few at 8 (1/4), 16-bit ones in fp32
        assert size < 0.5 * fp32_size, (size, fp32_size)
        assert artifact_size_mb(folder) < artifact_size_mb(fp32_dir)
        assert (folder / CRF_FILE).read_bytes() == (fp32_dir / CRF_FILE).read_bytes()


# ---------------------------------------------------------------- agreement

def test_level0_reproduces_the_weight_only_model(pc_model, nbits_dirs, dataset):
    """Float activations: the graph is the weight-only model (stored weights, no activation
    rounding) up to float summation order, decisions included."""
    reference = weight_only_model(pc_model)
    graph = OnnxNLU.load(nbits_dirs[0], threads=1)
    for i, (rows, length) in enumerate(SHAPES):
        batch = make_batch(i, rows, length)
        errors = max_errors(graph(**batch), logits(reference, batch))
        assert max(errors.values()) < FLOAT_TOL, ((rows, length), errors)
    assert same_decisions(run_predict(graph, dataset), run_predict(reference, dataset)) == dict.fromkeys(DECISIONS, 1.0)


def test_level4_is_within_the_int8_activation_bound_of_the_weight_only_model(pc_model, nbits_dirs, dataset):
    reference = weight_only_model(pc_model)
    graph = OnnxNLU.load(nbits_dirs[4], threads=1)
    for i, (rows, length) in enumerate(SHAPES):
        batch = make_batch(10 + i, rows, length)
        errors = max_errors(graph(**batch), logits(reference, batch))
        bounds = logit_error_bound(pc_model, batch, accuracy_level=4, against="weight_only")
        assert all(errors[k] <= bounds[k] for k in errors), ((rows, length), errors, bounds)  # 0.0-0.23 of it seen
        # int8 activations really are in use (MLAS has 4-bit int8 kernels on AVX2 and up)
        assert max(errors.values()) > FLOAT_TOL, errors
    same = same_decisions(run_predict(graph, dataset), run_predict(reference, dataset))
    assert min(same.values()) >= SAME_AS_WEIGHT_ONLY_L4, same


@pytest.mark.parametrize("level", LEVELS)
def test_agrees_with_the_paper_path_within_its_activation_rounding(pc_model, nbits_dirs, dataset, level):
    graph = OnnxNLU.load(nbits_dirs[level], threads=1)
    for i, (rows, length) in enumerate(SHAPES):
        batch = make_batch(20 + i, rows, length)
        errors = max_errors(graph(**batch), logits(pc_model, batch))
        bounds = logit_error_bound(pc_model, batch, accuracy_level=level)
        assert all(errors[k] <= bounds[k] for k in errors), ((rows, length), errors, bounds)  # 0.01-0.5 of it seen
    same = same_decisions(run_predict(graph, dataset), run_predict(pc_model, dataset))
    assert min(same.values()) >= SAME_AS_PAPER_PATH, same


def test_task_pair_with_pooler_and_per_tensor_scales(tmp_path):
    """A cls-pooling task pair: the pooler is a group, the pooled head a Gemm in the export;
    per-tensor scales are repeated over every row and block; the word embedding left float."""
    model = make_model(tasks=("id", "sf"), encoder=TOY_ENCODER, pooling="cls")
    groups = precision_groups(model)
    policy = {"pooler": 4, "head.id": 8, "layer0.attention": 4, "layer0.mlp": 16, "head.sf": 8}
    pc = apply_policy(model, policy, groups, per_channel=False).eval()
    folder = export_precision_onnx(pc, tmp_path / "pair", accuracy_level=0)
    graph = graph_of(folder)
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 1 + 1 + 4 + 1
    assert not any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    details = json.loads((folder / "quantization.json").read_text())
    assert details["per_channel"] is False and details["groups"] == policy
    loaded = OnnxNLU.load(folder, threads=1)
    assert loaded.output_names == ["intent_logits", "slot_logits"]
    batch = make_batch(0, 3, 8, vocab=TOY_ENCODER["vocab_size"])
    got = loaded(**batch)
    with torch.no_grad():
        want = weight_only_model(pc)(**batch)
    assert max(float((got[k] - want[k]).abs().max()) for k in got) < FLOAT_TOL


def test_refusals(student, pc_model, tmp_path):
    with pytest.raises(ValueError, match="accuracy_level"):
        export_precision_onnx(pc_model, tmp_path / "bad", accuracy_level=2)
    with pytest.raises(ValueError, match="no PrecisionLinear"):
        export_precision_onnx(student, tmp_path / "float")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "float").exists()


def test_an_embedding_that_is_not_whole_blocks_wide_is_refused_before_writing(tmp_path):
    # GatherBlockQuantized returns whole 16-wide blocks: a 40-wide table would come back 48 wide
    model = make_model(encoder={**TOY_ENCODER, "hidden_size": 40})
    groups = precision_groups(model, embedding=True)
    pc = apply_policy(model, {**{group: 8 for group in groups}, "embedding": 4}, groups).eval()
    with pytest.raises(ValueError, match="embedding 40 wide"):
        export_precision_onnx(pc, tmp_path / "padded")
    assert not (tmp_path / "padded").exists()
    pc = apply_policy(model, {**{group: 8 for group in groups}, "embedding": 16}, groups).eval()
    assert OnnxNLU.load(export_precision_onnx(pc, tmp_path / "float_table"), threads=1).output_names


def test_loading_runs_no_pickle(nbits_dirs, refuse_pickle):
    batch = make_batch(0, 2, 6)
    for folder in nbits_dirs.values():
        model = OnnxNLU.load(folder, threads=1)
        assert model.quantization["method"] == METHOD
        out = model(**batch)
        model.decode_slots(out["slot_logits"], batch["attention_mask"].bool())
        assert {p.suffix for p in folder.iterdir()} <= {".onnx", ".json", ".safetensors"}
