"""Profiles, overrides, output folders and cache keys."""

from __future__ import annotations

import pytest

from compactnlu.config import (
    DATA_FIELDS, FEATURE_FIELDS, PROFILES, ROOT, TOKENIZER_FIELDS, Profile, load_profile,
)


@pytest.mark.parametrize("name", ["smoke", "default", "paper"])
def test_load_profile_returns_each_profile(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile == PROFILES[name]


def test_there_are_exactly_three_profiles():
    assert set(PROFILES) == {"smoke", "default", "paper"}
    assert load_profile() == PROFILES["default"]


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


# ---------------------------------------------------------------- cache keys

@pytest.mark.parametrize("field, value", [
    ("seed", 14), ("locales", ("hi-IN",)), ("composed_per_utterance", 2.0),
    ("compose_k_probs", (0.5, 0.5)), ("max_utterances_per_partition", 10), ("massive_dir", "/somewhere/else"),
])
def test_key_changes_when_a_named_field_changes(field, value):
    base = load_profile("default")
    changed = load_profile("default", {field: value})
    assert field in DATA_FIELDS
    assert changed.key(*DATA_FIELDS) != base.key(*DATA_FIELDS)


@pytest.mark.parametrize("field, value", [
    ("epochs", 9.0), ("learning_rate", 0.1), ("hidden_size", 8), ("max_length", 64), ("vocab_size", 10),
])
def test_key_ignores_fields_it_does_not_name(field, value):
    base = load_profile("default")
    changed = load_profile("default", {field: value})
    assert changed.key(*DATA_FIELDS) == base.key(*DATA_FIELDS)


def test_field_groups_nest_so_each_cache_invalidates_the_next():
    base = load_profile("smoke")
    longer = load_profile("smoke", {"max_length": 256})
    assert longer.key(*TOKENIZER_FIELDS) == base.key(*TOKENIZER_FIELDS)
    assert longer.key(*FEATURE_FIELDS) != base.key(*FEATURE_FIELDS)
    bigger_vocab = load_profile("smoke", {"vocab_size": 3000})
    assert bigger_vocab.key(*DATA_FIELDS) == base.key(*DATA_FIELDS)
    assert bigger_vocab.key(*TOKENIZER_FIELDS) != base.key(*TOKENIZER_FIELDS)
    assert bigger_vocab.key(*FEATURE_FIELDS) != base.key(*FEATURE_FIELDS)


def test_key_is_short_stable_and_order_independent():
    profile = load_profile("default")
    key = profile.key("seed", "vocab_size")
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert key == profile.key("vocab_size", "seed") == load_profile("default").key("seed", "vocab_size")
    assert profile.key("seed") != profile.key("vocab_size")


def test_key_sees_the_same_massive_dir_through_a_relative_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    relative = load_profile("default", {"massive_dir": "data/massive"})
    absolute = load_profile("default", {"massive_dir": str(tmp_path / "data" / "massive")})
    assert relative.key("massive_dir") == absolute.key("massive_dir")


def test_to_dict_holds_every_field():
    d = load_profile("paper").to_dict()
    assert d["name"] == "paper" and d["model_name"] == "xlm-roberta-base"
    assert set(d) == {f for f in Profile.__dataclass_fields__}
