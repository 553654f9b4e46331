"""Every PTQ method of the study built on the model at the paper's shape, named as the study's
variants are (``variants.VARIANTS``; ``fp32`` is the random float model, which stands for both
trained models, and ``uniform8``/``uniform4`` are two of notebook 07's candidates): each saved with
its method's settings to a scratch folder (its bytes measured, the folder deleted), smoke-run once
(its warm-up) and kept in memory for the timing; a method that fails leaves its error in ``note``."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import bench, variants
from ..interface import infer
from ..model import MultiTaskNLU
from ..onnx_runtime import OnnxNLU, export_onnx
from ..quant import (DynamicConfig, NBitsConfig, OnnxInt8Config, PrecisionConfig, StaticConfig, apply_config,
                     quantize_dynamic, quantize_static, save_quantized)
from ..quant.fast import to_fast
from .inputs import Inputs
from .policy import StudyPolicy, mapped, uniform
from .shape import Settings, build_model

FLOAT = "fp32"  # the random float model every other variant is made from


@dataclass
class Variant:
    name: str
    method: str  # the quantization method's registered name, or fp32
    path: str  # how it runs: torch float, torch.ao, paper path, fast path, ONNX Runtime
    policy: str = ""  # a precision policy's label
    model: object | None = None  # None when the method failed
    size_mb: float = math.nan
    kernels: str = ""
    build_s: float = math.nan
    note: str = ""


# ORT's workers busy-wait between the hundreds of parallel ops of a run at this size, and stop as
# the run returns: ORT's faster setting here (``OnnxNLU.load`` gives the measurements).
ORT_SPINNING = True


def failure_note(error: BaseException) -> str:
    """``failed: <type>: <first line> (at <file>:<line>)`` of the innermost frame."""
    last = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}{where}"


class Builder:
    """Builds the variants one by one into ``variants``; each in a scratch folder under
    ``root`` that is deleted once its size is measured (the model stays in memory)."""

    def __init__(self, root: Path, inputs: Inputs, log=print):
        self.root, self.inputs, self.log = Path(root), inputs, log
        self.variants: dict[str, Variant] = {}

    def scratch(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="variant-", dir=self.root))

    def add(self, variant: Variant, build) -> Variant:
        """Run ``build(scratch) -> (model, size_mb, kernels)`` and one inference (the smoke run,
        also the warm-up); a failure is recorded in ``note`` and leaves ``model`` None."""
        folder = self.scratch()
        start = time.perf_counter()
        try:
            model, size_mb, kernels = build(folder)
            infer(model, self.inputs.batch32)
            variant.model, variant.size_mb, variant.kernels = model, size_mb, kernels
        except Exception as error:  # a method that fails at this scale is a finding, not a crash
            variant.note = "; ".join(filter(None, [variant.note, failure_note(error)]))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            gc.collect()
        variant.build_s = time.perf_counter() - start
        self.variants[variant.name] = variant
        status = "ok" if variant.model is not None else variant.note
        self.log(f"{variant.name:16s} {variant.size_mb:9.2f} MB  built in {variant.build_s:6.1f} s  {status}")
        return variant

    def same_artifact(self, variant: Variant, source: str, make) -> Variant:
        """A run-time path of an artifact already measured (the fast path): its size is that
        artifact's; ``make(model) -> (model, kernels)``."""
        base = self.variants.get(source)
        if base is None or base.model is None:
            variant.note = f"skipped: {source} failed"
            self.variants[variant.name] = variant
            return variant
        variant.note = f"same stored artifact as {source}"

        def build(folder):
            model, kernels = make(base.model)
            return model, base.size_mb, kernels
        return self.add(variant, build)

    def close(self) -> None:
        """Remove the scratch root if nothing else is in it."""
        try:
            self.root.rmdir()
        except OSError:
            pass


# Each ``*_build`` returns the ``build(folder) -> (model, size_mb, kernels)`` that ``Builder.add`` runs.

def measured(model, folder: Path) -> tuple[object, float, str]:
    """``model`` with the size of what was saved in ``folder`` and the kernels it runs on."""
    return model, bench.artifact_size_mb(folder), bench.kernels_used(model)


def fp32_build(model):
    def build(folder):
        model.save(folder)
        return measured(model, folder)
    return build


def static_build(model, calibration):
    def build(folder):
        quantized, used = quantize_static(model, iter(calibration), len(calibration))
        save_quantized(quantized, folder, StaticConfig(used), {"calibration": "random-token batches"})
        return measured(quantized, folder)
    return build


def dynamic_build(model):
    def build(folder):
        quantized = quantize_dynamic(model)
        save_quantized(quantized, folder, DynamicConfig())
        return measured(quantized, folder)
    return build


def precision_build(model, config: PrecisionConfig):
    def build(folder):
        quantized = apply_config(model, config)
        save_quantized(quantized, folder, config)
        return measured(quantized, folder)
    return build


def fast_path(rows: tuple[int, ...], cache):
    """``make(model) -> (model, kernels)`` for ``Builder.same_artifact``: the fast path's layers."""
    def make(model):
        fast = to_fast(model, "auto", rows=rows, cache=cache)
        return fast, "fast: " + bench.kernels_used(fast)
    return make


@contextlib.contextmanager
def quiet_root_logger():
    """The ONNX exporter's passes and ONNX Runtime's quantizer log INFO lines by the hundred at
    XLM-R-base's shape (each deduplicated initializer, each attention MatMul skipped), which
    ``notebook.start``'s INFO level would print: warnings and errors still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def onnx_int8_build(model, threads: int):
    def build(folder):
        with quiet_root_logger():
            exported = export_onnx(model, folder / "fp32")
            quantized = save_quantized(exported, folder / "int8", OnnxInt8Config.for_this_cpu())
        shutil.rmtree(exported)  # 1.1 GB at XLM-R-base's shape; the session reads int8 only
        session = OnnxNLU.load(quantized, threads=threads, spinning=ORT_SPINNING)
        reduce_range = session.quantization.get("reduce_range") if session.quantization else None
        return session, bench.artifact_size_mb(quantized), f"onnxruntime (MLAS), reduce_range={reduce_range}"
    return build


def onnx_nbits_build(builder: Builder, source: str, threads: int):
    def build(folder):
        base = builder.variants[source].model
        if base is None:
            raise RuntimeError(f"{source} failed, nothing to export")
        config = NBitsConfig()
        with quiet_root_logger():
            save_quantized(base, folder / "nbits", config)
        session = OnnxNLU.load(folder / "nbits", threads=threads, spinning=ORT_SPINNING)
        kernels = f"onnxruntime MatMulNBits (accuracy_level {config.accuracy_level})"
        return session, bench.artifact_size_mb(folder / "nbits"), kernels
    return build


def study_variant(name: str, path: str, policy: str = "") -> Variant:
    """The paper-scale stand-in of the study's variant ``name``, its method the table's."""
    return Variant(name, variants.lookup(name).method, path, policy)


def build_variants(profile, settings: Settings, inputs: Inputs, chosen: StudyPolicy, kernel_cache=None,
                   log=print) -> tuple[MultiTaskNLU, dict[str, Variant], dict[str, int]]:
    """Every PTQ method of the study on the model at ``settings.shape``: fp32; static (calibrated
    on random tokens); dynamic; the study's policy mapped by depth (``kd_pcptq``), uniform 8 and
    uniform 4, each on the paper's path and on the fast path; ONNX Runtime's dynamic int8; the
    policy exported to MatMulNBits. Returns the fp32 model, the variants and the mapped policy."""
    torch.set_num_threads(settings.threads)
    fp32 = build_model(settings.shape, profile.pooling, settings.seed)
    study = mapped(chosen.config, settings.shape.num_layers)
    rows = (inputs.n_tokens, settings.batch_size * inputs.n_tokens)  # the fast path's kernels for both timed batches
    b = Builder(profile.artifacts_dir / "paper_scale", inputs, log)
    b.add(Variant(FLOAT, "fp32", "torch float"), fp32_build(fp32))
    # ONNX first: its exports hold extra copies of the fp32 weights, best made while little else is in memory
    b.add(study_variant("kd_onnx_int8", "ONNX Runtime"), onnx_int8_build(fp32, settings.threads))
    b.add(study_variant("baseline_static", "torch.ao"), static_build(fp32, inputs.calibration))
    b.add(study_variant("baseline_dynamic", "torch.ao"), dynamic_build(fp32))
    policies = {"kd_pcptq": (study, f"{study.label} (mapped)"), "uniform8": (uniform(fp32, 8), "uniform-8"),
                "uniform4": (uniform(fp32, 4), "uniform-4")}
    for name, (config, label) in policies.items():
        b.add(Variant(name, "precision", "paper path", label), precision_build(fp32, config))
        if name == "kd_pcptq":
            b.add(study_variant("kd_pcptq_onnx", "ONNX Runtime", label), onnx_nbits_build(b, name, settings.threads))
        b.same_artifact(Variant(f"{name}_fast", "precision", "fast path", label), name, fast_path(rows, kernel_cache))
    b.close()
    order = [FLOAT, "baseline_static", "baseline_dynamic", "kd_pcptq", "kd_pcptq_fast", "kd_pcptq_onnx", "uniform8",
             "uniform8_fast", "uniform4", "uniform4_fast", "kd_onnx_int8"]
    return fp32, {name: b.variants[name] for name in order}, dict(study.policy)
