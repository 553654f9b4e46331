"""The precision-controlled model (PC-PTQ) deployed in ONNX Runtime, keeping its bits.

``export_precision_onnx(model, folder, accuracy_level=4)`` writes one ONNX graph in which

- every 4- and 8-bit ``PrecisionLinear`` is ONNX Runtime's ``com.microsoft.MatMulNBits``,
  fed with the layer's STORED integers and scales (nothing is quantized again);
- every 16-bit layer (and any layer the policy left float) is a float ``MatMul``/``Gemm``
  with the stored weight dequantized once, at export;
- a 4- or 8-bit word embedding is ``com.microsoft.GatherBlockQuantized`` on its stored
  integers (ORT 1.32's CPU kernel takes uint8 data with 4 or 8 bits); a 16-bit one is a
  float ``Gather`` of the dequantized table.

plus ``config.json``, ``model.crf.safetensors`` (as ``onnx_runtime.export_onnx`` writes them)
and ``quantization.json`` (method ``onnx_matmulnbits``, bits per group and per layer, block
sizes, accuracy level). ``onnx_runtime.OnnxNLU.load(folder)`` runs it as it is.

How the stored layers map onto the ops (ORT 1.32's op schemas, checked with
``onnxruntime.capi._pybind_state.get_all_operator_schema()``, and its CPU sources
``contrib_ops/cpu/quantization/matmul_nbits.cc`` and ``mlas/lib/qnbitgemm.cpp``):

- MatMulNBits computes ``A @ dequant(B)^T`` with ``dequant = (u - zero_point) * scale`` per
  block of ``block_size`` along K; B is uint8 ``[N, k_blocks, block_size * bits / 8]``, 4-bit
  values two per byte, the first in the low nibble. Without a ``zero_points`` input the
  zero point is ``2^(bits-1)``, so a symmetric signed integer q is stored as
  ``u = q + 2^(bits-1)``: no zero points are written. ``bits`` may be 2, 4 or 8.
- The stored scales are per output row (or per tensor); MatMulNBits wants one per block,
  so each row's scale is repeated over its blocks: same numbers, one float per block.
  ``block_size`` must be a power of two >= 16; the largest power of two dividing K is
  taken, capped at 256 (``MAX_BLOCK``): MLAS has kernels for block sizes 16..256 only, and
  for any other it dequantizes the whole of B on every call. A K with no such divisor
  (not a multiple of 16) gets 16-wide blocks and its rows padded with the zero point.
- ``accuracy_level``: 0 computes with float activations (4-bit: MLAS's fp32 kernel; 8-bit:
  MLAS has no fp32 kernel, so ORT dequantizes B to float on every call and runs sgemm);
  4 quantizes each activation row to int8 per block (symmetric, scale max|x|/127) and
  runs MLAS's int8 kernels (x86 dispatches for AVX2 and up; on the AVX-512 VNNI EPYC this
  was written on, both 4- and 8-bit layers use them: their level-4 logits differ from
  level 0's). Where the CPU's dispatch has no int8 kernel for a width, ORT quietly
  computes that layer as at level 0 (``GetComputeType`` in matmul_nbits.cc).

What the graph does NOT do: the paper's run-time path (``PrecisionLinear.forward``) also
rounds each linear layer's INPUT, per tensor, to the group's bits (4-bit activations for a
4-bit group). MatMulNBits has no such rounding: at level 0 activations stay float, at
level 4 they are rounded to int8 per row and block of K, much finer than 4 or 8 bits per
tensor. So the graph computes the weight-only model (``weight_only_model``) up to float
rounding (level 0) or int8 activation rounding (level 4), and differs from the paper's
path by the paper's own activation rounding; ``logit_error_bound`` bounds both gaps.

Measured (tests/test_onnx_nbits.py's student, width 32, 2 layers; AVX-512 VNNI EPYC):
against the weight-only model, level 0 is off by < 1e-6 and level 4 by up to 0.23 of the
bound; against the paper's path, 0.01-0.5 of the bound (4 seeds, 3 policies, 3 shapes),
decisions 82-100% the same on 200 examples with every group at 4 bits, 88-100% with the
test's mixed policy (the 4-bit domain head's per-tensor input rounding flips the most).

Speed (a timing script outside the tests: medians of 11-25 interleaved repeats, 1 thread,
batch 32 x 24, on a shared 2-core AVX-512 VNNI EPYC). One XLM-R-base-shaped layer
(768/3072): level 4 takes 72-78 ms, level 0 135-143 ms, the fp32 graph 129 ms, ORT's
dynamic int8 graph 47 ms (MLAS's n-bit int8 kernels are built for few rows, as in LLM
decoding; for 768 rows the u8s8 MatMulInteger kernels are faster). The study's encoder
(128/512, 2 layers): every variant 10.5-11 ms but dynamic int8 (6.8 ms); its MatMulNBits
take the time the fp32 MatMuls take. Level 4 is the default: never slower, and faster
where the matrices are large. Block sizes 32..256 at level 4 on the XLM-R layer: 256 the
fastest (72 vs 104 ms at 4 bits), its logits 0.6-1.0% (of the largest) from the
weight-only model's, vs 0.4-0.7% at 32.

Why not ``MatMulInteger``, ORT's own int8 op (``benchmarks/onnx_linear_ops.py``; AVX-512 VNNI
EPYC, 2 threads, 704 rows): on u8s8 (uint8 inputs, int8 weights) it is the fastest op here
(768->3072: 14.6 ms, MatMulNBits 22.7-24.0, float 31.1), but a CPU without VNNI sums u8s8
pairs in int16 (``vpmaddubsw``), which full-range 8-bit stored weights overflow; ORT's own
int8 graph avoids that with 7-bit weights (``reduce_range``), which would not be the stored
integers. The exact alternatives are no faster: u8u8 (weights shifted by 128) 31.8 ms, s8s8
(the paper's symmetric inputs) 103 ms. The script prints whether u8s8 saturates on its CPU.

Nothing here unpickles anything: ONNX protobuf, safetensors and JSON only.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model import MultiTaskNLU, assert_finite
from ..onnx_runtime import LOGITS, ONNX_FILE, PROTOBUF_LIMIT, copy_sidecars, export_onnx
from .groups import precision_groups
from .method import MethodConfig, save_artifact
from .nbits_graph import MIN_BLOCK, NBITS, rewrite_graph, set_ms_opset
from .onnx_method import OnnxMethod
from .quantizer import qmax
from .stored import PrecisionEmbedding, PrecisionLinear, StoredWeight, stored_layers

METHOD = "onnx_matmulnbits"
ACCURACY_LEVEL = 4  # default: int8 activations per block on MLAS's int8 kernels, the faster (module docstring)
ACCURACY_LEVELS = (0, 4)  # float activations, or int8 per block; 1-3 (fp32/fp16/bf16) are 0 on x86


@dataclass(frozen=True)
class NBitsConfig(MethodConfig):
    accuracy_level: int = ACCURACY_LEVEL  # one of ACCURACY_LEVELS

    def __post_init__(self):
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level!r}")


# ---------------------------------------------------------------- the float twin

def weight_only_model(model: nn.Module) -> nn.Module:
    """A copy of a precision-controlled model with every stored layer turned back into a
    float ``nn.Linear`` / ``nn.Embedding`` holding the DEQUANTIZED stored weight: the
    weights of the policy without the paper's activation rounding. What the exported
    graph computes at accuracy level 0, and what is handed to the exporter."""
    out = copy.deepcopy(model).cpu().eval()
    for name, module in list(out.named_modules()):
        if isinstance(module, PrecisionLinear):
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    new.bias.copy_(module.bias)
        elif isinstance(module, PrecisionEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
            with torch.no_grad():
                new.weight.copy_(module.dequantized_weight())
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, new)
    return out.eval()


def group_bits(model: nn.Module) -> dict[str, int]:
    """Bits of each precision group holding stored layers, at the finest grouping
    (per layer; a policy over shared groups shows as equal bits across layers)."""
    has_embedding = isinstance(model.encoder.embeddings.word_embeddings, StoredWeight)
    out = {}
    for group, members in precision_groups(model, per_layer=True, embedding=has_embedding).items():
        bits = {m.bits for _, m in members if isinstance(m, StoredWeight)}
        if len(bits) > 1:
            raise ValueError(f"group {group} mixes {sorted(bits)} bits; a policy gives a group one width")
        if bits:
            out[group] = bits.pop()
    return out


# ---------------------------------------------------------------- export

def export_precision_onnx(model: MultiTaskNLU, folder: Path | str, accuracy_level: int = ACCURACY_LEVEL) -> Path:
    """Write the precision-controlled ``model`` (``apply_policy`` / ``load_quantized``) to
    ``folder`` as one ONNX graph keeping its bits (module docstring), with ``config.json``,
    ``model.crf.safetensors`` and ``quantization.json``; atomically; return the folder.
    ``model`` is left as it is (a CPU copy is exported).

    The graph is the dynamo export of ``weight_only_model(model)`` (``onnx_runtime.export_onnx``:
    same inputs, outputs and dynamic axes as the fp32 export), with the 4/8-bit layers'
    float weights then swapped for their stored integers.
    """
    return save_artifact(ONNX_NBITS, model, folder, NBitsConfig(accuracy_level))


class OnnxNBits(OnnxMethod):
    """A precision-controlled model as one ONNX Runtime graph keeping its bits (settings:
    ``NBitsConfig``); loads back as an ``OnnxNLU``."""

    name = METHOD
    config = NBitsConfig

    def check(self, model: MultiTaskNLU, folder: Path, details: dict) -> None:
        NBitsConfig.from_record(details)  # a hand-made record is held to the same settings
        layers = stored_layers(model)
        if not layers:
            raise ValueError("the model holds no PrecisionLinear or PrecisionEmbedding; export_onnx exports a float "
                             "model")
        assert_finite({f"{n}.scale": m.scale for n, m in layers.items()}, f"export_precision_onnx to {folder}")
        for name, layer in layers.items():
            if isinstance(layer, PrecisionEmbedding) and layer.bits in NBITS and layer.cols % MIN_BLOCK:
                # GatherBlockQuantized has no width attribute: it would return whole padded blocks
                raise ValueError(f"{name}: a {layer.bits}-bit embedding {layer.cols} wide is not a whole number of "
                                 f"{MIN_BLOCK}-wide blocks, so GatherBlockQuantized would return padded rows and the "
                                 "graph would not load; keep it at 16 bits or use a width divisible by 16")

    def write(self, model: MultiTaskNLU, tmp: Path, details: dict) -> dict:
        import onnx
        import onnxruntime

        accuracy_level = NBitsConfig.from_record(details).accuracy_level
        model = copy.deepcopy(model).cpu().eval()
        layers = stored_layers(model)
        with tempfile.TemporaryDirectory(prefix="nbits-") as scratch:
            exported = export_onnx(weight_only_model(model), Path(scratch) / "fp32")
            graph_model = onnx.load(str(exported / ONNX_FILE))
            ops = rewrite_graph(graph_model.graph, layers, accuracy_level)
            set_ms_opset(graph_model)
            if graph_model.ByteSize() >= PROTOBUF_LIMIT:
                raise ValueError("the rewritten graph does not fit one .onnx file (2 GiB protobuf limit)")
            onnx.save(graph_model, str(tmp / ONNX_FILE))
            copy_sidecars(exported, tmp)
        float_layers = {name: {"op": "float", "bits": layer.bits} for name, layer in layers.items() if name not in ops}
        return {"accuracy_level": accuracy_level,
                "activations": ("float" if accuracy_level == 0 else "int8 per row and block of K") +
                               " in MatMulNBits; not rounded to the group's bits as in the paper's path",
                "per_channel": all(layer.per_channel for layer in layers.values()),
                "groups": group_bits(model), "layers": {**ops, **float_layers},
                "onnxruntime": onnxruntime.__version__}


ONNX_NBITS = OnnxNBits()


# ---------------------------------------------------------------- how far from the paper's path

def _input_crests(model: nn.Module, batch: dict) -> dict[str, float]:
    """``max|x| / rms(x)`` of each ``PrecisionLinear``'s input over ``batch`` (per tensor, as
    the paper's path scales it), by module name."""
    crests, handles = {}, []

    def record(name):
        def hook(module, args, output):
            x = args[0].detach().double()
            rms = float(x.pow(2).mean().sqrt())
            crests[name] = float(x.abs().max()) / rms if rms > 0 else 0.0
        return hook

    for name, module in model.named_modules():
        if isinstance(module, PrecisionLinear):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return crests


def _stages(model: nn.Module, task: str) -> list[str]:
    """The linear layers on the way to ``task``'s logits, one per stage: per encoder layer
    the Q/K/V projections (one stage: they take the same input, rounded once on the paper's
    path, and Q is named for it), the attention output, the MLP's two; the pooler; the head."""
    stages = []
    for i in range(len(model.encoder.encoder.layer)):
        prefix = f"encoder.encoder.layer.{i}"
        stages += [f"{prefix}.attention.self.query", f"{prefix}.attention.output.dense",
                   f"{prefix}.intermediate.dense", f"{prefix}.output.dense"]
    if getattr(model.encoder, "pooler", None) is not None and task in ("id", "dc"):
        stages.append("encoder.pooler.dense")
    return stages + [f"{task}_head"]


def logit_error_bound(model: nn.Module, batch: dict, accuracy_level: int, against: str = "paper"
                      ) -> dict[str, float]:
    """A first-order bound on |graph logit - torch logit| per output on ``batch``, where the
    torch side is the paper's path (``against="paper"``: ``model`` itself) or the weight-only
    model (``"weight_only"``).

    The two sides differ only in how a linear layer's input is rounded: the paper's path
    rounds it per tensor to the layer's bits (step ``max|x| / qmax``), the graph not at all
    (level 0) or to int8 per block on MatMulNBits layers (level 4, step at most
    ``max|x| / 127``). Rounding with step s adds an error uniform in +-s/2 to each element,
    RMS ``s / sqrt(12)``, independent of the weights, so the layer's output moves by
    ``crest / (sqrt(12) qmax)`` of its RMS, with ``crest = max|x| / rms(x)`` measured on
    the batch (``_input_crests``). Each stage's relative error carries on with a gain of
    about 1 (LayerNorm after every block), the stages on the way to a logit add (not in
    quadrature: conservative), and the largest |logit| stands for the output's RMS
    (conservative again). Embeddings are the same stored integers on both sides: nothing.
    """
    if against not in ("paper", "weight_only"):
        raise ValueError(f"against must be 'paper' or 'weight_only', got {against!r}")
    crests = _input_crests(model, batch)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    bounds = {}
    for task in model.tasks:
        relative = 0.0
        for name in _stages(model, task):
            layer = model.get_submodule(name)
            if not isinstance(layer, PrecisionLinear):
                continue  # float on both sides
            steps = (1 / qmax(layer.bits) if against == "paper" else 0.0) + \
                    (1 / 127 if accuracy_level == 4 and layer.bits in NBITS else 0.0)
            relative += crests[name] / math.sqrt(12) * steps
        bounds[LOGITS[task]] = relative * float(out[LOGITS[task]].abs().max())
    return bounds
