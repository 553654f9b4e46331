"""``compactnlu.quant``: static and dynamic post-training quantization.

Calibration draws exactly N batches, a quantized linear stays within the error its scales
imply, saved artifacts reload bit for bit without pickled code, degenerate weights and
activations give finite scales, embeddings are quantized (and shrink the artifact), the
float model is left alone, and no ``torch.ao`` deprecation warning escapes.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd

from compactnlu.bench import artifact_size_mb
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.quant import load_quantized, quantize_dynamic, quantize_static, save_quantized
from compactnlu.quant.dynamic import dynamic_structure
from compactnlu.quant.static import STATIC_QCONFIG, calibrate, prepare_static

ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
TAGS = ("O", "B-a", "I-a", "B-b", "I-b")
LOGITS = ("intent_logits", "domain_logits", "slot_logits")
METHODS = ("static", "dynamic")
SPIKE_TOKEN = 45  # its embedding row is made a spike so that a batch holding it has extreme activations


def make_model(seed=0, **encoder) -> MultiTaskNLU:
    torch.manual_seed(seed)
    config = NLUConfig(n_intents=4, n_domains=3, tags=TAGS, tasks=("id", "dc", "sf"), encoder={**ENCODER, **encoder})
    return MultiTaskNLU(config).eval()


def make_batch(seed: int, rows=3, length=7, vocab=ENCODER["vocab_size"]) -> dict[str, torch.Tensor]:
    """``<s> tokens </s> <pad>...`` rows of different lengths (token ids 3..vocab-1, never the spike)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), 1)
    for r in range(rows):
        n = length - r  # row r has r pads
        ids[r, 0], ids[r, n - 1] = 0, 2
        body = torch.randint(3, vocab, (n - 2,), generator=g)
        body[body == SPIKE_TOKEN] = 3
        ids[r, 1:n - 1] = body
    return dict(input_ids=ids, attention_mask=(ids != 1).long())


def make_batches(k: int, seed=100, **kw) -> list[dict[str, torch.Tensor]]:
    return [make_batch(seed + i, **kw) for i in range(k)]


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


def quantize(model, method: str, batches=None, n=2):
    if method == "static":
        quantized, used = quantize_static(model, iter(batches if batches is not None else make_batches(n)), n)
        assert used == n
        return quantized
    return quantize_dynamic(model)


def outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: out[k] for k in LOGITS}


class OneLinear(nn.Module):
    """Calls like MultiTaskNLU (``input_ids``, ``attention_mask``) but is one ``nn.Linear`` on float input."""

    def __init__(self, d_in=16, d_out=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, input_ids, attention_mask=None, **_):
        return self.lin(input_ids)


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


# ---------------------------------------------------------------- 2. error bounds of a quantized linear

def check_bound(err: torch.Tensor, bound: torch.Tensor) -> None:
    ratio = err / bound
    assert torch.all(err <= bound), f"error exceeds its bound by up to {float(ratio.max()):.3f}x"
    assert ratio.max() >= 0.01, f"bound too loose to catch anything (max error/bound {float(ratio.max()):.4f})"


def test_dynamic_linear_error_within_scale_bound():
    module = OneLinear(16, 8, seed=2).eval()
    quantized = dynamic_structure(copy.deepcopy(module))
    assert type(quantized.lin) is nnqd.Linear
    W = module.lin.weight.detach()
    q_weight = quantized.lin.weight()
    assert q_weight.qscheme() == torch.per_tensor_affine or q_weight.qscheme() == torch.per_tensor_symmetric
    w_scale = q_weight.q_scale()
    assert w_scale == pytest.approx(float(W.abs().max()) / 127, rel=0.01)  # int8, max|W|/127 per tensor
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


# ---------------------------------------------------------------- 3. save and reload

@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of quantized tensors, below
@pytest.mark.parametrize("method", METHODS)
def test_save_load_gives_identical_outputs(method, tmp_path):
    model = make_model(seed=6)
    quantized = quantize(model, method)
    folder = save_quantized(quantized, tmp_path / method, method, {"n_batches": 2})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt", "quantization.json"]
    assert json.loads((folder / "quantization.json").read_text())["method"] == method
    assert NLUConfig.from_json((folder / "config.json").read_text()) == model.config

    state = torch.load(folder / "model.pt", weights_only=True)  # no pickled code
    assert isinstance(state, dict) and state
    assert all(isinstance(v, torch.Tensor) or v is None or isinstance(v, (tuple, torch.dtype)) for v in state.values())

    loaded = load_quantized(folder)
    assert not loaded.training
    assert type(loaded.id_head) is type(quantized.id_head)
    for batch in make_batches(2, seed=200):
        a, b = outputs(quantized, batch), outputs(loaded, batch)
        for key in LOGITS:
            assert torch.equal(a[key], b[key]), (method, key)


def test_artifact_size_counts_only_deployed_files(tmp_path):
    folder = save_quantized(quantize_dynamic(make_model()), tmp_path / "q", "dynamic")
    expected = sum((folder / n).stat().st_size for n in ("config.json", "quantization.json", "model.pt")) / 1e6
    assert artifact_size_mb(folder) == pytest.approx(expected, rel=1e-12)
    (folder / "training.json").write_text(json.dumps({"log": "x" * 500_000}))
    (folder / "notes.txt").write_text("y" * 100_000)
    assert artifact_size_mb(folder) == pytest.approx(expected, rel=1e-12)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        artifact_size_mb(empty)


# ---------------------------------------------------------------- 4. zero weights and zero activations

def zero_row(model):
    with torch.no_grad():
        model.id_head.weight[0].zero_()
        model.encoder.encoder.layer[0].attention.self.query.weight[2].zero_()
    return model


def zero_matrix(model):
    with torch.no_grad():
        model.id_head.weight.zero_()
        model.encoder.encoder.layer[0].attention.self.query.weight.zero_()
    return model


def finite_scales(model):
    for name, module in model.named_modules():
        if isinstance(module, nnq.Quantize):
            assert torch.isfinite(module.scale).all() and (module.scale > 0).all(), name
        if isinstance(module, (nnq.Linear, nnqd.Linear)):
            s = module.weight().q_scale()
            assert s > 0 and s == s and s != float("inf"), name
        if isinstance(module, nnq.Linear):
            assert module.scale > 0 and module.scale != float("inf"), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("zero", [zero_row, zero_matrix], ids=["row", "matrix"])
def test_zero_weights_quantize_without_nan(method, zero):
    model = zero(make_model(seed=7))
    quantized = quantize(model, method)
    finite_scales(quantized)
    batch = make_batch(300)
    out = outputs(quantized, batch)
    for key in LOGITS:
        assert torch.isfinite(out[key]).all(), key
    bias = model.id_head.bias.detach()
    rows = [0] if zero is zero_row else range(bias.numel())
    # A zero weight row gives its bias; static output requantization costs at most half a step.
    tol = 1e-6 if method == "dynamic" else float(quantized.id_head.module.scale) / 2 + 1e-6
    for r in rows:
        assert torch.allclose(out["intent_logits"][:, r], bias[r].expand(3), atol=tol), r


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_activations_quantize_without_nan(method):
    model = make_model(seed=8)
    with torch.no_grad():  # the first linears see all-zero inputs, and the heads' pooled input is zero too
        model.encoder.embeddings.LayerNorm.weight.zero_()
        model.encoder.embeddings.LayerNorm.bias.zero_()
    quantized = quantize(model, method)
    finite_scales(quantized)
    out = outputs(quantized, make_batch(301))
    for key in LOGITS:
        assert torch.isfinite(out[key]).all(), key


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


# ---------------------------------------------------------------- 5. embeddings are quantized

def int8_error_bound(logits: torch.Tensor, method: str, n_layers: int) -> float:
    """A first-order bound on a quantized model's logit error, from its quantization steps.

    Relative to its output's scale, one quantized linear is off by at most half a weight step
    (symmetric int8, max|W|/127: 1/254) plus half an input step (7-bit, range/127 over a
    range <= 2 max|x|: 1/127), plus, static only, half a step of its 7-bit requantized output
    (1/127); an 8-bit embedding row by at most 1/255. The path to a logit runs through the
    embedding, per layer Q and K (their product makes the attention scores), V, the
    attention output, FFN in and FFN out, then the head: 2 + 6 * n_layers steps, each with
    gain about 1 (LayerNorm after each block), so the errors add. The largest |logit| stands
    for the output's scale. These kernels take 7-bit inputs so that they never saturate, so
    the bound holds with or without VNNI; measured error/bound on this test's model over five
    batches: at most 0.39 (static) and 0.37 (dynamic), the same under ``make unit-avx2``.
    """
    eps = 1 / 254 + 1 / 127 + (1 / 127 if method == "static" else 0)
    return (2 + 6 * n_layers) * eps * float(logits.abs().max())


@pytest.fixture(scope="module")
def big_vocab_model():
    return make_model(seed=11, vocab_size=2000, hidden_size=32, intermediate_size=64)


@pytest.mark.parametrize("method", METHODS)
def test_embeddings_are_quantized_and_shrink_the_artifact(method, big_vocab_model, tmp_path):
    model = big_vocab_model
    batches = make_batches(2, vocab=2000)
    quantized = quantize(model, method, batches)
    embeddings = quantized.encoder.embeddings
    assert type(embeddings.word_embeddings) is nnq.Embedding
    assert type(embeddings.position_embeddings) is nnq.Embedding
    assert embeddings.word_embeddings.weight().dtype == torch.quint8

    model.save(tmp_path / "fp32")
    fp32 = artifact_size_mb(tmp_path / "fp32")
    q = artifact_size_mb(save_quantized(quantized, tmp_path / method, method))
    # 8-bit rows (+ a float scale and offset each) against fp32: well under half, while float
    # embeddings with int8 linears alone would stay above 90% of the fp32 size here.
    assert q < 0.5 * fp32, (q, fp32)
    out = outputs(quantized, batches[0])
    reference = outputs(model, batches[0])
    n_layers = model.config.encoder["num_hidden_layers"]
    for key in LOGITS:
        error = float((out[key] - reference[key]).abs().max())
        assert 0 < error <= int8_error_bound(reference[key], method, n_layers), (method, key, error)


# ---------------------------------------------------------------- 6. the float model is left untouched

def test_float_model_is_untouched():
    model = make_model(seed=12).train()  # train mode must survive too (the copies are set to eval)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    embeddings = {n for n, m in model.named_modules() if type(m) is nn.Embedding}
    assert linears and embeddings

    quantize_static(model, iter(make_batches(2)), 2)
    quantize_dynamic(model)

    assert model.training
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == linears
    assert {n for n, m in model.named_modules() if type(m) is nn.Embedding} == embeddings
    for name, module in model.named_modules():
        assert not isinstance(module, (tq.QuantWrapper, tq.QuantStub, tq.DeQuantStub)), name
        assert not hasattr(module, "qconfig"), name
        assert not hasattr(module, "activation_post_process"), name
        assert not module._forward_hooks and not module._forward_pre_hooks, name


# ---------------------------------------------------------------- 7. no deprecation warnings escape

def deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught if "torch.ao.quantization is deprecated" in str(w.message)]


def test_raw_torch_ao_does_warn():
    """Sanity check: without the library's filters the warning is there, so the test below can fail."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tq.quantize_dynamic(OneLinear(), {nn.Linear}, dtype=torch.qint8)
    assert deprecations(caught)


def test_no_deprecation_warning_escapes(tmp_path):
    model = make_model(seed=13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        static, _ = quantize_static(model, iter(make_batches(2)), 2)
        dynamic = quantize_dynamic(model)
        for method, quantized in (("static", static), ("dynamic", dynamic)):
            load_quantized(save_quantized(quantized, tmp_path / method, method))
    assert not deprecations(caught), deprecations(caught)[:1]
