"""``compactnlu.quant.dynamic``: dynamic post-training quantization.

A dynamically quantized linear (int8 weights, per-batch 7-bit activations) stays within the
error its scales imply.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.ao.nn.quantized import dynamic as nnqd

from compactnlu.quant.dynamic import dynamic_structure
from quant_helpers import OneLinear, check_bound


# ---------------------------------------------------------------- error bound of a dynamically quantized linear

def test_dynamic_linear_error_within_scale_bound():
    module = OneLinear(16, 8, seed=2).eval()
    quantized = dynamic_structure(copy.deepcopy(module))
    assert type(quantized.lin) is nnqd.Linear
    W = module.lin.weight.detach()
    q_weight = quantized.lin.weight()
    assert q_weight.qscheme() == torch.per_tensor_affine or q_weight.qscheme() == torch.per_tensor_symmetric
    w_scale = q_weight.q_scale()
    assert w_scale == pytest.approx(float(W.abs().max()) / 127.5, rel=1e-6)  # int8 over [-128, 127], per tensor
    w_err = w_scale / 2

    torch.manual_seed(3)
    x = torch.randn(64, 16) * 3 + 0.5
    with torch.no_grad():
        y, y_q = module(x), quantized(x)
    # Activations are quantized per tensor over [min(x, 0), max(x, 0)]. The x86/fbgemm dynamic kernel
    # runs with reduce_range=True (7-bit, range/127); a step of range/127 also covers an 8-bit range/255.
    x_step = float(x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    x_err = x_step / 2
    # |Wq xq - W x| <= sum_j |Wq - W||xq_j| + |W||xq_j - x_j|  with |xq_j| <= |x_j| + x_err
    bound = (w_err * (x.abs() + x_err)).sum(1, keepdim=True) + W.abs().sum(1)[None, :] * x_err
    bound = bound + 1e-5 * (1 + y.abs())
    check_bound((y_q - y).abs(), bound)
