"""The study's trained fp32 models, loaded by name from the cache that notebooks 02-04 fill."""

from __future__ import annotations

from .config import Profile
from .distill import DistillConfig, distill_student
from .features import StudyData
from .train import TEACHERS, train_model, train_teacher


def teachers(profile: Profile, data: StudyData) -> dict:
    return {name: train_teacher(profile, data, name) for name in TEACHERS}


def fp32_models(profile: Profile, data: StudyData) -> dict:
    """``{"baseline": ..., "kd": ...}``: objects with ``.model`` and ``.path`` (trained if missing)."""
    return {"baseline": train_model(profile, data, "baseline"),
            "kd": distill_student(profile, data, teachers(profile, data), DistillConfig(), name="kd")}
