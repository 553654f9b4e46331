"""The study's trained fp32 models, loaded by name from the cache that notebooks 02-04 fill."""

from __future__ import annotations

from .config import Profile
from .distill import DistillConfig, distill_student
from .features import StudyData
from .replicates import seeded
from .train import TEACHERS, train_model, train_teacher
from .variants import register


def teachers(profile: Profile, data: StudyData) -> dict:
    return {name: train_teacher(profile, data, name) for name in TEACHERS}


def fp32_models(profile: Profile, data: StudyData) -> dict:
    """``{"baseline": ..., "kd": ...}``: objects with ``.model`` and ``.path`` (trained if missing),
    registered as variants under those names."""
    models = {"baseline": train_model(profile, data, "baseline"),
              "kd": distill_student(profile, data, teachers(profile, data), DistillConfig(), name="kd")}
    for name, trained in models.items():
        register(profile, name, trained.path)
    return models


def fp32_replicate(profile: Profile, data: StudyData, s: int) -> dict:
    """Training seed ``s``'s baseline and student (seed 0: :func:`fp32_models`). The teachers are
    trained once, on the profile's own seed, and teach every seed's student."""
    if s == 0:
        return fp32_models(profile, data)
    at = seeded(profile, s)
    return {"baseline": train_model(at, data, "baseline"),
            "kd": distill_student(at, data, teachers(profile, data), DistillConfig(), name="kd")}
