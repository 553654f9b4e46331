"""The paper's quantizer (Eqs. 7-9): symmetric integers in ``[-2^(b-1), 2^(b-1)-1]``, scale
``max|H|/qmax``, ``clip(round(H/s)) * s``; and its straight-through fake-quantized form.

Weights get one scale per output channel by default (a per-tensor scale, literally Eq. 8,
is an option); activations get one scale per tensor, computed on the fly from the batch.
Candidate bits: the paper's text says {4, 8, 16}, its Algorithm 1 says {4, 6, 8}; any
integer width in 2..16 works here, the default is the text's.
"""

from __future__ import annotations

import torch

DEFAULT_BITS = (4, 8, 16)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def qmin(bits: int) -> int:
    return -(2 ** (bits - 1))


def check_bits(bits: int) -> int:
    """``bits`` as an int; anything but an integer in 2..16 is a ValueError."""
    if int(bits) != bits or not 2 <= bits <= 16:
        raise ValueError(f"bit-width must be an integer in 2..16, got {bits!r}")
    return int(bits)


def int_dtype(bits: int) -> torch.dtype:
    """The smallest signed container (int4 values sit in int8 until they are packed)."""
    return torch.int8 if check_bits(bits) <= 8 else torch.int16


def absmax_scale(x: torch.Tensor, bits: int, per_channel: bool, axis: int, where: str = "absmax_scale",
                 name: str = "x") -> torch.Tensor:
    """``max|x| / qmax`` per channel along ``axis`` (or per tensor), shaped to broadcast against ``x``.

    An all-zero channel (or tensor) would give scale 0 and 0/0 = NaN; it gets scale 1
    instead, which quantizes its zeros to exact zeros. So does a channel so small that
    ``max|x| / qmax`` underflows to 0 (below about 1e-40): its values then round to 0.
    1-D tensors are always per tensor. NaN or inf in ``x`` is a ValueError naming ``where``
    and ``name``: NaN would round to 0 and inf give a NaN scale, so a whole row turns NaN.
    """
    x = x.detach().float().abs()
    if per_channel and x.dim() >= 2:
        axis = axis % x.dim()
        amax = x.amax(dim=[d for d in range(x.dim()) if d != axis], keepdim=True)
    else:
        amax = x.amax().reshape([1] * x.dim())
    # amax is NaN or inf exactly where x holds one (amax propagates NaN): the check costs no
    # extra pass over x, which matters in the bit controller's training loop
    if not torch.isfinite(amax).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{where}: tensor {name!r} holds {'NaN' if n_nan else 'inf'} values "
                         f"({n_nan} NaN, {n_inf} inf of {x.numel()}); only finite values can be quantized")
    scale = amax / qmax(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def round_clip(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clip(round(x / scale))`` to the integer range of ``bits``, as float."""
    return torch.clamp(torch.round(x.detach().float() / scale), qmin(bits), qmax(bits))


def quantize_symmetric(x: torch.Tensor, bits: int, per_channel: bool = True, axis: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (int8 for bits <= 8, else int16) and the float32 scale that maps them back."""
    bits = check_bits(bits)
    scale = absmax_scale(x, bits, per_channel, axis, "quantize_symmetric")
    return round_clip(x, scale, bits).to(int_dtype(bits)), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class _FakeQuantize(torch.autograd.Function):
    """Forward: quantize-dequantize exactly. Backward: identity (straight-through).

    The scale comes from ``max|x|`` of the same tensor, so nothing is ever outside the
    range and the clipped variant of the estimator would zero no gradient anyway.
    """

    @staticmethod
    def forward(ctx, x, bits, per_channel, axis, where, name):
        scale = absmax_scale(x, bits, per_channel, axis, where, name)
        return (round_clip(x, scale, bits) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def fake_quantize(x: torch.Tensor, bits: int, per_channel: bool = False, axis: int = 0) -> torch.Tensor:
    """``x`` rounded to ``bits`` and back to float; gradients pass through unchanged.
    NaN or inf in ``x`` is a ValueError."""
    return _FakeQuantize.apply(x, check_bits(bits), per_channel, axis, "fake_quantize", "x")


def fake_quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """A weight as ``PrecisionLinear`` will store it (one scale per output row by default)."""
    return _FakeQuantize.apply(w, check_bits(bits), per_channel, 0, "fake_quantize_weight", "w")
