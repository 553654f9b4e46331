"""The study's trained fp32 models by name, and the step notebooks 05-07 repeat for every PTQ method:
quantize each model, save, register, evaluate, and add the results to the two shared tables."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable

import pandas as pd

from .bench import artifact_size_mb
from .config import Profile
from .distill import DistillConfig, distill_student
from .evaluation import Evaluation, evaluate_variant, load_evaluation
from .features import StudyData
from .quant import quantize_dynamic, quantized_dir, save_quantized
from .replicates import seeded, static_ptq
from .train import TEACHERS, train_model, train_teacher
from .variants import derived, register, upsert_rows

# ptq_results.csv: bytes on disk and the composed test's metrics of every fp32 and quantized variant.
PTQ_COLUMNS = ["variant", "size_mb", "id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"]


def teachers(profile: Profile, data: StudyData) -> dict:
    return {name: train_teacher(profile, data, name) for name in TEACHERS}


def fp32_models(profile: Profile, data: StudyData) -> dict:
    """``{"baseline": ..., "kd": ...}``: objects with ``.model`` and ``.path``, trained if missing.
    Notebooks 02 and 04 register them; they are registered here too, for a model trained here first."""
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


# A quantizer for :func:`ptq_stage`: (variant name, trained fp32 model) -> (quantized model, saved folder).
Quantizer = Callable[[str, object], tuple[object, Path]]


def static_quantizer(profile: Profile, data: StudyData, n_batches: int) -> Quantizer:
    """Static PTQ calibrated on ``n_batches`` training batches, saved under a key of the batches used."""
    def quantize(variant, trained):
        quantized, used = static_ptq(profile, data, trained.model, n_batches)
        details = {"n_batches": used}
        return quantized, save_quantized(quantized, quantized_dir(profile, variant, trained.path, details), "static", details)
    return quantize


def dynamic_quantizer(profile: Profile) -> Quantizer:
    def quantize(variant, trained):
        quantized = quantize_dynamic(trained.model)
        return quantized, save_quantized(quantized, quantized_dir(profile, variant, trained.path), "dynamic")
    return quantize


def ptq_row(variant: str, folder: Path | str, evaluation: Evaluation) -> dict:
    return {"variant": variant, "size_mb": artifact_size_mb(folder), **evaluation.row()}


def ptq_stage(profile: Profile, data: StudyData, models: dict, method: str,
              quantize: Quantizer) -> tuple[pd.DataFrame, dict[str, Evaluation]]:
    """For each trained model (``{"baseline": trained, ...}``), its variant of ``method`` in the
    variant table: ``quantize(variant, trained)``, registered, evaluated; its row and the fp32
    model's go into ``ptq_results.csv``, its MASSIVE single-utterance rows into
    ``massive_single_test.csv``. Returns ``ptq_results.csv`` as it now is and the evaluations."""
    rows, evaluations = [], {}
    for name, trained in models.items():
        rows.append(ptq_row(name, trained.path, load_evaluation(profile, data, name)))
        (variant,) = derived(from_=name, method=method, runtime="torch")
        quantized, folder = quantize(variant, trained)
        register(profile, variant, folder)
        evaluations[variant] = evaluate_variant(quantized, data, profile, variant)
        rows.append(ptq_row(variant, folder, evaluations[variant]))
    table = upsert_rows(profile.tables_dir / "ptq_results.csv", pd.DataFrame(rows)[PTQ_COLUMNS], key=["variant"])
    upsert_rows(profile.tables_dir / "massive_single_test.csv",
                pd.concat([e.single_rows() for e in evaluations.values()]), key=["variant", "locale"])
    return table, evaluations


COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def holds(measured: float, threshold: str) -> bool:
    """Whether ``measured`` meets ``threshold``, written as ``"<= 0.25"``."""
    comparison, value = threshold.split()
    return bool(COMPARISONS[comparison](measured, float(value)))


def bars(measured: list[tuple[str, float, str]]) -> pd.DataFrame:
    """An issue's bars as a table: one row per ``(bar, measured, threshold)``, with ``met``."""
    table = pd.DataFrame(measured, columns=["bar", "measured", "threshold"])
    return table.assign(met=[holds(m, t) for m, t in zip(table.measured, table.threshold)])
