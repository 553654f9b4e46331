"""Values that cannot work are refused before anything runs, naming the field, the value and the
allowed range: max_length beyond the position table, a batch size that leaves a handful of
optimizer steps, a decision threshold outside (0, 1), static PTQ's n_batches, and NaN or inf
handed to the quantizer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import compactnlu.inference as inference
from compactnlu.compose import LabelSpace
from compactnlu.config import ProfileError, load_profile, max_length_limit
from compactnlu.features import train_tokenizer
from compactnlu.interface import NLUOutput, choose_labels, decide, decide_sets
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.quant.quantizer import fake_quantize, fake_quantize_weight, quantize_symmetric
from compactnlu.quant.static import calibrate, prepare_static, quantize_static
from compactnlu.trainer import MIN_STEPS, check_steps, fit_and_save, optimizer_steps, training_arguments
from quant_helpers import make_batches, make_model

SMOKE_TRAIN = 540  # examples in the smoke profile's training split (90 per locale, six locales)


# ---------------------------------------------------------------- (1a) max_length and the position table

@pytest.mark.parametrize("name", ["smoke", "default", "paper"])
def test_max_length_beyond_the_position_table_is_refused(name):
    assert max_length_limit(load_profile(name)) == 512  # XLM-R: 514 positions, counted from padding_idx + 1
    assert load_profile(name, {"max_length": 512}).max_length == 512
    for value in (513, 100_000_000):
        with pytest.raises(ProfileError) as info:
            load_profile(name, {"max_length": value})
        message = str(info.value)
        assert f"field max_length={value} is out of range" in message
        assert "8 <= max_length <= 512" in message and "514 positions" in message


def test_a_local_encoders_own_position_table_bounds_max_length(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 130, "pad_token_id": 1}))
    assert load_profile("paper", {"model_name": str(tmp_path), "max_length": 128}).max_length == 128
    with pytest.raises(ProfileError, match=r"max_length=129 is out of range; allowed: 8 <= max_length <= 128"):
        load_profile("paper", {"model_name": str(tmp_path), "max_length": 129})


# ---------------------------------------------------------------- (1b) batch_size and the optimizer steps

def smoke_arguments(tmp_path, overrides=None, **arguments):
    return training_arguments(load_profile("smoke", overrides), tmp_path, **arguments)


def test_a_batch_size_leaving_too_few_optimizer_steps_is_refused(tmp_path):
    args = smoke_arguments(tmp_path, {"batch_size": SMOKE_TRAIN})  # one step an epoch, 8 epochs
    assert optimizer_steps(args, SMOKE_TRAIN) == 8 < MIN_STEPS
    with pytest.raises(ProfileError) as info:
        check_steps(args, SMOKE_TRAIN)
    message = str(info.value)
    assert f"field batch_size={SMOKE_TRAIN} is out of range" in message
    assert "8 optimizer steps" in message and f"at least {MIN_STEPS} steps" in message


def test_fit_and_save_refuses_too_few_steps_before_training(tmp_path):
    def train(**_):
        raise AssertionError("trained despite too few steps")

    trainer = SimpleNamespace(args=smoke_arguments(tmp_path, {"batch_size": 1000}),
                              train_dataset=list(range(SMOKE_TRAIN)), train=train)
    with pytest.raises(ProfileError, match="batch_size=1000"):
        fit_and_save(trainer, tmp_path / "final", save=lambda folder: None)
    assert not (tmp_path / "final").exists()


def test_gradient_accumulation_counts_towards_the_batch(tmp_path):
    plain = smoke_arguments(tmp_path, {"epochs": 1.0})  # 34 batches of 16
    assert optimizer_steps(plain, SMOKE_TRAIN) == 34
    accumulated = smoke_arguments(tmp_path, {"epochs": 1.0}, gradient_accumulation_steps=4)
    assert optimizer_steps(accumulated, SMOKE_TRAIN) == 9  # ceil(34 / 4)
    with pytest.raises(ProfileError, match="9 optimizer steps"):
        check_steps(accumulated, SMOKE_TRAIN)


def test_the_smoke_profiles_own_runs_have_enough_steps(tmp_path):
    smoke = load_profile("smoke")
    check_steps(smoke_arguments(tmp_path), SMOKE_TRAIN)
    check_steps(smoke_arguments(tmp_path, {"epochs": 1.0}), SMOKE_TRAIN)  # the tests' SMOKE override
    # the MLM phase on two processes (tests/test_train.py's torchrun test): 5 batches of 2 x 64, 2 epochs
    ddp_mlm = SimpleNamespace(max_steps=-1, per_device_train_batch_size=smoke.mlm_batch_size, world_size=2,
                              gradient_accumulation_steps=1, num_train_epochs=smoke.mlm_epochs)
    assert optimizer_steps(ddp_mlm, SMOKE_TRAIN) == MIN_STEPS
    check_steps(ddp_mlm, SMOKE_TRAIN)


def test_an_explicit_max_steps_is_not_second_guessed(tmp_path):
    check_steps(smoke_arguments(tmp_path, max_steps=2), SMOKE_TRAIN)


@pytest.mark.parametrize("field", ["batch_size", "mlm_batch_size"])
def test_a_batch_size_beyond_any_training_set_is_refused_by_the_profile(field):
    with pytest.raises(ProfileError, match=f"field {field}=1000000000 is out of range; allowed: >= 1 and <= 1000000"):
        load_profile("smoke", {field: 1_000_000_000})


# ---------------------------------------------------------------- (1c) the decision threshold

BAD_THRESHOLDS = [float("nan"), -1, 0, 0.0, 1, 1.0, 2, float("inf"), True, "0.5", None]


@pytest.mark.parametrize("threshold", BAD_THRESHOLDS, ids=repr)
def test_a_threshold_outside_zero_to_one_is_refused(threshold):
    probs = torch.tensor([[0.2, 0.7], [0.9, 0.1]])
    expected = rf"threshold={threshold!r} is out of range; allowed: a finite number with 0 < threshold < 1"
    for call in (lambda: choose_labels(probs, threshold), lambda: decide_sets(probs.numpy(), threshold),
                 lambda: decide(NLUOutput(), None, None, threshold)):
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            call()


@pytest.mark.parametrize("threshold", [0.5, 1e-6, 0.999, np.float32(0.3)], ids=repr)
def test_a_threshold_inside_zero_to_one_is_accepted(threshold):
    chosen = choose_labels(torch.tensor([[0.2, 0.7], [0.9, 0.1]]), threshold)
    assert chosen.dtype == torch.bool and chosen.any(1).all()


TEXTS = ["wake me at five am", "play some music by the band", "set an alarm for six"] * 3


def test_predict_refuses_a_bad_threshold(monkeypatch):
    tokenizer = train_tokenizer(TEXTS, vocab_size=60)
    labels = LabelSpace(intents=("alarm_set", "play_music"), scenarios=("alarm", "music"), slot_types=("time",))
    torch.manual_seed(0)
    encoder = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=18, pad_token_id=1, type_vocab_size=1)
    model = MultiTaskNLU(NLUConfig(n_intents=2, n_domains=2, tags=labels.tags, encoder=encoder)).eval()
    monkeypatch.setattr(inference, "_data", lambda profile: SimpleNamespace(tokenizer=tokenizer, labels=labels))
    monkeypatch.setattr(inference, "_model", lambda profile, variant: model)
    profile = load_profile("default", {"max_length": 16})
    assert inference.predict("wake me at five", profile=profile, threshold=0.5)["intents"]
    for threshold in (float("nan"), 0, 1, -1, 2):
        with pytest.raises(ValueError, match=f"threshold={threshold!r} is out of range"):
            inference.predict("wake me at five", profile=profile, threshold=threshold)


# ---------------------------------------------------------------- (1d) static PTQ's n_batches

@pytest.mark.parametrize("n_batches", [None, 0, -1, 1.5, True, "2"], ids=repr)
def test_static_ptq_refuses_an_n_batches_that_is_not_a_positive_integer(n_batches):
    expected = f"n_batches={n_batches!r} is out of range; allowed: a positive integer"
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        quantize_static(make_model(seed=1), iter(make_batches(2)), n_batches)
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        calibrate(prepare_static(make_model(seed=1)), iter(make_batches(2)), n_batches)


def test_static_ptq_takes_a_numpy_integer_n_batches():
    _, used = quantize_static(make_model(seed=1), iter(make_batches(3)), np.int64(2))
    assert used == 2


# ---------------------------------------------------------------- (2) the quantizer refuses NaN and inf

def with_bad_values(shape=(4, 6), nan=0, inf=0, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(*shape).to(dtype)
    flat = x.view(-1)
    flat[:nan] = float("nan")
    flat[nan:nan + inf] = float("inf")
    if inf > 1:
        flat[nan + inf - 1] = float("-inf")
    return x


QUANTIZERS = {
    "fake_quantize": lambda x: fake_quantize(x, 8),
    "fake_quantize per channel": lambda x: fake_quantize(x, 4, per_channel=True),
    "fake_quantize_weight": lambda x: fake_quantize_weight(x, 8),
    "quantize_symmetric": lambda x: quantize_symmetric(x, 8),
    "quantize_symmetric per tensor": lambda x: quantize_symmetric(x, 16, per_channel=False),
}


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=str)
@pytest.mark.parametrize("nan, inf, kind", [(1, 0, "NaN"), (0, 1, "inf"), (0, 2, "inf"), (2, 3, "NaN")])
def test_the_quantizer_refuses_nan_and_inf_with_a_count(quantizer, nan, inf, kind):
    where = quantizer.split()[0]
    with pytest.raises(ValueError, match=rf"{where}: tensor '[xw]' holds {kind} values "
                                         rf"\({nan} NaN, {inf} inf of 24\); only finite values"):
        QUANTIZERS[quantizer](with_bad_values(nan=nan, inf=inf))


def test_fake_quantize_refuses_nan_in_half_precision_and_1d_tensors():
    with pytest.raises(ValueError, match="holds NaN"):
        fake_quantize(with_bad_values(nan=1, dtype=torch.bfloat16), 8)
    with pytest.raises(ValueError, match=r"\(0 NaN, 1 inf of 5\)"):
        fake_quantize(torch.tensor([1.0, 2.0, float("inf"), 0.0, -1.0]), 8, per_channel=True)


def test_finite_input_still_quantizes_and_passes_gradients():
    x = torch.randn(4, 6, requires_grad=True)
    y = fake_quantize_weight(x, 8)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.equal(x.grad, torch.ones_like(x))
    q, scale = quantize_symmetric(x.detach(), 8)
    assert math.isclose(float((q.float() * scale - x.detach()).abs().max()), 0.0, abs_tol=float(scale.max()))
