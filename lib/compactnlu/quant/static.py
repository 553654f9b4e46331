"""Static PTQ, the paper's recipe: QuantStub/DeQuantStub around what runs quantized,
min-max observers over N calibration batches, per-tensor affine activations (scale and
zero point), int8 weights, ``prepare`` -> calibrate -> ``convert`` in eager mode on x86.

What runs quantized: every ``nn.Linear`` (attention Q/K/V/output, the MLP, the heads),
each wrapped by ``QuantWrapper`` so int8 flows only through the matrix multiply, and the
embeddings (8-bit weights, float output). What stays float: LayerNorm, softmax, GELU,
the residual additions and the CRF — the eager x86 backend has no quantized kernels for
them inside a Hugging Face layer, so activations are dequantized around each linear.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.quantization.observer import MinMaxObserver

from ..model import MultiTaskNLU, assert_finite
from ..progress import bar
from .common import EagerMethod, float_copy, quiet_quantization
from .method import MethodConfig

# 7-bit activations (0..127): x86 kernels without VNNI can overflow 16-bit accumulators with full-range uint8
STATIC_QCONFIG = tq.QConfig(
    activation=MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                        quant_min=0, quant_max=127),
    weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
)


def _wrap_linears(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            wrapper = tq.QuantWrapper(child)
            wrapper.qconfig = STATIC_QCONFIG
            setattr(model, name, wrapper)
        elif isinstance(child, nn.Embedding):
            child.qconfig = tq.float_qparams_weight_only_qconfig
        else:
            _wrap_linears(child)
    return model


def prepare_static(model: MultiTaskNLU) -> MultiTaskNLU:
    """A copy of ``model`` with stubs and min-max observers in place, ready to calibrate."""
    prepared = _wrap_linears(float_copy(model))
    with quiet_quantization():
        tq.prepare(prepared, inplace=True)
    return prepared


def check_n_batches(n_batches) -> int:
    """``n_batches`` as an int; anything but a positive integer is a ValueError (None would
    otherwise fail deep in ``islice``, and 0 calibrates on nothing)."""
    if isinstance(n_batches, bool) or not isinstance(n_batches, numbers.Integral) or n_batches < 1:
        raise ValueError(f"n_batches={n_batches!r} is out of range; allowed: a positive integer "
                         f"(how many calibration batches the observers see)")
    return int(n_batches)


@dataclass(frozen=True)
class StaticConfig(MethodConfig):
    n_batches: int  # calibration batches of the training split seen by the min-max observers

    def __post_init__(self):
        object.__setattr__(self, "n_batches", check_n_batches(self.n_batches))


@torch.no_grad()
def calibrate(prepared: MultiTaskNLU, batches, n_batches: int) -> int:
    """Run ``n_batches`` batches through the observers; returns how many were used."""
    n_batches = check_n_batches(n_batches)
    used = 0
    for batch in bar(islice(batches, n_batches), desc="calibrate", total=n_batches):
        prepared(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        used += 1
    return used


def static_structure(model: MultiTaskNLU) -> MultiTaskNLU:
    """The converted structure without calibration (for loading saved weights into)."""
    prepared = prepare_static(model)
    with quiet_quantization():
        return tq.convert(prepared, inplace=True)


def quantize_static(model: MultiTaskNLU, batches, n_batches: int) -> tuple[MultiTaskNLU, int]:
    """Statically quantized copy of ``model`` calibrated on the first ``n_batches`` of ``batches``.

    No calibration data is a ValueError: observers that saw nothing give default scales,
    and every logit of the converted model would be 0. So is NaN or inf in ``model``.
    """
    n_batches = check_n_batches(n_batches)
    assert_finite(model.state_dict(), "quantize_static")
    prepared = prepare_static(model)
    with quiet_quantization():
        used = calibrate(prepared, batches, n_batches)
        if used == 0:
            raise ValueError("static quantization got an empty calibration set: no batch to calibrate on")
        return tq.convert(prepared, inplace=True), used


class StaticPTQ(EagerMethod):
    """Saved as ``model.pt`` (the record holds ``StaticConfig``); loads back as the converted
    ``MultiTaskNLU``."""

    name = "static"
    config = StaticConfig

    def structure(self, model: MultiTaskNLU) -> MultiTaskNLU:
        return static_structure(model)
