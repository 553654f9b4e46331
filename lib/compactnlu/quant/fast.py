"""The fast run-time path of a precision-controlled model: real low-bit CPU kernels.

The paper's path (``PrecisionLinear``) dequantizes each weight and fake-quantizes its
input in float on every call. Here the same stored integers feed integer kernels:

- **≤ 8 bits, ``int_mm``**: the input is quantized per tensor to the group's bits exactly
  as the paper's path does (symmetric, scale ``max|x|/qmax``), the integers are multiplied
  by ``torch._int_mm`` (int8 × int8 → int32, exact), and the int32
  result is rescaled by ``s_x · s_w``. 4-bit weights are unpacked to int8 once, at load;
  the arithmetic is the paper's, only the accumulation is exact instead of float.
- **4 bits, ``int4pack``** (an option): torch's weight-only int4 kernel
  (``_weight_int4pack_mm_for_cpu``) on the packed weights, the input fake-quantized to 4 bits
  and cast to bfloat16 (the kernel's input type on CPU), so results differ by bf16 rounding.
- **16 bits**: there is no int16 matrix multiply on CPU; the weight is dequantized once at
  load and the input is not rounded (16-bit rounding moves it by under 2e-5 of its range).

How far this path agrees with the paper's is measured (``agreement``), not assumed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .precision import PrecisionLinear, _round_clip, _scale, fake_quantize

KERNELS_4BIT = ("int_mm", "int4pack")
_INT4_GROUP = 128  # the int4 kernel's scale group along K (it accepts 32..256); every group shares the row's scale


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


class IntMatmulLinear(nn.Module):
    """``y = s_x · s_w · (q_x @ q_wᵀ) + b`` with ``q_x`` the input quantized to ``bits`` ≤ 8."""

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        self.bits, self.out_features = layer.bits, layer.out_features
        integers = layer._integers(layer.qweight).to(torch.int8)
        self.register_buffer("weight_t", integers.t().contiguous())  # [in, out], as _int_mm wants
        self.register_buffer("scale", layer.scale.reshape(1, -1).float().clone() if layer.per_channel
                             else layer.scale.reshape(1, 1).float().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows_2d(x.float())
        step = _scale(rows, self.bits, per_channel=False, axis=0)  # the paper path's scale, so the same integers
        q = _round_clip(rows, step, self.bits).to(torch.int8)
        y = torch._int_mm(q, self.weight_t).float().mul_(self.scale * step)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4PackLinear(nn.Module):
    """torch's weight-only int4 kernel; outputs padded to a multiple of 16 rows, as it requires."""

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        if layer.bits != 4:
            raise ValueError("Int4PackLinear takes 4-bit layers")
        rows, cols = layer.out_features, layer.in_features
        if cols % 32:
            raise ValueError(f"the int4 kernel needs in_features divisible by 32, got {cols}")
        padded = -(-rows // 16) * 16
        integers = F.pad(layer._integers(layer.qweight).to(torch.int32) + 8, (0, 0, 0, padded - rows), value=8)
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


class DequantizedLinear(nn.Module):
    """A 16-bit group: the stored weight dequantized once, a float matrix multiply."""

    def __init__(self, layer: PrecisionLinear):
        super().__init__()
        self.register_buffer("weight", layer.dequantized_weight().contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fast_layer(layer: PrecisionLinear, int4_kernel: str = "int_mm") -> nn.Module:
    if int4_kernel not in KERNELS_4BIT:
        raise ValueError(f"int4_kernel must be one of {KERNELS_4BIT}, got {int4_kernel!r}")
    if layer.bits == 4 and int4_kernel == "int4pack" and layer.in_features % 32 == 0:
        return Int4PackLinear(layer)
    if layer.bits <= 8:
        return IntMatmulLinear(layer)
    return DequantizedLinear(layer)


@torch.no_grad()
def to_fast(model: nn.Module, int4_kernel: str = "int_mm") -> nn.Module:
    """A copy of a precision-controlled model (``apply_policy`` or ``load_quantized``) whose
    ``PrecisionLinear`` layers run on integer kernels. Embeddings stay as stored: a lookup
    dequantizes only the rows it reads."""
    fast = copy.deepcopy(model)
    for name, module in list(fast.named_modules()):
        if isinstance(module, PrecisionLinear):
            parent, _, attr = name.rpartition(".")
            setattr(fast.get_submodule(parent) if parent else fast, attr, fast_layer(module, int4_kernel))
    return fast.eval()


@torch.no_grad()
def agreement(reference: nn.Module, candidate: nn.Module, batches) -> dict[str, float]:
    """How far ``candidate``'s outputs are from ``reference``'s on the same batches: the
    largest absolute logit difference per output, and the fraction of identical decisions
    (ID and DC label sets at 0.5, SF Viterbi paths)."""
    reference.eval(), candidate.eval()
    worst: dict[str, float] = {}
    same = {"id": [0, 0], "dc": [0, 0], "sf": [0, 0]}
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        a, b = reference(**inputs), candidate(**inputs)
        for key in ("intent_logits", "domain_logits", "slot_logits"):
            if key in a:
                worst[key] = max(worst.get(key, 0.0), float((a[key] - b[key]).abs().max()))
        for task, key in (("id", "intent_logits"), ("dc", "domain_logits")):
            if key in a:
                sets_equal = ((a[key] >= 0) == (b[key] >= 0)).all(1)
                same[task][0] += int(sets_equal.sum())
                same[task][1] += len(sets_equal)
        if "slot_logits" in a:
            word_mask = batch["slot_labels"] != -100
            paths_a = reference.decode_slots(a["slot_logits"], word_mask)
            paths_b = candidate.decode_slots(b["slot_logits"], word_mask)
            same["sf"][0] += sum(p == q for p, q in zip(paths_a, paths_b))
            same["sf"][1] += len(paths_a)
    result = {f"max_abs_diff:{k}": v for k, v in worst.items()}
    result.update({f"same_{t}": n / total for t, (n, total) in same.items() if total})
    return result
