"""The study's variants, made one way: :func:`make` builds any variant from its row of the variant
table (its fp32 model trained or loaded, its method applied with the row's settings), saves,
registers and evaluates it. Also the training seeds' profiles and names, the PTQ stage notebooks
05-07 share, and the issue bars every notebook measures.

Seed ``s`` trains with ``train_seed + s`` (:func:`seeded`), so its models have cache keys of their
own; its variants are named ``baseline@seed1``, ``kd_static@seed2``, ... (:func:`replicate_name`;
seed 0 keeps the plain names, the ones registered).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from . import pcptq, variants
from .artifacts import read_json, write_json
from .bench import artifact_size_mb
from .config import Profile
from .distill import DistillConfig, cached_teacher_outputs, distill_student
from .evaluation import Evaluation, evaluate_variant, load_evaluation, predictions_dir
from .features import StudyData
from .onnx_runtime import export_onnx
from .quant import (MethodConfig, calibration_batches, load_quantized, quantize_dynamic, quantize_static,
                    quantized_dir, save_quantized)
from .quant.fast import to_fast
from .quant.search import SearchConfig
from .train import TEACHERS, collator_for, train_model, train_teacher

# ptq_results.csv: bytes on disk and the composed test's metrics of every fp32 and quantized variant.
PTQ_COLUMNS = ["variant", "size_mb", "id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"]
MADE_WITH = "made_with.json"  # beside a variant's predictions: the settings its model was made with


def seeded(profile: Profile, s: int) -> Profile:
    """The profile of training seed ``s`` (0: the profile itself)."""
    return profile if s == 0 else replace(profile, train_seed=profile.train_seed + s)


def replicate_name(variant: str, s: int) -> str:
    return variant if s == 0 else f"{variant}@seed{s}"


def evaluated(profile: Profile, data: StudyData, variant: str, make_model, single: bool = True,
              made_with: dict | None = None, reuse: bool = True) -> Evaluation:
    """``variant``'s saved evaluation, or ``make_model()`` evaluated (and saved) now; ``single``: on
    MASSIVE's single-utterance test too. ``made_with``: the settings the model is made with beyond
    the profile, saved beside the predictions (``MADE_WITH``); a saved evaluation of a model made
    otherwise is evaluated again, so a new selection never leaves seeds 1-2 on the old policy's
    predictions. ``reuse=False``: evaluated now whatever is saved."""
    folder, made_with = predictions_dir(profile, variant), made_with or {}
    saved = read_json(folder / MADE_WITH) if (folder / MADE_WITH).exists() else {}
    if reuse and (folder / "summary.json").exists() and saved == made_with:
        return load_evaluation(profile, data, variant)
    evaluation = evaluate_variant(make_model(), data, profile, variant, single=single)
    write_json(folder / MADE_WITH, made_with)
    return evaluation


# What build() needs again and again within one process (the teachers, their outputs on the
# training split), kept once per profile, artifacts folder and dataset instead of read back each time.
_LOADED: dict = {}


def _once(profile: Profile, data: StudyData, what: str, load):
    key = (what, profile, str(profile.artifacts_dir), id(data))
    if key not in _LOADED:
        _LOADED[key] = load()
    return _LOADED[key]


def teachers(profile: Profile, data: StudyData) -> dict:
    return _once(profile, data, "teachers", lambda: {name: train_teacher(profile, data, name) for name in TEACHERS})


def search_cache(profile: Profile, data: StudyData) -> dict:
    """The teachers' outputs on the training split: the precision search's objective."""
    return _once(profile, data, "search_cache", lambda: cached_teacher_outputs(
        profile, teachers(profile, data), data, "train", collator_for(data)))


def trained(profile: Profile, data: StudyData, model: str, seed: int = 0, retrain: bool = False):
    """Training seed ``seed``'s fp32 model ``model`` (``.model``, ``.path``), trained if missing
    (``retrain``: trained again). The teachers are trained once, on the profile's own seed, and
    teach every seed's student."""
    if model in TEACHERS:
        return train_teacher(profile, data, model, retrain=retrain)
    if model == "baseline":
        return train_model(seeded(profile, seed), data, "baseline", retrain=retrain)
    if model == "kd":
        return distill_student(seeded(profile, seed), data, teachers(profile, data), DistillConfig(), name="kd",
                               retrain=retrain)
    raise ValueError(f"{model!r} is not a trained model of the study (the classic reference is notebook 02's)")


def fp32(profile: Profile, data: StudyData, model: str, retrain: bool = False):
    """Seed 0's trained model ``model`` (the baseline, a teacher, the student), trained if missing and
    registered, so later notebooks and ``predict`` load it by name: notebooks 02-04 make theirs here."""
    made = trained(profile, data, model, retrain=retrain)
    variants.register(profile, model, made.path)
    return made


def fp32_models(profile: Profile, data: StudyData) -> dict:
    """``{"baseline": ..., "kd": ...}``: seed 0's fp32 models, trained if missing, registered."""
    return {name: fp32(profile, data, name) for name in ("baseline", "kd")}


@dataclass
class Built:
    model: object  # what runs
    path: Path  # the folder it is saved in


def static_ptq(profile: Profile, data: StudyData, model, n_batches: int):
    """``model`` statically quantized on the first ``n_batches`` of the profile's seeded training
    batches: ``(quantized, batches used)``."""
    batches = calibration_batches(data, collator_for(data), profile.batch_size, profile.seed)
    return quantize_static(model, batches, n_batches)


def _saved(profile: Profile, name: str, source, quantized, config: MethodConfig, artifact: str = "ptq") -> Built:
    """``quantized`` saved with ``config`` under a key of its settings and of its source's folder."""
    folder = quantized_dir(profile, name, source.path, asdict(config), artifact)
    return Built(quantized, save_quantized(quantized, folder, config))


def _static(profile, data, name, source, config) -> Built:
    quantized, used = static_ptq(profile, data, source.model, config.n_batches)
    # recorded as calibrated: on fewer batches where the training split has fewer
    return _saved(profile, name, source, quantized, replace(config, n_batches=used))


def _dynamic(profile, data, name, source, config) -> Built:
    return _saved(profile, name, source, quantize_dynamic(source.model), config)


def _precision(profile, data, name, source, config) -> Built:
    """The chosen policy made for ``source``: searched, or its bits applied (``pcptq.candidate``)."""
    # only a search and the sensitivity-only policy read the teachers' outputs
    cache = search_cache(profile, data) if config.kind in ("searched", "sensitivity") else None
    made = pcptq.candidate(profile, data, cache, variants.lookup(name).model, source, config,
                           SearchConfig.for_profile(profile))
    return Built(made.quantized, made.folder)


def _onnx_int8(profile, data, name, source, config) -> Built:
    """ONNX Runtime's int8 of ``source`` exported to ONNX (both kept: the export is the slow part)."""
    root = quantized_dir(profile, name, source.path, asdict(config), artifact="onnx")
    if not (root / "int8").exists():
        save_quantized(export_onnx(source.model, root / "fp32"), root / "int8", config)
    return Built(load_quantized(root / "int8"), root / "int8")


def _saved_as_it_is(profile, data, name, source, config) -> Built:
    """A method that saves its source as it is (a precision model as MatMulNBits), loaded back."""
    artifact = "onnx" if variants.lookup(name).runtime == "onnx" else "ptq"
    folder = quantized_dir(profile, name, source.path, asdict(config), artifact)
    if not folder.exists():  # keyed by its source's folder and settings: made once
        save_quantized(source.model, folder, config)
    return Built(load_quantized(folder), folder)


# How each method makes a variant from what it is derived from; any other saves its source as it is.
MAKERS = {"static": _static, "dynamic": _dynamic, "precision": _precision, "onnxruntime_dynamic": _onnx_int8}


def build(profile: Profile, data: StudyData, name: str, seed: int = 0) -> Built:
    """Variant ``name`` of training seed ``seed``'s model, built and saved as its row says (a trained
    model: trained or loaded); a row of the same method as the variant it is derived from is a
    run-time path of that artifact."""
    row = variants.lookup(name)
    if row.derived_from is None:
        return trained(profile, data, name, seed)
    source = build(profile, data, row.derived_from, seed)
    if variants.lookup(row.derived_from).method == row.method:
        if row.runtime != "fast":
            raise ValueError(f"{name}: a run-time path must run on fast kernels, not {row.runtime!r}")
        return Built(to_fast(source.model), source.path)
    make_from = MAKERS.get(row.method, _saved_as_it_is)
    return make_from(profile, data, name, source, variants.config_of(profile, name))


def make(profile: Profile, data: StudyData, name: str, seed: int = 0, reuse: bool = False) -> Evaluation:
    """Variant ``name`` of training seed ``seed``'s model: built and saved (:func:`build`), registered
    (seed 0: the study's variants are seed 0's), evaluated as ``replicate_name(name, seed)`` on the
    composed test, and on MASSIVE's single-utterance test for seed 0 and for the fp32 models.
    ``reuse``: a saved evaluation of a model made with the same settings is read back instead."""
    row = variants.lookup(name)
    config = variants.config_of(profile, name)
    made_with = {} if config is None else {"method": row.method, "runtime": row.runtime, **asdict(config)}

    def made():
        built = build(profile, data, name, seed)
        if seed == 0:
            variants.register(profile, name, built.path)
        return built.model
    return evaluated(profile, data, replicate_name(name, seed), made, single=seed == 0 or row.method == "fp32",
                     made_with=made_with, reuse=reuse)


def ptq_row(variant: str, folder: Path | str, evaluation: Evaluation) -> dict:
    return {"variant": variant, "size_mb": artifact_size_mb(folder), **evaluation.row()}


def ptq_stage(profile: Profile, data: StudyData, method: str, models: tuple[str, ...] = ("baseline", "kd")
              ) -> tuple[pd.DataFrame, dict[str, Evaluation]]:
    """For each fp32 model of ``models``, its variant of ``method`` run by torch in the variant table,
    made (:func:`make`); its row and the fp32 model's go into ``ptq_results.csv``, its MASSIVE
    single-utterance rows into ``massive_single_test.csv``. Returns ``ptq_results.csv`` as it now
    is and the evaluations."""
    rows, evaluations = [], {}
    for model in models:
        rows.append(ptq_row(model, variants.folder_of(profile, model), load_evaluation(profile, data, model)))
        (variant,) = variants.derived(from_=model, method=method, runtime="torch")
        evaluations[variant] = make(profile, data, variant)
        rows.append(ptq_row(variant, variants.folder_of(profile, variant), evaluations[variant]))
    table = variants.upsert_rows(profile.tables_dir / "ptq_results.csv", pd.DataFrame(rows)[PTQ_COLUMNS],
                                 key=["variant"])
    variants.upsert_rows(profile.tables_dir / "massive_single_test.csv",
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
