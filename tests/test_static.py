"""``compactnlu.quant.static``: static post-training quantization.

Calibration draws exactly N batches and the observers see only those, a calibrated quantized
linear stays within the error its scales imply, and calibration on all-zero inputs gives
finite scales.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq

from compactnlu.quant import quantize_static
from compactnlu.quant.static import STATIC_QCONFIG, calibrate, prepare_static
from quant_helpers import SPIKE_TOKEN, OneLinear, check_bound, finite_scales, make_batch, make_batches, make_model


class Counted:
    """An iterator over ``batches`` that records how many were drawn."""

    def __init__(self, batches):
        self.drawn = 0
        self._it = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._it)
        self.drawn += 1
        return item


def first_quant_wrapper(model: nn.Module) -> tuple[str, tq.QuantWrapper]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, tq.QuantWrapper))


def recorded_inputs(model: nn.Module, name: str, batches) -> list[torch.Tensor]:
    """The float inputs of submodule ``name`` over ``batches``."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        handle.remove()
    return seen


# ---------------------------------------------------------------- 1. calibration uses exactly N batches

@pytest.fixture(scope="module")
def spiky():
    """A tiny model whose SPIKE_TOKEN embedding drives the first linear's input to an extreme."""
    model = make_model(seed=1)
    with torch.no_grad():
        row = model.encoder.embeddings.word_embeddings.weight[SPIKE_TOKEN]
        row.zero_()
        row[0] = 1000.0
    batches = make_batches(3, seed=10)
    spike = make_batch(99)
    spike["input_ids"][0, 1] = SPIKE_TOKEN
    return model, batches + [spike, make_batch(98)]


def test_calibrate_observes_exactly_the_first_n_batches(spiky):
    model, batches = spiky
    n = 3
    prepared = prepare_static(model)
    name, wrapper = first_quant_wrapper(prepared)
    assert name == "encoder.encoder.layer.0.attention.self.query"
    source = Counted(batches)
    assert calibrate(prepared, source, n) == n
    assert source.drawn == n

    inputs = recorded_inputs(model, name, batches)
    first_n = torch.cat([x.flatten() for x in inputs[:n]])
    everything = torch.cat([x.flatten() for x in inputs])
    assert everything.max() > first_n.max() + 0.5  # the spike batch (n+1-th) would move the observer

    observer = wrapper.quant.activation_post_process
    assert torch.equal(observer.min_val, first_n.min()), (observer.min_val, first_n.min())
    assert torch.equal(observer.max_val, first_n.max()), (observer.max_val, first_n.max())


def test_quantize_static_draws_exactly_n_batches_and_scales_from_them(spiky):
    model, batches = spiky
    n = 3
    source = Counted(batches)
    quantized, used = quantize_static(model, source, n)
    assert used == n and source.drawn == n

    # The converted quant stub's scale/zero point are those of a min-max observer over exactly n batches.
    name, wrapper = first_quant_wrapper(quantized)
    inputs = recorded_inputs(model, name, batches)
    expected, with_spike = STATIC_QCONFIG.activation(), STATIC_QCONFIG.activation()
    for x in inputs[:n]:
        expected(x)
    for x in inputs[:n + 1]:
        with_spike(x)
    scale, zero_point = expected.calculate_qparams()
    spike_scale, _ = with_spike.calculate_qparams()
    assert not torch.allclose(scale, spike_scale)
    assert torch.equal(wrapper.quant.scale, scale.reshape(wrapper.quant.scale.shape))
    assert torch.equal(wrapper.quant.zero_point, zero_point.reshape(wrapper.quant.zero_point.shape))


def test_calibration_is_capped_by_the_data(spiky):
    model, batches = spiky
    source = Counted(batches[:2])
    _, used = quantize_static(model, source, 5)
    assert used == 2 and source.drawn == 2

    def generator():
        yield from batches[:1]
    prepared = prepare_static(model)
    assert calibrate(prepared, generator(), 4) == 1


# ---------------------------------------------------------------- 2. error bound of a calibrated quantized linear

def test_static_linear_error_within_calibrated_scale_bound():
    module = OneLinear(16, 8, seed=4).eval()
    torch.manual_seed(5)
    xs = [torch.randn(32, 16) * 2 + 0.3 for _ in range(3)]
    quantized, used = quantize_static(module, iter([{"input_ids": x, "attention_mask": None} for x in xs]), 3)
    assert used == 3
    wrapper = quantized.lin
    assert isinstance(wrapper, tq.QuantWrapper) and type(wrapper.module) is nnq.Linear
    x_scale, x_zp = float(wrapper.quant.scale), int(wrapper.quant.zero_point)
    W = module.lin.weight.detach()
    q_weight = wrapper.module.weight()
    w_scale = q_weight.q_scale()
    y_scale = float(wrapper.module.scale)
    assert q_weight.q_zero_point() == 0  # symmetric int8 weights
    assert w_scale == pytest.approx(float(W.abs().max()) / 127, rel=0.01)

    x = torch.cat(xs)  # inside the calibrated range: no clamping of inputs
    lo, hi = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
    assert x_scale == pytest.approx((hi - lo) / 127, rel=1e-5)  # 7-bit activations, 0..127
    assert x_zp == round(-lo / x_scale)

    with torch.no_grad():
        y, y_q = module(x), quantized(x)
    w_err, x_err = w_scale / 2, x_scale / 2
    bound = (w_err * (x.abs() + x_err)).sum(1, keepdim=True) + W.abs().sum(1)[None, :] * x_err
    bound = bound + x_scale * w_scale / 2 + y_scale / 2  # int32 bias rounding, requantized output
    bound = bound + 1e-5 * (1 + y.abs())
    check_bound((y_q - y).abs(), bound)


# ---------------------------------------------------------------- 3. zero activations

def test_static_calibration_on_zero_inputs_gives_finite_scale():
    module = OneLinear(16, 8, seed=9).eval()
    with torch.no_grad():  # zero weights and bias too: the output observer also sees only zeros
        module.lin.weight.zero_()
        module.lin.bias.zero_()
    zeros = [{"input_ids": torch.zeros(4, 16), "attention_mask": None} for _ in range(2)]
    quantized, used = quantize_static(module, iter(zeros), 2)
    assert used == 2
    finite_scales(quantized)
    for x in (torch.zeros(4, 16), torch.randn(4, 16)):
        with torch.no_grad():
            y = quantized(x)
        assert torch.isfinite(y).all() and torch.equal(y, torch.zeros_like(y))
