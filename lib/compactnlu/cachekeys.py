"""What invalidates what: the study's cached artifacts, what each is derived from, and their keys.

Each ``Profile`` field declares the artifacts it shapes (``config.shaping``); an artifact's key
hashes the values of the fields that shape it, the keys of the artifacts it is derived from, and
the ``details`` its maker adds (which task model, trainer overrides, a PTQ method's settings).
So changing a field changes the key of every artifact it shapes and of everything derived from
them, and of nothing else (``tests/test_cachekeys.py`` checks this field by field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import provenance
from .config import Profile, short_hash


@dataclass(frozen=True)
class Artifact:
    folder: str | None  # under ``profile.artifacts_dir``; None: nothing is cached under this key
    derived_from: tuple[str, ...] = ()


ARTIFACTS: dict[str, Artifact] = {
    # the composed corpus (kept inside the features, not on its own)
    "data": Artifact(None),
    "tokenizer": Artifact("tokenizer", ("data",)),
    "features": Artifact("features", ("tokenizer",)),
    # TF-IDF + logistic regression + CRF (its settings are checked against its manifest)
    "classic": Artifact("models", ("features",)),
    # what every task model starts from: a random initialisation, model_name, or the MLM phase
    # (only the last is cached, under encoders/)
    "encoder": Artifact("encoders", ("features",)),
    "baseline": Artifact("models", ("encoder",)),
    "teacher": Artifact("models", ("encoder",)),
    # a teacher's outputs on a split: the teachers enter through their weights' hashes (details), so
    # every training seed's student shares the one teachers' cache
    "teacher_outputs": Artifact("teacher_cache", ("features",)),
    "student": Artifact("models", ("encoder", "teacher")),
    # A quantized model (static, dynamic, a fixed policy): its fp32 model enters through that
    # model's folder name (``source`` in the details), so a baseline's variants do not change
    # with the student's settings, nor the student's with the baseline's.
    "ptq": Artifact("quantized", ("features",)),
    # Algorithm 1's searches (also keyed by their fp32 model's folder name and their λ)
    "pcptq": Artifact("quantized", ("ptq",)),
    # ONNX exports of an fp32 model (same ``source`` rule)
    "onnx": Artifact("onnx", ("features",)),
    # the registry of every variant by name, and each variant's saved predictions
    "variants": Artifact("variants", ("classic", "baseline", "student", "ptq", "pcptq", "onnx")),
    "predictions": Artifact("predictions", ("variants",)),
    "bench": Artifact(None, ("variants",)),
}


def _shapes(field: dataclasses.Field) -> tuple[str, ...]:
    return field.metadata["shapes"]


def _check_declarations() -> None:
    """Every field declares what it shapes, in names this module knows, and the artifacts form a DAG."""
    for field in dataclasses.fields(Profile):
        if "shapes" not in field.metadata:
            raise TypeError(f"Profile.{field.name} does not declare the artifacts it shapes (config.shaping)")
        unknown = set(_shapes(field)) - set(ARTIFACTS)
        if unknown:
            raise TypeError(f"Profile.{field.name} shapes unknown artifacts {sorted(unknown)}")
    order = list(ARTIFACTS)
    for name, artifact in ARTIFACTS.items():
        if not all(order.index(parent) < order.index(name) for parent in artifact.derived_from):
            raise TypeError(f"artifact {name!r} is derived from one declared after it")


_check_declarations()


def shaping_fields(profile: Profile, artifact: str) -> tuple[str, ...]:
    """The fields that shape ``artifact`` directly in ``profile`` (not through what it is derived from)."""
    return tuple(f.name for f in dataclasses.fields(Profile)
                 if artifact in _shapes(f) and (f.metadata["when"] is None or f.metadata["when"](profile)))


def _value(profile: Profile, name: str):
    value = getattr(profile, name)
    if name == "massive_dir" and value:  # the same folder however it is spelled
        return str(Path(value).resolve())
    return value


def artifact_key(profile: Profile, artifact: str, details: dict | None = None) -> str:
    """12 hex characters naming ``artifact`` as ``profile`` (and ``details``) make it with this
    version of the library's code."""
    if artifact not in ARTIFACTS:
        raise KeyError(f"unknown artifact {artifact!r}; known: {', '.join(ARTIFACTS)}")
    return short_hash({
        "artifact": artifact,
        "code": provenance.code_digest(),  # models trained by older library code are never reused
        "fields": {name: _value(profile, name) for name in shaping_fields(profile, artifact)},
        "derived_from": {parent: artifact_key(profile, parent) for parent in ARTIFACTS[artifact].derived_from},
        "details": details or {},
    })


def artifact_dir(profile: Profile, artifact: str, name: str, details: dict | None = None) -> Path:
    """``artifacts/<folder of artifact>/<name>-<key>`` (just ``<key>`` when ``name`` is empty)."""
    folder = ARTIFACTS[artifact].folder if artifact in ARTIFACTS else None
    if folder is None:
        raise KeyError(f"{artifact!r} is not an artifact cached in a folder")
    key = artifact_key(profile, artifact, details)
    return profile.artifacts_dir / folder / (f"{name}-{key}" if name else key)
