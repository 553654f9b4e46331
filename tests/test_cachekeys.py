"""``compactnlu.cachekeys``: changing a profile field changes the keys of exactly the artifacts it
shapes and of what is derived from them.

The expected sets below are written out by hand from what each field does in the code (which
artifact reads it), not computed from the declarations in ``config.py``.
"""

from __future__ import annotations

import dataclasses

import pytest

from compactnlu.cachekeys import ARTIFACTS, artifact_dir, artifact_key
from compactnlu.config import Profile, load_profile
from compactnlu.quant import quantized_dir

EVERYTHING = {"data", "tokenizer", "features", "classic", "encoder", "baseline", "teacher", "teacher_outputs",
              "student", "ptq", "pcptq", "onnx", "variants", "predictions", "bench"}
AFTER_DATA = EVERYTHING - {"data"}  # the tokenizer is trained on the composed training text
AFTER_TOKENIZER = AFTER_DATA - {"tokenizer"}  # everything reads the tokenized features
# the registry of variants, their predictions and the benchmark change with any variant
OF_ANY_VARIANT = {"variants", "predictions", "bench"}
# What starts from the encoder. The teachers' cached outputs are keyed by the teachers' weights
# instead, and a quantized model or export by its fp32 model's folder name (test below).
ENCODER_ON = {"encoder", "baseline", "teacher", "student"} | OF_ANY_VARIANT
TASK_MODELS_ON = {"baseline", "teacher", "student"} | OF_ANY_VARIANT  # the student learns from the teachers
NOTHING: set[str] = set()

# field -> (another valid value, the artifacts whose key must change) on the default profile (no MLM phase)
EXPECTED = {
    "name": ("renamed", NOTHING),
    "locales": (("hi-IN",), EVERYTHING),
    "massive_dir": ("/somewhere/else", EVERYTHING),
    "verify_checksums": (False, NOTHING),
    "synthetic_data": (True, EVERYTHING),
    "max_utterances_per_partition": (10, EVERYTHING),
    "compose_k_probs": ((0.5, 0.5), EVERYTHING),
    "composed_per_utterance": (2.0, EVERYTHING),
    "seed": (14, EVERYTHING),
    "tokenizer_name": ("xlm-roberta-base", AFTER_DATA),
    "vocab_size": (8000, AFTER_DATA),
    "max_length": (64, AFTER_TOKENIZER),
    "model_name": ("xlm-roberta-base", ENCODER_ON),
    "hidden_size": (256, ENCODER_ON),
    "num_layers": (3, ENCODER_ON),
    "teacher_layers": (3, {"teacher", "student"} | OF_ANY_VARIANT),  # None (num_layers) -> 3
    "num_heads": (8, ENCODER_ON),
    "intermediate_size": (256, ENCODER_ON),
    "dropout": (0.1, ENCODER_ON),
    "pooling": ("mean", TASK_MODELS_ON),
    "loss_weights": ((1.0, 1.0, 1.0), TASK_MODELS_ON),
    "mlm_epochs": (1.0, ENCODER_ON),  # 0 -> 1 turns the MLM phase on
    "mlm_learning_rate": (2e-3, NOTHING),  # no MLM phase on this profile
    "mlm_batch_size": (32, NOTHING),
    "epochs": (3.0, {"baseline"} | OF_ANY_VARIANT),  # teachers and student have budgets of their own
    "teacher_epochs": (3.0, {"teacher", "student"} | OF_ANY_VARIANT),
    "learning_rate": (1e-3, TASK_MODELS_ON),  # the student's own is kd_learning_rate; its teachers use this
    "batch_size": (16, TASK_MODELS_ON | {"ptq", "pcptq"}),  # static PTQ calibrates on batches of this size
    "warmup_ratio": (0.0, TASK_MODELS_ON),
    "weight_decay": (0.0, TASK_MODELS_ON),
    "train_seed": (7, ENCODER_ON),
    "train_seeds": (5, NOTHING),  # how many replicates; each replicate sets train_seed
    "kd_epochs": (3.0, {"student"} | OF_ANY_VARIANT),
    "kd_learning_rate": (1e-3, {"student"} | OF_ANY_VARIANT),
    "pcptq_lambdas": ((0.0,), NOTHING),  # which searches run; each λ is in its own key
    "pcptq_steps": (10, {"pcptq"} | OF_ANY_VARIANT),
    "bench_repeats": (9, {"bench"}),
}


def keys(profile: Profile) -> dict[str, str]:
    return {artifact: artifact_key(profile, artifact) for artifact in ARTIFACTS}


def changed(before: Profile, after: Profile) -> set[str]:
    old, new = keys(before), keys(after)
    return {artifact for artifact in ARTIFACTS if old[artifact] != new[artifact]}


def test_the_table_covers_every_field_and_every_artifact():
    assert set(EXPECTED) == {f.name for f in dataclasses.fields(Profile)}
    assert set(ARTIFACTS) == EVERYTHING


@pytest.mark.parametrize("field", sorted(EXPECTED))
def test_a_field_changes_exactly_the_keys_of_what_it_shapes(field):
    value, expected = EXPECTED[field]
    base = load_profile("default")
    other = dataclasses.replace(base, **{field: value})
    assert getattr(other, field) != getattr(base, field)
    assert changed(base, other) == expected


@pytest.mark.parametrize("field, value", [("mlm_epochs", 3.0), ("mlm_epochs", 0.0), ("mlm_learning_rate", 2e-3),
                                          ("mlm_batch_size", 32)])
def test_mlm_fields_shape_the_encoder_when_there_is_an_mlm_phase(field, value):
    smoke = load_profile("smoke")
    assert smoke.mlm_epochs > 0 and smoke.model_name is None
    assert changed(smoke, dataclasses.replace(smoke, **{field: value})) == ENCODER_ON
    # a pretrained model_name has no MLM phase, whatever mlm_epochs says
    pretrained = dataclasses.replace(smoke, model_name="xlm-roberta-base")
    assert changed(pretrained, dataclasses.replace(pretrained, **{field: value})) == NOTHING


def test_a_quantized_model_follows_its_own_fp32_model_only(monkeypatch, tmp_path):
    """The student's settings move the student's PTQ folders, never the baseline's, and back."""
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    base = load_profile("default")
    other = dataclasses.replace(base, kd_epochs=3.0)
    baseline = artifact_dir(base, "baseline", "baseline")
    assert artifact_dir(other, "baseline", "baseline") == baseline
    assert quantized_dir(base, "baseline_static", baseline, {"n_batches": 8}) == \
        quantized_dir(other, "baseline_static", baseline, {"n_batches": 8})
    student, moved = artifact_dir(base, "student", "kd"), artifact_dir(other, "student", "kd")
    assert student != moved
    assert quantized_dir(base, "kd_static", student) != quantized_dir(other, "kd_static", moved)


def test_the_same_folder_however_it_is_spelled(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    relative = load_profile("default", {"massive_dir": "data/massive"})
    absolute = load_profile("default", {"massive_dir": str(tmp_path / "data" / "massive")})
    assert keys(relative) == keys(absolute)


def test_keys_are_short_stable_and_differ_between_artifacts_and_details():
    profile = load_profile("default")
    key = artifact_key(profile, "baseline")
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert key == artifact_key(load_profile("default"), "baseline") == artifact_key(profile, "baseline", {})
    assert len(set(keys(profile).values())) == len(ARTIFACTS)
    assert artifact_key(profile, "ptq", {"source": "kd-1"}) != artifact_key(profile, "ptq", {"source": "kd-2"})
    assert artifact_key(profile, "ptq", {"a": 1, "b": 2}) == artifact_key(profile, "ptq", {"b": 2, "a": 1})
    with pytest.raises(KeyError, match="unknown artifact"):
        artifact_key(profile, "nonsense")


def test_artifact_dir_is_the_artifacts_folder_then_name_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    profile = load_profile("default")
    details = {"method": "static"}
    assert artifact_dir(profile, "ptq", "kd_static", details) == \
        tmp_path / "quantized" / f"kd_static-{artifact_key(profile, 'ptq', details)}"
    assert artifact_dir(profile, "baseline", "baseline").parent == tmp_path / "models"
    assert artifact_dir(profile, "encoder", "mlm").parent == tmp_path / "encoders"
    assert artifact_dir(profile, "features", "") == tmp_path / "features" / artifact_key(profile, "features")
    with pytest.raises(KeyError, match="not an artifact cached in a folder"):
        artifact_dir(profile, "bench", "x")
