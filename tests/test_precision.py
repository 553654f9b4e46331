"""``compactnlu.quant.precision``: the quantizer, int4 packing, the exported layers, the
Gumbel controller and its cost, the search-time mixture, sensitivity, and the groups of
``MultiTaskNLU``. Tiny tensors and models only; nothing here trains on data.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.quant.controller import (GumbelController, MixedPrecisionEmbedding, MixedPrecisionLinear, anneal_rate,
                                         tau_at)
from compactnlu.quant.groups import apply_mixed, apply_policy, group_param_counts, precision_groups
from compactnlu.quant.quantizer import dequantize, fake_quantize, fake_quantize_weight, qmax, quantize_symmetric
from compactnlu.quant.sensitivity import activation_variance, controller_prior, sensitivity_policy, sensitivity_scores
from compactnlu.quant.stored import PrecisionEmbedding, PrecisionLinear, pack_int4, unpack_int4

ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
TAGS = ("O", "B-a", "I-a", "B-b", "I-b")
LOGITS = ("intent_logits", "domain_logits", "slot_logits")
ALL_BITS = (4, 6, 8, 16)


def make_model(seed=0, **kw) -> MultiTaskNLU:
    torch.manual_seed(seed)
    config = NLUConfig(n_intents=4, n_domains=3, tags=TAGS, tasks=("id", "dc", "sf"), encoder=dict(ENCODER), **kw)
    return MultiTaskNLU(config).eval()


def make_batch(seed=0, rows=3, length=7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, ENCODER["vocab_size"], (rows, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[-1, -2:] = 1  # one padded row
    return dict(input_ids=ids, attention_mask=(ids != 1).long())


def linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---------------------------------------------------------------- quantizer and packing

def test_int4_pack_unpack_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (101,), generator=g, dtype=torch.int8)
    q[:2] = torch.tensor([-8, 7])  # both ends of the range
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 51
    assert torch.equal(unpack_int4(packed, q.numel()), q)
    assert torch.equal(unpack_int4(pack_int4(q.reshape(1, -1)), 101), q)  # any shape, flattened
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([8], dtype=torch.int8))


def test_every_byte_unpacks_to_the_two_nibbles_it_packs():
    pairs = torch.tensor([(lo, hi) for hi in range(-8, 8) for lo in range(-8, 8)], dtype=torch.int8)
    packed = pack_int4(pairs)
    assert sorted(packed.tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed, 512), pairs.reshape(-1))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_dequantize_error_within_half_a_step(bits, per_channel):
    torch.manual_seed(bits)
    x = torch.randn(6, 10) * torch.logspace(-2, 1, 6)[:, None]  # rows of very different ranges
    q, scale = quantize_symmetric(x, bits, per_channel=per_channel)
    assert q.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert scale.shape == ((6, 1) if per_channel else (1, 1)) and scale.dtype == torch.float32
    assert int(q.min()) >= -qmax(bits) - 1 and int(q.max()) <= qmax(bits)
    assert int(q.abs().max()) == qmax(bits)  # the largest magnitude uses the full range
    err = (dequantize(q, scale) - x).abs()
    bound = scale.expand_as(x) / 2
    assert torch.all(err <= bound * (1 + 1e-2)), float((err / bound).max())
    assert float((err / bound).max()) > 0.5  # the bound is tight enough to matter
    # fake quantization is exactly quantize + dequantize
    assert torch.equal(fake_quantize(x, bits, per_channel=per_channel), dequantize(q, scale))


def test_per_channel_scales_follow_each_row():
    x = torch.tensor([[1.0, -3.0], [0.5, 0.25]])
    _, scale = quantize_symmetric(x, 8)
    assert torch.allclose(scale.flatten(), torch.tensor([3.0, 0.5]) / 127)
    _, scale = quantize_symmetric(x, 8, per_channel=False)
    assert torch.allclose(scale.flatten(), torch.tensor([3.0 / 127]))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_zero_rows_and_zero_tensors_give_exact_zeros(bits):
    x = torch.randn(4, 5)
    x[2] = 0.0
    q, scale = quantize_symmetric(x, bits)
    assert torch.all(torch.isfinite(scale)) and float(scale[2]) == 1.0
    assert torch.equal(dequantize(q, scale)[2], torch.zeros(5))
    for per_channel in (True, False):
        zeros = torch.zeros(3, 4)
        q, scale = quantize_symmetric(zeros, bits, per_channel=per_channel)
        assert torch.equal(dequantize(q, scale), zeros)
        assert torch.equal(fake_quantize(zeros, bits, per_channel=per_channel), zeros)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_a_channel_whose_scale_would_underflow_quantizes_to_finite_numbers(bits):
    # max|x| / qmax underflows to 0 below about 1e-40 (16 bits) without max|x| being 0
    x = torch.tensor([[1e-41, 0.0, -5e-42], [1.0, -0.5, 0.25]])
    q, scale = quantize_symmetric(x, bits)
    assert torch.all(scale > 0) and torch.all(torch.isfinite(dequantize(q, scale)))
    assert torch.all(torch.isfinite(fake_quantize(x, bits))) and torch.all(torch.isfinite(fake_quantize(x[:1], bits)))


def test_bad_bit_widths_are_refused():
    for bits in (1, 17, 4.5):
        with pytest.raises(ValueError):
            quantize_symmetric(torch.ones(2, 2), bits)


def test_straight_through_gradient_is_identity():
    x = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    out = fake_quantize(x, 4)
    assert not torch.equal(out, x)  # the forward really rounds
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)
    w = torch.randn(3, 4, requires_grad=True)
    fake_quantize_weight(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones(3, 4))


# ---------------------------------------------------------------- exported layers

@pytest.mark.parametrize("bits", ALL_BITS)
def test_precision_linear_storage_and_output(bits):
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    layer = PrecisionLinear.from_linear(linear, bits)
    container = {4: torch.uint8, 6: torch.int8, 8: torch.int8, 16: torch.int16}[bits]
    assert layer.qweight.dtype == container
    assert layer.qweight.numel() == (24 if bits == 4 else 48)  # int4: half the weight's numel
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (6, 1)
    scales_and_bias = 6 * 4 + 6 * 4
    sizes = layer.weight_bytes()
    assert sizes["stored"] == {4: 24, 6: 48, 8: 48, 16: 96}[bits] + scales_and_bias
    assert sizes["floor"] == 48 * bits / 8 + scales_and_bias

    q, scale = quantize_symmetric(linear.weight, bits)
    w_hat = dequantize(q, scale)
    assert torch.equal(layer.dequantized_weight(), w_hat)
    x = torch.randn(5, 8) * 3
    assert torch.equal(layer(x), F.linear(fake_quantize(x, bits), w_hat, linear.bias))
    assert not torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("bits", (4, 8, 16))
def test_precision_linear_safetensors_round_trip(bits, tmp_path):
    torch.manual_seed(1)
    layer = PrecisionLinear.from_linear(nn.Linear(7, 5), bits)  # odd length: padded int4 rows
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = PrecisionLinear(7, 5, bits)
    x = torch.randn(3, 7)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(fresh(x), layer(x))
    no_bias = PrecisionLinear.from_linear(nn.Linear(7, 5, bias=False), bits)
    assert "bias" not in no_bias.state_dict() and no_bias(x).shape == (3, 5)


@pytest.mark.parametrize("bits", (4, 8))
def test_precision_embedding_looks_up_dequantized_rows(bits):
    torch.manual_seed(2)
    embedding = nn.Embedding(11, 5, padding_idx=1)  # odd dimension: each int4 row padded to 3 bytes
    layer = PrecisionEmbedding.from_embedding(embedding, bits)
    assert layer.qweight.shape == ((11, 3) if bits == 4 else (11, 5))
    table = dequantize(*quantize_symmetric(embedding.weight, bits))
    ids = torch.tensor([[0, 3, 10], [1, 1, 7]])
    assert torch.equal(layer(ids), table[ids])
    assert torch.equal(layer.dequantized_weight(), table)


# ---------------------------------------------------------------- controller

def test_gumbel_weights_sum_to_one_and_hard_samples_are_one_hot():
    torch.manual_seed(0)
    c = GumbelController(["a", "b", "c"], init=torch.randn(3, 3))
    soft = c.weights(1.0)
    assert soft.shape == (3, 3) and torch.allclose(soft.sum(-1), torch.ones(3))
    assert torch.all(soft > 0) and torch.all(soft < 1)
    for _ in range(10):
        hard = c.weights(1.0, hard=True)
        assert torch.equal(hard.sum(-1), torch.ones(3))
        assert torch.equal(hard.max(-1).values, torch.ones(3))
        assert set(hard.flatten().tolist()) <= {0.0, 1.0}


def test_temperature_controls_sharpness():
    torch.manual_seed(0)
    c = GumbelController([f"g{i}" for i in range(200)], init=torch.tensor([[0.0, 1.0, 2.0]]).repeat(200, 1))
    cold, hot = c.weights(0.05), c.weights(100.0)
    assert float(cold.detach().max(-1).values.mean()) > 0.95
    assert float(hot.detach().max(-1).values.max()) < 1 / 3 + 0.05
    assert torch.allclose(hot.detach().mean(0), torch.full((3,), 1 / 3), atol=0.01)


def test_annealing_decreases_monotonically_to_tau_min():
    rate = anneal_rate(100, tau0=5.0, tau_min=0.5)
    taus = [tau_at(s, tau0=5.0, tau_min=0.5, rate=rate) for s in range(150)]
    assert taus[0] == 5.0
    assert all(a > b for a, b in zip(taus[:100], taus[1:101]))
    assert taus[100] == pytest.approx(0.5) and all(t == 0.5 for t in taus[101:])
    assert GumbelController.tau_at(10, rate=0.1) == tau_at(10, rate=0.1)


def test_expected_cost_bounds_and_its_gradient_favours_fewer_bits():
    groups = ["a", "b"]
    counts = {"a": 100, "b": 300}
    for favoured, cost in ((2, 0.5), (0, 0.125), (1, 0.25)):
        init = torch.full((2, 3), -50.0)
        init[:, favoured] = 50.0
        assert float(GumbelController(groups, init=init).expected_cost(counts).detach()) == pytest.approx(cost)
    mixed = torch.tensor([[50.0, -50, -50], [-50, -50, 50]])  # a: 4 bits (100 params), b: 16 bits (300)
    cost = float(GumbelController(groups, init=mixed).expected_cost(counts).detach())
    assert cost == pytest.approx((4 * 100 + 16 * 300) / (32 * 400))

    c = GumbelController(groups)
    c.expected_cost(counts).backward()
    grad = c.theta.grad
    assert torch.all(grad[:, 0] < 0) and torch.all(grad[:, 2] > 0)  # descent raises θ of 4 bits, lowers 16
    assert abs(float(grad[1, 0])) > abs(float(grad[0, 0]))  # the bigger group weighs more
    with pytest.raises(KeyError):
        c.expected_cost({"a": 1})


def test_freeze_returns_the_argmax():
    init = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    c = GumbelController(["x", "y", "z"], bits=(4, 6, 8), init=init)
    assert c.freeze() == {"x": 6, "y": 4, "z": 8}


def test_mixed_precision_linear_gradients_reach_theta_and_weight():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    c = GumbelController(["g"])
    mixed = MixedPrecisionLinear(linear, c, "g")
    assert list(mixed.parameters()) == [linear.weight, linear.bias]  # θ is not duplicated
    x = torch.randn(5, 8)
    with pytest.raises(RuntimeError):
        mixed(x)
    w = c.resample(1.0)
    out = mixed(x)
    expected = sum(w[0, k] * F.linear(fake_quantize(x, b), fake_quantize_weight(linear.weight, b), linear.bias)
                   for k, b in enumerate(c.bits))
    assert torch.allclose(out, expected)
    (out - linear(x).detach()).pow(2).mean().backward()
    assert c.theta.grad is not None and float(c.theta.grad.abs().sum()) > 0
    assert linear.weight.grad is not None and float(linear.weight.grad.abs().sum()) > 0

    # a hard one-hot sample picks exactly one width and still passes gradients to θ
    c.theta.grad = None
    c.theta.data = torch.tensor([[0.0, 0.0, 30.0]])
    c.resample(1.0, hard=True, noise=False)
    out = mixed(x)
    assert torch.equal(out, F.linear(fake_quantize(x, 16), fake_quantize_weight(linear.weight, 16), linear.bias))
    out.sum().backward()
    assert c.theta.grad is not None


def test_mixed_precision_embedding_gradients_reach_theta_and_table():
    torch.manual_seed(0)
    embedding = nn.Embedding(9, 6)
    c = GumbelController(["e"])
    mixed = MixedPrecisionEmbedding(embedding, c, "e")
    ids = torch.tensor([[1, 2, 8], [0, 0, 3]])
    c.resample(1.0)
    out = mixed(ids)
    assert out.shape == (2, 3, 6)
    (out - embedding(ids).detach()).pow(2).sum().backward()
    assert float(c.theta.grad.abs().sum()) > 0 and float(embedding.weight.grad.abs().sum()) > 0


def lambda_search(lam: float, steps=50, n_groups=4, seed=0) -> dict[str, int]:
    """Optimise θ alone on ``MSE(mixed, float) + λ · expected_cost`` over random data."""
    torch.manual_seed(seed)
    groups = [f"g{i}" for i in range(n_groups)]
    c = GumbelController(groups)
    floats = [nn.Linear(8, 8) for _ in groups]
    mixed = [MixedPrecisionLinear(lin, c, g) for lin, g in zip(floats, groups)]
    x = torch.randn(64, 8)
    targets = [lin(x).detach() for lin in floats]
    counts = {g: 64 for g in groups}
    opt = torch.optim.Adam(c.parameters(), lr=0.1)
    rate = anneal_rate(steps)
    for step in range(steps):
        c.resample(tau_at(step, rate=rate))
        task = sum(F.mse_loss(m(x), t) for m, t in zip(mixed, targets)) / n_groups
        loss = task + lam * c.expected_cost(counts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return c.freeze()


def test_cost_weight_moves_the_chosen_bits():
    free = list(lambda_search(0.0).values())
    assert free.count(16) >= 3 and 4 not in free, free
    cheap = list(lambda_search(1.0).values())
    assert cheap.count(4) >= 3, cheap


# ---------------------------------------------------------------- sensitivity

def test_sensitivity_scores_are_weight_times_activation_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    groups = {"first": [("0", model[0])], "second": [("2", model[2])]}
    batches = [torch.randn(5, 4) * 2 for _ in range(3)]
    var = activation_variance(model, groups, batches)
    inputs0 = torch.cat(batches)
    inputs2 = torch.relu(model[0](inputs0)).detach()
    assert var["0"] == pytest.approx(float(inputs0.var(unbiased=False)), rel=1e-5)
    assert var["2"] == pytest.approx(float(inputs2.var(unbiased=False)), rel=1e-5)
    assert not model[0]._forward_hooks  # hooks removed

    scores = sensitivity_scores(groups, var)
    assert scores["first"] == pytest.approx(float(model[0].weight.detach().var(unbiased=False)) * var["0"], rel=1e-6)
    with torch.no_grad():
        model[2].weight.mul_(10)
    assert sensitivity_scores(groups, var)["second"] == pytest.approx(100 * scores["second"], rel=1e-6)


def test_controller_prior_favours_bits_for_sensitive_groups_and_follows_the_cost():
    scores = {"a": 5.0, "b": 0.1, "c": 1.0, "d": 50.0, "e": 0.01, "f": 2.0}
    counts = {"a": 10, "b": 10, "c": 10, "d": 10, "e": 10, "f": 950}
    theta = controller_prior(scores, counts, (4, 8, 16), lam=0.0, strength=1.0)
    c = GumbelController(list(scores), init=theta)
    assert set(c.freeze().values()) == {16}  # no cost: every group leans to the most bits
    expected = c.expected_bits().tolist()
    by_score = sorted(range(len(scores)), key=lambda i: list(scores.values())[i])
    assert all(expected[i] < expected[j] for i, j in zip(by_score, by_score[1:]))  # the sensitive more steeply
    costly = GumbelController(list(scores), init=controller_prior(scores, counts, (4, 8, 16), lam=10.0))
    assert costly.freeze()["f"] == 4 and costly.freeze()["d"] == 16  # the cost hits the big group
    assert torch.equal(controller_prior(scores, counts, strength=0.0), torch.zeros(6, 3))
    assert controller_prior(scores, counts, (16, 4, 8)).argmax(-1)[3] == 0  # bits in any order: 16 is index 0

    policy = sensitivity_policy(scores, (4, 8, 16))
    assert policy == {"e": 4, "b": 4, "c": 8, "f": 8, "a": 16, "d": 16}
    assert set(sensitivity_policy(scores, (4, 6, 8)).values()) == {4, 6, 8}


# ---------------------------------------------------------------- MultiTaskNLU groups and export

def fake_quant_error_bound(logits: torch.Tensor, bits: int, n_layers: int) -> float:
    """A first-order bound on the logit error of a model whose every group has ``bits``.

    Relative to its output's scale, a ``PrecisionLinear`` is off by at most half a weight
    step (per row, max|W_row|/qmax) plus half an input step (per tensor, max|x|/qmax):
    1/qmax; an embedding row by half a step. The path to a logit runs through the
    embedding, per layer Q and K (their product makes the attention scores), V, the
    attention output, FFN in and FFN out, then the head: 2 + 6 * n_layers steps, each with
    gain about 1 (LayerNorm after each block), so the errors add. The largest |logit| stands
    for the output's scale. All float arithmetic: the same on every CPU up to summation
    order. Measured error/bound on this file's model, 16 bits: at most 0.1.
    """
    return (2 + 6 * n_layers) / qmax(bits) * float(logits.abs().max())


def test_precision_groups_cover_every_linear_once():
    model = make_model()
    groups = precision_groups(model)
    assert list(groups) == ["layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp",
                            "head.id", "head.dc", "head.sf"]
    names = [n for members in groups.values() for n, _ in members]
    assert len(names) == len(set(names)) and set(names) == linears(model)
    assert [n for n, _ in groups["layer1.attention"]] == [
        f"encoder.encoder.layer.1.attention.{p}" for p in ("self.query", "self.key", "self.value", "output.dense")]
    assert all(m is model.get_submodule(n) for members in groups.values() for n, m in members)

    shared = precision_groups(model, per_layer=False, embedding=True)
    assert list(shared) == ["embedding", "attention", "mlp", "head.id", "head.dc", "head.sf"]
    assert len(shared["attention"]) == 8 and len(shared["mlp"]) == 4
    assert shared["embedding"][0][1] is model.encoder.embeddings.word_embeddings

    cls_model = make_model(pooling="cls")
    names = [n for members in precision_groups(cls_model).values() for n, _ in members]
    assert len(names) == len(set(names)) and set(names) == linears(cls_model)
    torch.manual_seed(0)
    idsf = MultiTaskNLU(NLUConfig(n_intents=4, n_domains=3, tags=TAGS, tasks=("id", "sf"), encoder=dict(ENCODER)))
    assert [g for g in precision_groups(idsf) if g.startswith("head")] == ["head.id", "head.sf"]


def test_apply_policy_replaces_linears_and_the_model_runs(tmp_path):
    model = make_model()
    groups = precision_groups(model, embedding=True)
    policy = {g: (4, 8, 16)[i % 3] for i, g in enumerate(groups)}
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch)
    before = copy.deepcopy(model.state_dict())

    quantized = apply_policy(model, policy, groups)
    assert not linears(quantized)
    assert isinstance(quantized.encoder.embeddings.word_embeddings, PrecisionEmbedding)
    for group, members in groups.items():
        for name, _ in members:
            assert quantized.get_submodule(name).bits == policy[group]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the float model is untouched
    with torch.no_grad():
        out = quantized(**batch)
    for key in LOGITS:
        assert out[key].shape == reference[key].shape and torch.all(torch.isfinite(out[key]))
        assert not torch.equal(out[key], reference[key])

    # all-16-bit stays close to float; the whole quantized model saves and reloads with safetensors
    sixteen = apply_policy(model, {g: 16 for g in groups}, groups)
    with torch.no_grad():
        close = sixteen(**batch)
    for key in LOGITS:
        error = float((close[key] - reference[key]).abs().max())
        assert error <= fake_quant_error_bound(reference[key], 16, ENCODER["num_hidden_layers"]), (key, error)
    save_file({k: v.contiguous() for k, v in quantized.state_dict().items()}, tmp_path / "model.safetensors")
    skeleton = apply_policy(make_model(seed=5), policy, precision_groups(make_model(seed=5), embedding=True))
    skeleton.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        again = skeleton(**batch)
    for key in LOGITS:
        assert torch.equal(again[key], out[key])

    partial = apply_policy(model, {"head.sf": 4}, groups)
    assert isinstance(partial.sf_head, PrecisionLinear) and isinstance(partial.id_head, nn.Linear)
    with pytest.raises(KeyError):
        apply_policy(model, {"nope": 4}, groups)


def test_apply_mixed_searches_on_a_tiny_model():
    model = make_model()
    groups = precision_groups(model)
    controller = GumbelController(list(groups))
    mixed = apply_mixed(model, groups, controller)
    assert not linears(mixed) - {n + ".linear" for members in groups.values() for n, _ in members}
    assert all(p is not controller.theta for p in mixed.parameters())
    controller.resample(tau_at(0))
    out = mixed(**make_batch())
    cost = controller.expected_cost(group_param_counts(groups))
    (sum(out[k].pow(2).mean() for k in LOGITS) + cost).backward()
    assert controller.theta.grad is not None and bool(torch.all(controller.theta.grad.abs().sum(-1) > 0))
    assert mixed.id_head.linear.weight.grad is not None
    policy = controller.freeze()
    assert set(policy) == set(groups)

    # export straight from the search copy (after a step on its weights): its trained linears are used
    with torch.no_grad():
        mixed.sf_head.linear.weight.add_(1.0)
    exported = apply_policy(mixed, policy, groups)
    assert not linears(exported) and controller.current is not None  # the live sample survives the copy
    expected = PrecisionLinear.from_linear(mixed.sf_head.linear, policy["head.sf"])
    assert torch.equal(exported.sf_head.qweight, expected.qweight)
    with torch.no_grad():
        assert torch.all(torch.isfinite(exported(**make_batch())["slot_logits"]))


def test_a_frozen_policy_saves_as_safetensors_and_reloads_exactly(tmp_path):
    from compactnlu.bench import artifact_size_mb
    from compactnlu.quant import load_quantized, save_quantized

    model = make_model()
    groups = precision_groups(model, per_layer=True, embedding=True)
    policy = {g: bits for g, bits in zip(groups, [4, 8, 16] * len(groups))}
    frozen = apply_policy(model, policy, groups)
    details = {"policy": policy, "per_channel": True, "per_layer": True, "embedding": True}
    folder = save_quantized(frozen, tmp_path / "pc", "precision", details)

    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "quantization.json"]
    back = load_quantized(folder)
    batch = make_batch()
    with torch.no_grad():
        a, b = frozen(**batch), back(**batch)
    for key in ("intent_logits", "domain_logits", "slot_logits"):
        assert torch.equal(a[key], b[key])
    fp32 = tmp_path / "fp32"
    model.save(fp32)
    assert artifact_size_mb(folder) < artifact_size_mb(fp32)


def test_details_that_would_rebuild_another_model_are_refused_before_writing(tmp_path):
    from compactnlu.quant import save_quantized

    model = make_model()
    groups = precision_groups(model, per_layer=True, embedding=True)
    frozen = apply_policy(model, {g: 6 for g in groups}, groups)
    right = {"policy": {g: 6 for g in groups}, "per_channel": True, "per_layer": True, "embedding": True}
    with pytest.raises(ValueError, match="missing"):
        save_quantized(frozen, tmp_path / "no_policy", "precision", {})
    with pytest.raises(ValueError, match="does not describe the model"):  # loading would give 8-bit layers
        save_quantized(frozen, tmp_path / "all_8", "precision", {**right, "policy": {g: 8 for g in groups}})
    with pytest.raises(ValueError, match="does not describe the model"):
        save_quantized(frozen, tmp_path / "per_tensor", "precision", {**right, "per_channel": False})
    with pytest.raises(ValueError, match="does not fit"):
        save_quantized(frozen, tmp_path / "unknown", "precision", {**right, "policy": {"layer9.mlp": 4}})
    assert not any(tmp_path.iterdir())
    assert save_quantized(frozen, tmp_path / "right", "precision", right).exists()
