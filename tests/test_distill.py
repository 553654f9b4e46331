"""``compactnlu.distill``: the loss terms on hand-made tensors, gradients through the Distiller,
the teacher cache, the collator and ``distill_student`` on the smoke profile.

Loss terms are checked against values worked out by hand (Bernoulli / categorical KL
written out with ``math``); the Distiller runs on a tiny MultiTaskNLU with hand-made
teacher tensors; everything that trains runs on the smoke profile in one temporary
artifacts folder for the module, single-threaded (the machine has two cores and other work).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import compactnlu.teacher_cache as teacher_cache
from compactnlu.config import load_profile
from compactnlu.distill import (TASK_TEACHERS, DistillCollator, DistillConfig, Distiller, attach_rows,
                                distill_student, fusion_weights)
from compactnlu.kd_losses import (TeacherFusion, adaptive_temperature, contrastive_loss, fuse, multilabel_confidence,
                                  multilabel_kd, representation_mse, token_kd)
from compactnlu.teacher_cache import cached_teacher_outputs, teacher_outputs, teacher_outputs_dir
from compactnlu.features import build_study_data
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.train import TEACHERS, collator_for, train_model

SMOKE = {"epochs": 1}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softmax(values: list[float]) -> list[float]:
    e = [math.exp(v) for v in values]
    return [v / sum(e) for v in e]


def bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def categorical_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))



# ---------------------------------------------------------------- multilabel_kd

# Two labels: student logits s, teacher logits z.
S2, Z2 = [0.0, 2.0], [2.0, -2.0]


def hand_multilabel_kd(s: list[float], z: list[float], t: float) -> float:
    """Mean over labels of KL(Bern(σ(z/T)) ‖ Bern(σ(s/T))), × T²."""
    return t * t * sum(bernoulli_kl(sigmoid(zi / t), sigmoid(si / t)) for si, zi in zip(s, z)) / len(s)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 12.0])
def test_multilabel_kd_is_zero_when_student_equals_teacher(temperature):
    torch.manual_seed(0)
    logits = torch.randn(5, 7) * 3
    loss = multilabel_kd(logits.clone(), logits, torch.full((5,), temperature))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    # and not zero otherwise
    assert multilabel_kd(logits + 1.0, logits, torch.full((5,), temperature)).item() > 1e-4


def test_multilabel_kd_is_zero_when_equal_with_per_example_temperatures():
    torch.manual_seed(1)
    logits = torch.randn(4, 6) * 5
    assert multilabel_kd(logits, logits, torch.tensor([0.5, 1.0, 4.0, 8.0])).item() == pytest.approx(0, abs=1e-5)


def test_multilabel_kd_hand_computed_values_and_t_squared_scaling():
    s, z = torch.tensor([S2]), torch.tensor([Z2])
    at1 = multilabel_kd(s, z, torch.tensor([1.0]))
    at2 = multilabel_kd(s, z, torch.tensor([2.0]))
    # worked out by hand: T=1: (KL(σ2‖½) + KL(σ-2‖σ2)) / 2; T=2: the same at z/2, s/2, times 4
    assert at1.item() == pytest.approx(0.9255008, rel=1e-5)
    assert at2.item() == pytest.approx(1.1461225, rel=1e-5)
    assert at1.item() == pytest.approx(hand_multilabel_kd(S2, Z2, 1.0), rel=1e-5)
    assert at2.item() == pytest.approx(hand_multilabel_kd(S2, Z2, 2.0), rel=1e-5)
    # T² scaling: at T=2 the loss is 4 × the unscaled mean KL of the softened sigmoids
    unscaled = sum(bernoulli_kl(sigmoid(zi / 2), sigmoid(si / 2)) for si, zi in zip(S2, Z2)) / 2
    assert at2.item() == pytest.approx(4 * unscaled, rel=1e-5)


def test_multilabel_kd_per_example_temperature_broadcasts():
    s, z = torch.tensor([S2, S2, [1.0, -1.0]]), torch.tensor([Z2, Z2, [-3.0, 0.5]])
    temperature = torch.tensor([1.0, 2.0, 4.0])
    loss = multilabel_kd(s, z, temperature)
    expected = (hand_multilabel_kd(S2, Z2, 1.0) + hand_multilabel_kd(S2, Z2, 2.0)
                + hand_multilabel_kd([1.0, -1.0], [-3.0, 0.5], 4.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    separately = [multilabel_kd(s[i:i + 1], z[i:i + 1], temperature[i:i + 1]) for i in range(3)]
    assert loss.item() == pytest.approx(sum(x.item() for x in separately) / 3, rel=1e-5)
    # a scalar temperature means the same T for every example
    assert multilabel_kd(s, z, torch.tensor(2.0)).item() == pytest.approx(
        multilabel_kd(s, z, torch.full((3,), 2.0)).item(), rel=1e-6)


def test_multilabel_kd_one_label_and_three_label_examples():
    """One batch: an example with one gold intent and one with three (multi-hot)."""
    gold = torch.tensor([[0.0, 1, 0, 0, 0], [1.0, 0, 1, 1, 0]])
    assert gold.sum(1).tolist() == [1.0, 3.0]
    teacher = 6.0 * (2 * gold - 1)  # a confident teacher that knows the gold sets
    temperature = adaptive_temperature(4.0, multilabel_confidence(teacher))

    same = teacher.clone().requires_grad_(True)
    zero = multilabel_kd(same, teacher, temperature)
    assert torch.isfinite(zero) and zero.item() == pytest.approx(0.0, abs=1e-5)

    student = torch.zeros(2, 5, requires_grad=True)
    loss = multilabel_kd(student, teacher, temperature)
    assert torch.isfinite(loss) and loss.item() > 0.1
    loss.backward()
    grad = student.grad
    assert torch.isfinite(grad).all() and (grad != 0).all()
    # descending the gradient moves the student toward each example's gold set (one and three labels)
    assert torch.equal(grad < 0, gold.bool())


# ---------------------------------------------------------------- token_kd

# Two words, three tags.
S3 = [[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
Z3 = [[0.0, 1.0, 0.0], [2.0, 0.0, -2.0]]


def hand_token_kd(t: float) -> float:
    kl = [categorical_kl(softmax([v / t for v in z]), softmax([v / t for v in s])) for s, z in zip(S3, Z3)]
    return t * t * sum(kl) / len(kl)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 8.0])
def test_token_kd_is_zero_when_equal(temperature):
    torch.manual_seed(2)
    emissions = torch.randn(6, 4) * 3
    assert token_kd(emissions, emissions.clone(), torch.full((6,), temperature)).item() == pytest.approx(0, abs=1e-5)
    assert token_kd(emissions.flip(-1), emissions, torch.full((6,), temperature)).item() > 1e-4


def test_token_kd_hand_computed_kl_and_t_squared_scaling():
    s, z = torch.tensor(S3), torch.tensor(Z3)
    at1 = token_kd(s, z, torch.ones(2))
    at2 = token_kd(s, z, torch.full((2,), 2.0))
    assert at1.item() == pytest.approx(0.5449165, rel=1e-5)
    assert at1.item() == pytest.approx(hand_token_kd(1.0), rel=1e-5)
    assert at2.item() == pytest.approx(0.7560820, rel=1e-5)
    assert at2.item() == pytest.approx(hand_token_kd(2.0), rel=1e-5)
    # × T²: four times the mean KL between the distributions softened at T=2
    unscaled = token_kd(s / 2, z / 2, torch.ones(2))
    assert at2.item() == pytest.approx(4 * unscaled.item(), rel=1e-5)
    # KL(teacher ‖ student), not the reverse
    reverse = sum(categorical_kl(softmax(a), softmax(b)) for a, b in zip(S3, Z3)) / 2
    assert abs(at1.item() - reverse) > 1e-3
    # per-word temperatures
    mixed = token_kd(s, z, torch.tensor([1.0, 2.0]))
    word = [token_kd(s[i:i + 1], z[i:i + 1], torch.tensor([t])).item() for i, t in enumerate((1.0, 2.0))]
    assert mixed.item() == pytest.approx(sum(word) / 2, rel=1e-5)


# ---------------------------------------------------------------- representation_mse, contrastive_loss

def test_representation_mse_known_value():
    a = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert representation_mse(a, b).item() == pytest.approx((1 + 0 + 4 + 4) / 4)
    assert representation_mse(a, a.clone()).item() == 0.0


def test_contrastive_loss_matching_orthogonal_rows_is_near_zero():
    rows = torch.eye(4)
    assert contrastive_loss(rows, rows.clone(), tau=0.01).item() == pytest.approx(0.0, abs=1e-6)
    # scale does not matter (cosine similarity)
    assert contrastive_loss(3 * rows, rows, tau=0.01).item() == pytest.approx(0.0, abs=1e-6)
    # with tau = 1 the same rows give log(1 + (N-1)e^-1)
    assert contrastive_loss(rows, rows, tau=1.0).item() == pytest.approx(math.log(1 + 3 * math.exp(-1)), rel=1e-5)
    # each student row matched to another row's teacher: large loss
    assert contrastive_loss(rows, rows.roll(1, 0), tau=0.01).item() > 50


@pytest.mark.parametrize("n", [2, 5])
def test_contrastive_loss_identical_rows_is_log_n(n):
    rows = torch.tensor([[0.3, -1.0, 2.0]]).repeat(n, 1)
    assert contrastive_loss(rows, rows.clone(), tau=0.1).item() == pytest.approx(math.log(n), rel=1e-5)


# ---------------------------------------------------------------- temperature, confidence, fusion

def test_adaptive_temperature():
    confidence = torch.tensor([0.0, 0.5, 1.0])
    assert adaptive_temperature(4.0, confidence).tolist() == pytest.approx([2.0, 4.0, 6.0])
    assert adaptive_temperature(8.0, confidence).tolist() == pytest.approx([4.0, 8.0, 12.0])
    # out-of-range confidences are clamped to [T/2, 3T/2]
    assert adaptive_temperature(4.0, torch.tensor([-1.0, 2.0])).tolist() == pytest.approx([2.0, 6.0])
    fixed = adaptive_temperature(4.0, confidence, adaptive=False)
    assert fixed.tolist() == [4.0, 4.0, 4.0] and fixed.shape == confidence.shape


def test_multilabel_confidence():
    assert multilabel_confidence(torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    assert multilabel_confidence(torch.tensor([[50.0, -50.0]])).item() == pytest.approx(1.0)
    # mean over labels of |2σ(z) − 1|
    z = [2.0, -1.0, 0.0]
    expected = sum(abs(2 * sigmoid(v) - 1) for v in z) / 3
    assert multilabel_confidence(torch.tensor([z])).item() == pytest.approx(expected, rel=1e-6)
    assert multilabel_confidence(torch.tensor([z])).item() == pytest.approx(
        multilabel_confidence(-torch.tensor([z])).item(), rel=1e-6)  # symmetric in the sign


def test_fuse():
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    values = torch.tensor([[[1.0, 2.0], [5.0, 6.0]], [[-1.0, 3.0], [9.0, 9.0]]])  # [N=2, K=2, D=2]
    assert fuse(weights, values).tolist() == [[4.0, 5.0], [-1.0, 3.0]]


def test_teacher_fusion_weights_sum_to_one_and_mean_mode_halves():
    torch.manual_seed(3)
    student, outputs = torch.randn(6, 8), torch.randn(6, 2, 5)
    attention = TeacherFusion(8, 5, hidden=16)
    w = attention.weights(student, outputs)
    assert w.shape == (6, 2)
    assert torch.allclose(w.sum(1), torch.ones(6))
    assert (w > 0).all() and not torch.allclose(w, torch.full_like(w, 0.5))  # depends on the inputs
    mean = TeacherFusion(8, 5, hidden=16, mode="mean").weights(student, outputs)
    assert mean.shape == (6, 2) and torch.equal(mean, torch.full((6, 2), 0.5))


# ---------------------------------------------------------------- the Distiller on a tiny student

ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
TAGS = ("O", "B-a", "I-a", "B-b", "I-b")
N_INTENTS, N_DOMAINS, TEACHER_HIDDEN = 4, 3, 8


def tiny_distiller(seed: int = 0, loss_weights: dict | None = None, **config) -> Distiller:
    torch.manual_seed(seed)
    student = MultiTaskNLU(NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=TAGS, encoder=dict(ENCODER),
                                     loss_weights=loss_weights or {"id": 1.0, "dc": 1.0, "sf": 1.0}))
    return Distiller(student, DistillConfig(fusion_hidden=8, **config), TEACHER_HIDDEN)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two examples (one padded; 4 and 3 words), one gold intent in the first, three in the second."""
    input_ids = torch.tensor([[0, 7, 8, 9, 10, 11, 2], [0, 12, 13, 14, 2, 1, 1]])
    slot_labels = torch.tensor([[-100, 1, -100, 2, 0, 3, -100], [-100, 0, 3, 4, -100, -100, -100]])
    n_words = int((slot_labels != -100).sum())
    assert n_words == 7
    g = torch.Generator().manual_seed(5)
    return dict(input_ids=input_ids, attention_mask=(input_ids != 1).long(), slot_labels=slot_labels,
                intent_labels=torch.tensor([[0.0, 1, 0, 0], [1.0, 1, 0, 1]]),
                domain_labels=torch.tensor([[1.0, 0, 0], [0, 1, 1]]),
                teacher_id=torch.randn(2, 2, N_INTENTS, generator=g) * 2,
                teacher_dc=torch.randn(2, 2, N_DOMAINS, generator=g) * 2,
                teacher_sf=torch.randn(n_words, 2, len(TAGS), generator=g) * 2,
                teacher_hidden=torch.randn(n_words, 2, TEACHER_HIDDEN, generator=g))


def grads(module, prefix: str) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters() if n.startswith(prefix)}


def nonzero(grad) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


FUSION_PARAMS = [f"fusion.{task}.{layer}.weight" for task in ("id", "dc", "sf")
                 for layer in ("student", "teacher", "score")]


def test_distiller_terms_total_and_gradients(batch):
    w = {"id": 10.0, "dc": 3.0, "sf": 1.5}  # the student's per-task loss weights scale its CE and KD terms alike
    distiller = tiny_distiller(loss_weights=w).train()
    out = distiller(**batch)
    terms = out["terms"]
    assert set(terms) == {"ce_id", "ce_dc", "ce_sf", "kd_id", "kd_dc", "kd_sf", "mse_sf", "crd_sf", "fusion"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    c = distiller.config
    expected = (c.alpha * w["id"] * (terms["ce_id"] + terms["kd_id"])
                + c.beta * w["dc"] * (terms["ce_dc"] + terms["kd_dc"])
                + c.gamma * w["sf"] * (terms["ce_sf"] + terms["kd_sf"] + terms["mse_sf"] + terms["crd_sf"])
                + terms["fusion"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["fusion_weights"]["id"].shape == (2, 2) and out["fusion_weights"]["sf"].shape == (7, 2)
    for w in out["fusion_weights"].values():
        assert not w.requires_grad and torch.allclose(w.sum(1), torch.ones(len(w)))

    out["loss"].backward()
    params = dict(distiller.named_parameters())
    for name in ("student.encoder.embeddings.word_embeddings.weight",
                 "student.encoder.encoder.layer.0.attention.self.query.weight",
                 "student.id_head.weight", "student.dc_head.weight", "student.sf_head.weight",
                 "projection.weight", "projection.bias", *FUSION_PARAMS):
        assert nonzero(params[name].grad), name


def test_fusion_trains_on_its_own_term_and_kd_sees_its_weights_as_constants(batch):
    distiller = tiny_distiller().train()
    terms = distiller(**batch)["terms"]
    # the distillation terms do not reach the fusion ...
    (terms["kd_id"] + terms["kd_dc"] + terms["kd_sf"] + terms["mse_sf"] + terms["crd_sf"]).backward(
        retain_graph=True)
    assert all(g is None or not g.any() for g in grads(distiller, "fusion.").values())
    assert nonzero(distiller.projection.weight.grad) and nonzero(distiller.student.id_head.weight.grad)
    distiller.zero_grad(set_to_none=True)
    # ... and the fusion term reaches only the fusion
    terms["fusion"].backward()
    assert all(nonzero(g) for n, g in grads(distiller, "fusion.").items() if n.endswith("weight")), \
        grads(distiller, "fusion.")
    assert all(g is None for g in grads(distiller, "student.").values())
    assert distiller.projection.weight.grad is None


@pytest.mark.parametrize("off, gone", [
    ({"use_kd": False}, {"kd_id", "kd_dc", "kd_sf"}),
    ({"use_mse": False}, {"mse_sf"}),
    ({"use_crd": False}, {"crd_sf"}),
    ({"use_mse": False, "use_crd": False}, {"mse_sf", "crd_sf"}),
    ({"use_kd": False, "use_mse": False, "use_crd": False}, {"kd_id", "kd_dc", "kd_sf", "mse_sf", "crd_sf", "fusion"}),
])
def test_switching_terms_off_removes_them(batch, off, gone):
    everything = {"ce_id", "ce_dc", "ce_sf", "kd_id", "kd_dc", "kd_sf", "mse_sf", "crd_sf", "fusion"}
    distiller = tiny_distiller(**off).train()
    out = distiller(**batch)
    terms = out["terms"]
    assert set(terms) == everything - gone
    c = distiller.config
    expected = (c.alpha * (terms["ce_id"] + terms.get("kd_id", 0)) + c.beta * (terms["ce_dc"] + terms.get("kd_dc", 0))
                + c.gamma * (terms["ce_sf"] + terms.get("kd_sf", 0) + terms.get("mse_sf", 0)
                             + terms.get("crd_sf", 0)) + terms.get("fusion", 0))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert nonzero(distiller.student.id_head.weight.grad)
    if {"mse_sf", "crd_sf"} <= gone:
        assert distiller.projection.weight.grad is None
    else:
        assert nonzero(distiller.projection.weight.grad)


def test_mean_fusion_has_no_fusion_term_and_halves(batch):
    distiller = tiny_distiller(fusion="mean").train()
    out = distiller(**batch)
    assert "fusion" not in out["terms"]
    assert {"kd_id", "kd_dc", "kd_sf", "mse_sf", "crd_sf"} <= set(out["terms"])
    for task, n in (("id", 2), ("dc", 2), ("sf", 7)):
        assert torch.equal(out["fusion_weights"][task], torch.full((n, 2), 0.5)), task
    # the fused teacher is the plain average: kd_id equals KD against the mean of the two teachers
    mean_id = batch["teacher_id"].mean(1)
    t = adaptive_temperature(4.0, multilabel_confidence(mean_id))
    assert out["terms"]["kd_id"].item() == pytest.approx(
        multilabel_kd(out["intent_logits"], mean_id, t).item(), rel=1e-5)
    out["loss"].backward()
    assert all(g is None for g in grads(distiller, "fusion.").values())
    assert nonzero(distiller.student.encoder.embeddings.word_embeddings.weight.grad)


def test_distiller_kd_on_one_and_three_label_examples(batch):
    """KD through the Distiller: zero when the fused teacher is the student itself, finite and
    with a gradient otherwise; the batch holds one single-label and one three-label example."""
    assert batch["intent_labels"].sum(1).tolist() == [1.0, 3.0]
    distiller = tiny_distiller().eval()  # no dropout: the student's own logits are reproducible
    with torch.no_grad():
        own = distiller.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["slot_labels"] != -100
    mirror = dict(batch, teacher_id=own["intent_logits"].unsqueeze(1).repeat(1, 2, 1),
                  teacher_dc=own["domain_logits"].unsqueeze(1).repeat(1, 2, 1),
                  teacher_sf=own["slot_logits"][mask].unsqueeze(1).repeat(1, 2, 1))
    terms = distiller(**mirror)["terms"]
    for name in ("kd_id", "kd_dc", "kd_sf"):
        assert torch.isfinite(terms[name]) and terms[name].item() == pytest.approx(0.0, abs=1e-5), name

    gold_teacher = dict(batch, teacher_id=(6.0 * (2 * batch["intent_labels"] - 1)).unsqueeze(1).repeat(1, 2, 1))
    kd = distiller(**gold_teacher)["terms"]["kd_id"]
    assert torch.isfinite(kd) and kd.item() > 0.01
    kd.backward()
    grad = distiller.student.id_head.bias.grad
    assert nonzero(grad) and torch.isfinite(grad).all()
    assert nonzero(distiller.student.encoder.embeddings.word_embeddings.weight.grad)


def test_distiller_without_teacher_tensors_is_the_plain_student(batch):
    distiller = tiny_distiller().eval()
    plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    with torch.no_grad():
        out = distiller(**plain)
        alone = distiller.student(**plain)
    assert "terms" not in out and "fusion_weights" not in out
    assert torch.equal(out["loss"], alone["loss"]) and torch.equal(out["intent_logits"], alone["intent_logits"])


# ---------------------------------------------------------------- smoke profile: teachers and their cache

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill") / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPACTNLU_ARTIFACTS", str(folder))
        yield folder


@pytest.fixture(scope="module")
def profile(artifacts):
    p = load_profile("smoke", SMOKE)
    assert p.name == "smoke" and p.artifacts_dir == artifacts
    return p


@pytest.fixture(scope="module")
def data(profile):
    return build_study_data(profile)


@pytest.fixture(scope="module")
def collator(data):
    return collator_for(data)


@pytest.fixture(scope="module")
def teachers(profile, data):
    return {name: train_model(profile, data, name, tasks=tasks) for name, tasks in TEACHERS.items()}


@pytest.fixture(scope="module")
def dev_cache(teachers, data, profile, collator):
    return cached_teacher_outputs(profile, teachers, data, "dev", collator)


def word_counts(dataset) -> list[int]:
    return [sum(1 for x in row if x != -100) for row in dataset["slot_labels"]]


@pytest.fixture
def fresh_artifacts(tmp_path, monkeypatch) -> Path:
    """An empty artifacts folder for this test (the teachers stay where they were trained)."""
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    return tmp_path


def test_teacher_cache_is_written_then_reused(profile, teachers, data, collator, fresh_artifacts, monkeypatch):
    root = fresh_artifacts / "teacher_cache"
    first = cached_teacher_outputs(profile, teachers, data, "dev", collator)
    folders = list(root.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("dev-")
    assert sorted(p.name for p in folders[0].iterdir()) == sorted(f"{n}.safetensors" for n in TEACHERS)
    assert set(first) == set(TEACHERS)
    assert set(first["teacher_idsf"]) == {"id", "sf", "hidden", "word_offsets"}
    assert set(first["teacher_iddc"]) == {"id", "dc", "word_offsets"}
    assert set(first["teacher_dcsf"]) == {"dc", "sf", "hidden", "word_offsets"}
    assert first["teacher_idsf"]["id"].dtype == torch.float16

    def refuse(*a, **k):
        raise AssertionError("teacher_outputs recomputed: the cache was not used")
    monkeypatch.setattr(teacher_cache, "teacher_outputs", refuse)
    again = cached_teacher_outputs(profile, teachers, data, "dev", collator)
    assert list(root.iterdir()) == folders
    for name in TEACHERS:
        assert set(again[name]) == set(first[name])
        for key in first[name]:
            assert torch.equal(again[name][key], first[name][key]), (name, key)
    # the test split is another cache entry (and needs the teachers again)
    with pytest.raises(AssertionError, match="cache was not used"):
        cached_teacher_outputs(profile, teachers, data, "test", collator)


def test_cached_outputs_are_the_teachers_outputs(teachers, data, collator, dev_cache):
    dataset = data.features["dev"]
    n = len(dataset)
    fresh = teacher_outputs(teachers["teacher_idsf"].model, dataset, collator)
    for key in ("id", "sf", "hidden", "word_offsets"):
        assert torch.equal(dev_cache["teacher_idsf"][key], fresh[key]), key
    # other batch boundaries (other padding) fill the same rows and words, up to float16 rounding
    small = teacher_outputs(teachers["teacher_idsf"].model, dataset, collator, batch_size=50)
    assert torch.equal(small["word_offsets"], fresh["word_offsets"])
    for key in ("id", "sf", "hidden"):
        assert small[key].shape == fresh[key].shape, key
        assert torch.allclose(small[key].float(), fresh[key].float(), atol=2e-2), key
    assert dev_cache["teacher_iddc"]["id"].shape == (n, len(data.labels.intents))
    assert dev_cache["teacher_dcsf"]["dc"].shape == (n, len(data.labels.scenarios))
    # one example on its own gives the same logits and word emissions as its row in the cache
    i = 3
    one = collator([dataset[i]])
    with torch.no_grad():
        out = teachers["teacher_dcsf"].model(input_ids=one["input_ids"], attention_mask=one["attention_mask"])
    offsets = dev_cache["teacher_dcsf"]["word_offsets"]
    assert torch.allclose(dev_cache["teacher_dcsf"]["dc"][i].float(), out["domain_logits"][0], atol=2e-2)
    words = out["slot_logits"][one["slot_labels"] != -100]
    assert torch.allclose(dev_cache["teacher_dcsf"]["sf"][offsets[i]:offsets[i + 1]].float(), words, atol=2e-2)


def test_cached_word_offsets_match_slot_labels(data, dev_cache):
    counts = word_counts(data.features["dev"])
    assert min(counts) > 0 and len(set(counts)) > 1
    for name, cache in dev_cache.items():
        offsets = cache["word_offsets"]
        assert offsets[0] == 0 and len(offsets) == len(counts) + 1, name
        assert np.diff(offsets.numpy()).tolist() == counts, name
        for key in ("sf", "hidden"):
            if key in cache:
                assert cache[key].shape[0] == sum(counts), (name, key)


def test_retrained_teacher_invalidates_the_cache(profile, teachers, data, collator, fresh_artifacts):
    root = fresh_artifacts / "teacher_cache"
    before = cached_teacher_outputs(profile, teachers, data, "dev", collator)
    retrained = train_model(load_profile("smoke", {**SMOKE, "learning_rate": 1e-3}), data, "teacher_idsf",
                            tasks=TEACHERS["teacher_idsf"])
    assert retrained.path != teachers["teacher_idsf"].path
    swapped = {**teachers, "teacher_idsf": retrained}
    after = cached_teacher_outputs(profile, swapped, data, "dev", collator)

    folders = sorted(p.name for p in root.iterdir())
    expected = sorted(teacher_outputs_dir(profile, ts, "dev", len(data.features["dev"])).name
                      for ts in (teachers, swapped))
    assert len(set(expected)) == 2 and folders == expected
    assert not torch.equal(after["teacher_idsf"]["id"], before["teacher_idsf"]["id"])  # really recomputed
    assert torch.equal(after["teacher_iddc"]["id"], before["teacher_iddc"]["id"])


def test_distill_collator_adds_the_batchs_teacher_tensors(data, collator, dev_cache):
    dataset = attach_rows(data.features["dev"])
    assert dataset["row"] == list(range(len(dataset)))
    collate = DistillCollator(collator, dev_cache)
    rows = [5, 0, 17]
    examples = [dataset[r] for r in rows]
    batch = collate(examples)
    n_words = int((batch["slot_labels"] != -100).sum())
    assert n_words == sum(word_counts(data.features["dev"].select(rows)))
    hidden = dev_cache["teacher_idsf"]["hidden"].shape[1]
    assert batch["teacher_id"].shape == (3, 2, len(data.labels.intents))
    assert batch["teacher_dc"].shape == (3, 2, len(data.labels.scenarios))
    assert batch["teacher_sf"].shape == (n_words, 2, len(data.labels.tags))
    assert batch["teacher_hidden"].shape == (n_words, 2, hidden)
    assert all(batch[k].dtype == torch.float32 for k in ("teacher_id", "teacher_dc", "teacher_sf", "teacher_hidden"))
    # the right rows, in batch order, from the right teachers
    for j, teacher in enumerate(TASK_TEACHERS["id"]):
        assert torch.equal(batch["teacher_id"][:, j], dev_cache[teacher]["id"][rows].float())
    for j, teacher in enumerate(TASK_TEACHERS["dc"]):
        assert torch.equal(batch["teacher_dc"][:, j], dev_cache[teacher]["dc"][rows].float())
    offsets = dev_cache["teacher_dcsf"]["word_offsets"]
    first = offsets[rows[0] + 1] - offsets[rows[0]]
    assert torch.equal(batch["teacher_sf"][:first, 1], dev_cache["teacher_dcsf"]["sf"][offsets[5]:offsets[6]].float())
    second = slice(int(first), int(first + offsets[1] - offsets[0]))
    assert torch.equal(batch["teacher_hidden"][second, 0],
                       dev_cache["teacher_idsf"]["hidden"][offsets[0]:offsets[1]].float())

    # rows without a `row` column (evaluation) get the plain batch, nothing extra
    plain_examples = [data.features["dev"][r] for r in rows]
    plain, base = collate(plain_examples), collator(plain_examples)
    assert set(plain) == set(base)
    assert all(torch.equal(plain[k], base[k]) for k in base)


# ---------------------------------------------------------------- distill_student

def no_training(*a, **k):
    raise RuntimeError("Trainer built: the saved student was not used")


def refuse_trainer(monkeypatch):
    """Make the Trainer distill_student builds (``train.StudyTrainer``, looked up at call time)
    give ``no_training``."""
    from compactnlu import train
    monkeypatch.setattr(train, "StudyTrainer", no_training)


def test_distill_student_saves_then_loads_and_fusion_weights(profile, data, teachers, collator, dev_cache,
                                                              artifacts, monkeypatch):
    distilled = distill_student(profile, data, teachers, num_train_epochs=1)
    assert distilled.path.parent == artifacts / "models" and distilled.path.name.startswith("kd-")
    assert sorted(p.name for p in distilled.path.iterdir()) == [
        "config.json", "distill_heads.json", "distill_heads.safetensors", "model.safetensors", "training.json"]
    assert isinstance(distilled.model, MultiTaskNLU) and distilled.model.tasks == ("id", "dc", "sf")
    assert not distilled.model.training and not distilled.distiller.training
    info = json.loads((distilled.path / "training.json").read_text())
    assert info["distill_config"] == dataclasses.asdict(DistillConfig())
    assert info["train_seconds"] > 0 and info["history"] == json.loads(json.dumps(distilled.history))
    assert max(h.get("epoch", 0) for h in distilled.history) == pytest.approx(1.0)
    assert any("eval_loss" in h for h in distilled.history)
    saved = load_file(distilled.path / "model.safetensors")
    student_state = distilled.model.state_dict()
    assert set(saved) == set(student_state) and all(torch.equal(saved[k], student_state[k]) for k in saved)
    heads = load_file(distilled.path / "distill_heads.safetensors")
    assert heads and all(k.startswith(("fusion.", "projection.")) for k in heads)
    assert heads["projection.weight"].shape == (dev_cache["teacher_idsf"]["hidden"].shape[1],
                                                distilled.model.encoder.config.hidden_size)

    # Second call: loaded, nothing trained (not even the train-split teacher cache recomputed).
    refuse_trainer(monkeypatch)
    def refuse(*a, **k):
        raise AssertionError("teacher outputs recomputed")
    monkeypatch.setattr(teacher_cache, "teacher_outputs", refuse)
    again = distill_student(profile, data, teachers, num_train_epochs=1)
    assert again.path == distilled.path
    assert again.history == info["history"] and again.train_seconds == info["train_seconds"]
    assert not again.model.training
    mine, theirs = again.distiller.state_dict(), distilled.distiller.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # another distillation config is another student
    with pytest.raises(RuntimeError, match="saved student was not used"):
        distill_student(profile, data, teachers, config=DistillConfig(fusion="mean"), num_train_epochs=1)
    monkeypatch.undo()

    frame = fusion_weights(again.distiller, data, dev_cache, collator, split="dev")
    assert list(frame.columns) == ["task", "teacher", "locale", "weight"]
    assert set(frame["task"]) == {"id", "dc", "sf"}
    for task, group in frame.groupby("task"):
        assert set(group["teacher"]) == set(TASK_TEACHERS[task]), task
        assert set(group["locale"]) == set(data.features["dev"]["locale"]), task
    sums = frame.groupby(["task", "locale"])["weight"].sum()
    assert len(sums) == 3 * len(set(data.features["dev"]["locale"]))
    assert np.allclose(sums.to_numpy(), 1.0, atol=1e-5), sums
    assert frame["weight"].between(0, 1).all()


def test_describe_ablation_reports_what_each_change_did():
    import pandas as pd

    from compactnlu.distill import describe_ablation

    metrics = ["id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"]
    table = pd.DataFrame([
        {"config": "full", **dict.fromkeys(metrics, 0.5)},
        {"config": "ce_only", **dict.fromkeys(metrics, 0.5), "dc_acc": 0.45, "id_f1": 0.52},
        {"config": "mean_fusion", **dict.fromkeys(metrics, 0.502)},
    ])
    text = describe_ablation(table)
    ce_line = next(line for line in text.splitlines() if "ce_only" in line)
    assert "full loss was better on dc_acc by 5.0 points" in ce_line
    assert "variant was better on id_f1 by 2.0 points" in ce_line
    assert "no metric moves" in next(line for line in text.splitlines() if "mean_fusion" in line)
