"""The fast run-time path of a precision-controlled model: the stored integers on fast CPU kernels.

The paper's path (``PrecisionLinear``) dequantizes each weight and fake-quantizes its
input in float on every call. Here the same stored integers and scales run on one of:

- **``int_mm``** (≤ 8 bits): the input is quantized per tensor to the layer's bits exactly
  as the paper's path does (symmetric, scale ``max|x|/qmax``), the integers are multiplied
  by ``torch._int_mm`` (int8 × int8 → int32, exact), and the int32 result is rescaled by
  ``s_x · s_w``: the paper's arithmetic, only the accumulation is exact instead of float.
  Fast with VNNI (oneDNN); a naive loop, 30-50× slower than float, without it.
- **``fbgemm``** (≤ 8 bits): torch's dynamic quantized linear on the stored integers as a
  per-channel qint8 weight (zero points 0). fbgemm quantizes the input itself, per tensor,
  asymmetric, to 7 bits (``reduce_range=True``, as torch's x86 dynamic qconfig: without VNNI
  uint8 × int8 pair sums saturate int16 at 8 bits). A layer stored in fewer than 7 bits has
  its input rounded to its own bits first, as on the paper's path; otherwise fbgemm would
  compute a more precise model than the one evaluated. Not the paper's arithmetic: its
  agreement is measured.
- **``dequant``** (any bits; the floor): the weight dequantized once, at load, the input
  fake-quantized exactly as the paper's path does, then ``F.linear``: the paper's numbers,
  without dequantizing the weight on every call. 16-bit layers always run here, their input
  not rounded (16-bit rounding moves it by under 2e-5 of its range).
- **``int4pack``** (an option for 4-bit layers): torch's weight-only int4 kernel
  (``_weight_int4pack_mm_for_cpu``), the input fake-quantized to 4 bits and cast to bfloat16
  (the kernel's input type on CPU), so results differ by bf16 rounding.

``to_fast(model)`` picks, per layer shape and number of rows, the fastest of ``dequant``,
``int_mm`` and ``fbgemm`` as measured on this CPU (``kernels``: a short micro-benchmark, cached
per machine; a layer whose choice differs between row counts dispatches on each call's rows,
``ByRowsLinear``), so the fast path is never slower than the floor. ``kernel_summary`` says what
each layer runs.
How far each kernel agrees with the paper's path is measured (``agreement``), not assumed.
"""

from __future__ import annotations

import bisect
import copy
import math
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..interface import IGNORE, NLUModel, decide
from . import kernels
from .kernels import CANDIDATES, DEFAULT_ROWS, FLOOR, STUDY_ROWS
from .quantizer import fake_quantize, qmax, qmin
from .stored import PrecisionEmbedding, PrecisionLinear

KERNELS = ("auto", "int_mm", "fbgemm", "dequant", "int4pack")
FBGEMM_INPUT_BITS = 7  # fbgemm's activation grid with reduce_range: uint8 values 0..127
_INT4_GROUP = 128  # the int4 kernel's scale group along K (it accepts 32..256); every group shares the row's scale


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def quantize_input(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper path's input integers (as float) and step: the same numbers as
    ``fake_quantize(x, bits) == integers * step``, in fewer passes over ``x`` (one ``aminmax``
    for ``max|x|``, rounding and clamping in place), which matters when K is large and N small."""
    x = x.float()
    low, high = torch.aminmax(x)
    amax = torch.maximum(-low, high)
    step = amax / qmax(bits)
    step = torch.where(step > 0, step, torch.ones_like(step))  # zero (or underflowing): step 1, as absmax_scale
    return (x / step).round_().clamp_(qmin(bits), qmax(bits)), step


class IntMatmulLinear(nn.Module):
    """``y = s_x · s_w · (q_x @ q_wᵀ) + b`` with ``q_x`` the input quantized to ``bits`` ≤ 8."""

    kernel = "int_mm"

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        self.bits, self.out_features = layer.bits, layer.out_features
        integers = layer.integers().to(torch.int8)
        self.register_buffer("weight_t", integers.t().contiguous())  # [in, out], as _int_mm wants
        self.register_buffer("scale", layer.scale.reshape(1, -1).float().clone() if layer.per_channel
                             else layer.scale.reshape(1, 1).float().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, step = quantize_input(_rows_2d(x), self.bits)  # the paper path's integers
        y = torch._int_mm(q.to(torch.int8), self.weight_t).float().mul_(self.scale * step)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4PackLinear(nn.Module):
    """torch's weight-only int4 kernel; outputs padded to a multiple of 16 rows, as it requires."""

    kernel = "int4pack"

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        if layer.bits != 4:
            raise ValueError("Int4PackLinear takes 4-bit layers")
        rows, cols = layer.out_features, layer.in_features
        if cols % 32:
            raise ValueError(f"the int4 kernel needs in_features divisible by 32, got {cols}")
        padded = -(-rows // 16) * 16
        integers = F.pad(layer.integers().to(torch.int32) + 8, (0, 0, 0, padded - rows), value=8)
        self.out_features, self.group = rows, min(_INT4_GROUP, cols) if cols % _INT4_GROUP == 0 else 32
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(integers.contiguous(), 1))
        scale = F.pad(layer.scale.reshape(-1).expand(rows).float(), (0, padded - rows), value=1.0)
        scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], -1)
        self.register_buffer("scales_and_zeros",
                             scales_and_zeros.unsqueeze(0).expand(cols // self.group, -1, -1).contiguous()
                             .to(torch.bfloat16))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = fake_quantize(_rows_2d(x.float()), 4).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_and_zeros)
        y = y[:, :self.out_features].float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class FbgemmLinear(nn.Module):
    """torch's dynamic quantized linear (fbgemm on x86) on the stored integers and scales."""

    kernel = "fbgemm"

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        if layer.bits > 8:
            raise ValueError(f"FbgemmLinear takes layers of at most 8 bits, got {layer.bits}")
        self.out_features = layer.out_features
        self.input_bits = layer.bits if layer.bits < FBGEMM_INPUT_BITS else None
        integers = layer.integers().to(torch.int8)
        scales = layer.scale.reshape(-1).expand(layer.out_features).float()  # a per-tensor scale on every row
        with warnings.catch_warnings():
            # quantized tensors are deprecated; kernel_works says when they are gone
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(integers.float() * scales[:, None], scales.double(),
                                                 torch.zeros(layer.out_features, dtype=torch.long), 0, torch.qint8)
        if not torch.equal(qweight.int_repr(), integers):  # (q·s)/s rounds back to q; never run other integers
            raise RuntimeError("fbgemm's qint8 weight does not hold the stored integers")
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)  # not in state_dict: rebuild with to_fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_bits is not None:
            q, step = quantize_input(x, self.input_bits)
            x = q.mul_(step)
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, reduce_range=True)


class DequantizedLinear(nn.Module):
    """The floor: the stored weight dequantized once, the input fake-quantized as on the
    paper's path (except at 16 bits), a float matrix multiply."""

    kernel = "dequant"

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        self.input_bits = layer.bits if layer.bits < 16 else None
        self.register_buffer("weight", layer.dequantized_weight().contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_bits is not None:
            q, step = quantize_input(x, self.input_bits)
            x = q.mul_(step).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class UnpackedEmbedding(nn.Module):
    """A stored embedding with its integers unpacked once, at load (a 4-bit table then takes
    twice its stored bytes in memory, a quarter of float): a lookup gathers integer rows and
    scales them, the very numbers ``PrecisionEmbedding`` computes, without unpacking nibbles on
    every call (a one-off probe of the study's 4-bit table, batch 128 x 22: 0.08 ms a lookup
    against 0.36 ms, float 0.05 ms; AMD EPYC, 2 threads)."""

    def __init__(self, layer: PrecisionEmbedding):
        super().__init__()
        self.per_channel = layer.per_channel
        self.register_buffer("table", layer.integers().contiguous())
        self.register_buffer("scale", layer.scale.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = F.embedding(ids, self.scale) if self.per_channel else self.scale.reshape(1)
        return F.embedding(ids, self.table).float() * scale


LAYERS = {"int_mm": IntMatmulLinear, "fbgemm": FbgemmLinear, "dequant": DequantizedLinear,
          "int4pack": Int4PackLinear}


def fast_layer(layer: PrecisionLinear, kernel: str = "int_mm") -> nn.Module:
    """``layer`` on ``kernel`` (not "auto"). Layers over 8 bits always get the floor; "int4pack"
    applies to 4-bit layers with whole 32-column groups, others get "int_mm"; a kernel that
    does not work here (``kernels.kernel_works``) gives way to the floor, with a warning."""
    if kernel not in LAYERS:
        raise ValueError(f"kernel must be one of {tuple(LAYERS)}, got {kernel!r}")
    if layer.bits > 8:
        return DequantizedLinear(layer)
    if kernel == "int4pack" and (layer.bits != 4 or layer.in_features % 32):
        kernel = "int_mm"
    if not kernels.kernel_works(kernel):
        warnings.warn(f"kernel {kernel} does not work here; using the dequantized float path", RuntimeWarning)
        kernel = FLOOR
    return LAYERS[kernel](layer)


class ByRowsLinear(nn.Module):
    """One stored layer on several kernels, each call on the one measured fastest for the
    nearest measured number of rows (nearest on a log scale): which kernel wins moves with
    the rows, and one model answers both single utterances and batches of 128. A one-off probe
    on an AVX-512 VNNI EPYC, 2 threads, an 8-bit 128 -> 512 layer: at 768 rows ``int_mm`` 310 µs and
    ``fbgemm`` 314; at 2560 rows ``int_mm`` 1.04 ms and ``fbgemm`` 0.71 (float 1.78). It holds
    the layer's weights once per kernel it uses (``kernel_summary`` names them)."""

    def __init__(self, layer: PrecisionLinear, kernel_by_rows: dict[int, str]):
        super().__init__()
        runs = [(r, kernel_by_rows[r]) for r in sorted(kernel_by_rows)]
        runs = [run for i, run in enumerate(runs) if i == 0 or run[1] != runs[i - 1][1]]  # one entry per change
        self.measured_rows, self.kernels = [r for r, _ in runs], [k for _, k in runs]
        self.paths = nn.ModuleDict({k: fast_layer(layer, k) for k in dict.fromkeys(self.kernels)})
        self.bounds = [math.sqrt(a * b) for a, b in zip(self.measured_rows, self.measured_rows[1:])]
        self.kernel = " | ".join(f"{k} from {math.ceil(r)} rows" if i else k
                                 for i, (r, k) in enumerate(zip([0, *self.bounds], self.kernels)))

    def kernel_for(self, rows: int) -> str:
        return self.kernels[bisect.bisect_right(self.bounds, rows)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.paths[self.kernel_for(x.numel() // x.shape[-1])](x)


def _shape_key(layer: PrecisionLinear, rows: int) -> str:
    return kernels.shape_key(layer.in_features, layer.out_features, layer.bits, rows)


@torch.no_grad()
def choose_kernels(layers: Iterable[PrecisionLinear], rows: int = DEFAULT_ROWS,
                   cache: Path | str | None = None) -> dict[str, str]:
    """The fastest working kernel for each distinct shape of the ≤ 8-bit ``layers``, as
    ``kernels.shape_key`` -> kernel: read from the cache (``kernels.default_cache_path()``
    when ``cache`` is None) or measured on ``rows`` rows with torch's current thread count,
    then added to it."""
    path = Path(cache) if cache is not None else kernels.default_cache_path()
    known = kernels.cached_choices(path)
    candidates = [kernel for kernel in CANDIDATES if kernels.kernel_works(kernel)]
    chosen: dict[str, str] = {}
    measured: dict[str, dict] = {}
    for layer in layers:
        key = _shape_key(layer, rows)
        if layer.bits > 8 or key in chosen:
            continue
        entry = known.get(key)
        if not isinstance(entry, dict) or entry.get("kernel") not in candidates:
            built = {kernel: LAYERS[kernel](layer) for kernel in candidates}
            x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0))
            seconds = kernels.measure(kernels.time_layers(built, x), candidates, rows)
            entry = measured[key] = {"kernel": kernels.fastest(seconds), "seconds": seconds}
        chosen[key] = entry["kernel"]
    if measured:
        kernels.save_choices(path, measured)
    return chosen


@torch.no_grad()
def to_fast(model: nn.Module, kernel: str = "auto", rows: int | Iterable[int] = STUDY_ROWS,
            cache: Path | str | None = None) -> nn.Module:
    """A copy of a precision-controlled model (``apply_policy`` or ``load_quantized``) whose
    ``PrecisionLinear`` layers run on fast kernels. ``kernel="auto"`` measures which of
    ``kernels.CANDIDATES`` is fastest here for each layer shape at each of ``rows`` (one count or
    several; ``choose_kernels``, cached in ``cache``): a layer whose fastest kernel differs between
    them becomes a ``ByRowsLinear``. A named kernel is used for every layer it can take (``fast_layer``).
    Each new layer's ``kernel`` attribute names its kernel (``kernel_summary``). A stored
    embedding is unpacked to integers once (``UnpackedEmbedding``); a lookup still dequantizes
    only the rows it reads."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    fast = copy.deepcopy(model)
    layers = {name: m for name, m in fast.named_modules() if isinstance(m, PrecisionLinear)}
    row_counts = sorted({rows} if isinstance(rows, int) else set(rows))
    chosen = {r: choose_kernels(layers.values(), r, cache) for r in row_counts} if kernel == "auto" else {}
    for name, layer in layers.items():
        by_rows = {r: chosen[r].get(_shape_key(layer, r), FLOOR) for r in row_counts} if chosen else {0: kernel}
        if layer.bits > 8 or len(set(by_rows.values())) == 1:
            _replace(fast, name, fast_layer(layer, next(iter(by_rows.values()))))
        else:
            _replace(fast, name, ByRowsLinear(layer, by_rows))
    for name, table in [(n, m) for n, m in fast.named_modules() if isinstance(m, PrecisionEmbedding)]:
        _replace(fast, name, UnpackedEmbedding(table))
    return fast.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many linear layers run on each kernel; "paper" counts layers still on the paper's path,
    a ``ByRowsLinear`` counts once under its kernels by rows."""
    inside = {id(m) for outer in model.modules() if isinstance(outer, ByRowsLinear) for m in outer.paths.values()}
    counts = Counter("paper" if isinstance(m, PrecisionLinear) else m.kernel for m in model.modules()
                     if isinstance(m, (PrecisionLinear, ByRowsLinear, *LAYERS.values())) and id(m) not in inside)
    return dict(sorted(counts.items()))


@torch.no_grad()
def agreement(reference: NLUModel, candidate: NLUModel, batches) -> dict[str, float]:
    """How far ``candidate``'s outputs are from ``reference``'s on the same batches: the
    largest absolute logit difference per output, and the fraction of examples with identical
    decisions (``interface.decide``: ID and DC label sets, SF Viterbi paths)."""
    reference.eval(), candidate.eval()
    worst: dict[str, float] = {}
    same = {"id": [0, 0], "dc": [0, 0], "sf": [0, 0]}
    for batch in batches:
        word_mask = batch["slot_labels"] != IGNORE
        a = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        b = candidate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for key in ("intent_logits", "domain_logits", "slot_logits"):
            if getattr(a, key) is not None:
                worst[key] = max(worst.get(key, 0.0), float((getattr(a, key) - getattr(b, key)).abs().max()))
        ours, theirs = decide(a, word_mask, reference), decide(b, word_mask, candidate)
        for task, x, y in (("id", ours.intents, theirs.intents), ("dc", ours.domains, theirs.domains)):
            if x is not None:
                same[task][0] += int((x == y).all(1).sum())
                same[task][1] += len(x)
        if ours.slots is not None:
            same["sf"][0] += sum(p == q for p, q in zip(ours.slots, theirs.slots))
            same["sf"][1] += len(ours.slots)
    result = {f"max_abs_diff:{k}": v for k, v in worst.items()}
    result.update({f"same_{t}": n / total for t, (n, total) in same.items() if total})
    return result
