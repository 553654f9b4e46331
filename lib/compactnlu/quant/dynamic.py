"""Dynamic PTQ: every ``nn.Linear`` to int8 weights (scale max|W|/127.5 per tensor: torch's
symmetric ``MinMaxObserver`` spreads [-max|W|, max|W|] over all 255 steps of [-128, 127]) with
activations quantized on the fly per batch, and the embeddings to 8-bit weights; no calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.ao import quantization as tq

from ..model import MultiTaskNLU, assert_finite
from .common import EagerMethod, float_copy, quiet_quantization
from .method import MethodConfig


@dataclass(frozen=True)
class DynamicConfig(MethodConfig):
    """No settings: the scales come from the weights and, per batch, from the activations."""


def dynamic_structure(model: MultiTaskNLU) -> MultiTaskNLU:
    with quiet_quantization():
        return tq.quantize_dynamic(model, {nn.Linear: tq.default_dynamic_qconfig,
                                           nn.Embedding: tq.float_qparams_weight_only_qconfig},
                                   dtype=torch.qint8, inplace=True)


def quantize_dynamic(model: MultiTaskNLU) -> MultiTaskNLU:
    """A dynamically quantized copy of ``model`` (the float model is left as it is); NaN or inf
    in ``model`` is a ValueError naming the tensor (an inf weight gives an inf scale, NaN logits)."""
    assert_finite(model.state_dict(), "quantize_dynamic")
    return dynamic_structure(float_copy(model))


class DynamicPTQ(EagerMethod):
    """Saved as ``model.pt``; loads back as the dynamically quantized ``MultiTaskNLU``."""

    name = "dynamic"
    config = DynamicConfig

    def structure(self, model: MultiTaskNLU) -> MultiTaskNLU:
        return dynamic_structure(model)
