"""Profiles of the study (smoke, default, paper) and the paths everything is written to.

A profile is one frozen dataclass. Notebooks take a profile name plus a dict of
overrides from their papermill ``parameters`` cell and call :func:`load_profile`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCALES = ("hi-IN", "bn-BD", "ta-IN", "te-IN", "kn-IN", "ml-IN")
GLOSS_LOCALE = "en-US"


def _default_massive_dir() -> str:
    # A relative MASSIVE_DIR is taken from the project root, where `make` runs, not from
    # notebooks/, where papermill runs the notebooks.
    return str(ROOT / os.environ.get("MASSIVE_DIR", "data/massive"))


@dataclass(frozen=True)
class Profile:
    name: str
    # data
    locales: tuple[str, ...] = LOCALES
    massive_dir: str = field(default_factory=_default_massive_dir)  # "" with synthetic_data: under artifacts
    verify_checksums: bool = True
    synthetic_data: bool = False  # use compactnlu.synthetic's stand-in corpus instead of MASSIVE
    max_utterances_per_partition: int | None = None  # per locale; None keeps every record
    compose_k_probs: tuple[float, ...] = (0.3, 0.4, 0.3)  # P(k parts), k = 1, 2, 3
    composed_per_utterance: float = 1.0  # composed examples per source utterance
    seed: int = 13
    # tokenizer: trained from the training text when tokenizer_name is None
    tokenizer_name: str | None = None
    vocab_size: int = 12000
    max_length: int = 128
    # encoder: from scratch (XLM-R architecture) when model_name is None
    model_name: str | None = None
    # Sized by measurement on a 2-core CPU (README, "Sizing the default encoder").
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    dropout: float = 0.1
    # utterance representation for ID and DC: "max" or "mean" over tokens, or "cls" (XLM-R's pooler)
    pooling: str = "max"
    # ID, DC, SF. The ID and DC losses are BCE means over 60 and 18 labels, SF's a CRF NLL per
    # word, so equal weights starve ID (README, "Sizing the default encoder", for the measurements).
    loss_weights: tuple[float, float, float] = (10.0, 3.0, 2.0)
    # masked-LM pre-training of a from-scratch encoder on the training text (0 epochs: none)
    mlm_epochs: float = 0.0
    mlm_learning_rate: float = 1e-3
    mlm_batch_size: int = 64
    # training
    epochs: float = 4.0
    teacher_epochs: float = 2.0
    learning_rate: float = 1.5e-3
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    train_seed: int = 42
    # distillation of the student (notebook 04)
    kd_epochs: float = 2.0
    kd_learning_rate: float = 2e-3
    # precision-controlled PTQ (notebook 07): the λ sweep and the length of each search
    pcptq_lambdas: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0)
    pcptq_steps: int = 150
    # benchmark (notebook 08) and significance (notebook 10)
    bench_repeats: int = 5  # timed passes over the test set per variant
    seeds: int = 3  # seeds of the PTQ stage (calibration order, search noise) for Welch's test

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
        """Hash of every field that can change a result (not where the data is read from)."""
        return self.key(*_RESULT_FIELDS)

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

    def key(self, *names: str) -> str:
        """A short hash of the named fields, used to key cached artifacts."""
        values = {n: getattr(self, n) for n in sorted(names)}
        if values.get("massive_dir"):  # the same folder however it is spelled
            values["massive_dir"] = str(Path(values["massive_dir"]).resolve())
        blob = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DATA_FIELDS = (
    "locales", "massive_dir", "max_utterances_per_partition", "compose_k_probs",
    "composed_per_utterance", "seed",
)
TOKENIZER_FIELDS = DATA_FIELDS + ("tokenizer_name", "vocab_size")
FEATURE_FIELDS = TOKENIZER_FIELDS + ("max_length",)

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
        pcptq_lambdas=(0.0, 4.0),
        pcptq_steps=30,
        bench_repeats=2,
        seeds=2,
        batch_size=16,
        learning_rate=3e-3,
    ),
    # All of MASSIVE for the six locales, an encoder trained from scratch on a 2-core CPU.
    "default": Profile(name="default"),
    # The paper's set-up: xlm-roberta-base and its hyperparameters, for a GPU machine. It keeps
    # the default loss_weights: our losses have the same per-label and per-word scales there.
    "paper": Profile(
        name="paper",
        tokenizer_name="xlm-roberta-base",
        model_name="xlm-roberta-base",
        max_length=128,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        pooling="cls",
        epochs=5.0,
        teacher_epochs=5.0,
        learning_rate=2e-5,
        kd_epochs=2.0,
        kd_learning_rate=3e-5,
        batch_size=32,
        warmup_ratio=0.1,
    ),
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
    for key in ("locales", "compose_k_probs", "loss_weights", "pcptq_lambdas"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(profile, **overrides)
