"""Timing the built variants, the table beside the paper's Table 2 ratios, the issue's bars
and the machine they were measured on."""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from .. import bench, paper, variants
from ..cpu import cpu_model, has_vnni, isa_flags
from ..study import bars as bars_table
from .build import FLOAT, ORT_SPINNING, Variant, build_variants
from .inputs import Inputs, make_inputs, median_tokens
from .policy import StudyPolicy, study_policy
from .shape import Settings, parameter_count, settings_for

# The bars for kd_pcptq on its fastest path (it and the run-time paths of its artifact).
TIME_BAR_VS_FP32, TIME_BAR_VS_ORT, SIZE_BAR_VS_FP32 = 0.5, 1.0, 0.40
KD_PCPTQ_PATHS = tuple(variants.derived("kd_pcptq", include_self=True))
ORT_REFERENCE = "kd_onnx_int8"
PAPER_VARIANTS = set(paper.TABLE2.variant)


def paper_counterpart(name: str) -> str | None:
    """The paper's Table 2 variant that ``name`` stands beside: itself, or the quantized variant
    whose artifact it runs; the float model stands for the paper's baseline."""
    if name == FLOAT:
        return "baseline"
    lineage = variants.lineage(name) if name in variants.BY_NAME else []
    return next((v for v in lineage if v in PAPER_VARIANTS and variants.lookup(v).method != "fp32"), None)


def time_variants(built: dict[str, Variant], inputs: Inputs, settings: Settings) -> pd.DataFrame:
    """Per variant: median (min, max) seconds of the batch of 32 over ``settings.repeats``
    interleaved passes, and the median milliseconds at batch 1 over the single examples,
    variants interleaved example by example. Each was warmed up by its smoke run, so no
    further warm-up (at XLM-R-base's shape one call of the paper's path takes seconds)."""
    torch.set_num_threads(settings.threads)
    models = {name: v.model for name, v in built.items() if v.model is not None}
    passes = bench.time_passes(models, [inputs.batch32], repeats=settings.repeats, warmup=0)
    singles = bench.latency(models, inputs.singles, warmup=0)
    t = passes.groupby("variant")["seconds"]
    out = pd.DataFrame({"time_b32_s": t.median(), "time_b32_min_s": t.min(), "time_b32_max_s": t.max(),
                        "time_b1_ms": singles.groupby("variant")["ms"].median()})
    return out.reindex(list(models)).reset_index(names="variant")


def paper_ratios() -> pd.DataFrame:
    """The paper's Table 2 size and time of each variant over its baseline."""
    rel = paper.relative_to_baseline(paper.TABLE2)
    return rel[["variant", "size_vs_baseline", "time_vs_baseline"]].rename(
        columns={"variant": "paper_variant", "size_vs_baseline": "paper_size_vs_baseline",
                 "time_vs_baseline": "paper_time_vs_baseline"})


def results_table(built: dict[str, Variant], timing: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: size and times, each also over this table's own fp32 row, with the
    paper's ratios beside the variants that have a counterpart, and ``note`` for failures."""
    rows = [{"variant": v.name, "method": v.method, "path": v.path, "policy": v.policy, "kernels": v.kernels,
             "size_mb": v.size_mb, "build_s": v.build_s, "note": v.note} for v in built.values()]
    table = pd.DataFrame(rows).merge(timing, on="variant", how="left")
    fp32 = table.set_index("variant").loc[FLOAT]
    table["size_vs_fp32"] = table.size_mb / fp32.size_mb
    table["time_b32_vs_fp32"] = table.time_b32_s / fp32.time_b32_s
    table["time_b1_vs_fp32"] = table.time_b1_ms / fp32.time_b1_ms
    table["paper_variant"] = table.variant.map(paper_counterpart)
    table = table.merge(paper_ratios(), on="paper_variant", how="left")
    columns = ["variant", "method", "path", "policy", "kernels", "size_mb", "size_vs_fp32", "paper_size_vs_baseline",
               "time_b32_s", "time_b32_vs_fp32", "paper_time_vs_baseline", "time_b1_ms", "time_b1_vs_fp32",
               "time_b32_min_s", "time_b32_max_s", "paper_variant", "build_s", "note"]
    return table[columns]


def bars(table: pd.DataFrame, cpu: str | None = None) -> pd.DataFrame:
    """The issue's bars, measured in this one run (``study.bars``): ``kd_pcptq`` on its fastest path
    (the one of ``KD_PCPTQ_PATHS`` with the smallest time at that batch, named in ``path``) <= 0.5x
    fp32 time and <= 1.0x ONNX Runtime int8, at batch 32 and at batch 1; its size <= 0.40x fp32.
    ``met`` is False where a number is missing (a failed variant)."""
    t = table.set_index("variant")
    measured, paths = [], []
    for column, label in (("time_b32_s", "batch 32"), ("time_b1_ms", "batch 1")):
        times = t.loc[[p for p in KD_PCPTQ_PATHS if p in t.index], column].dropna()
        best = times.idxmin() if len(times) else None
        best_time = times.min() if len(times) else math.nan
        for what, reference, bar in (("fp32", FLOAT, TIME_BAR_VS_FP32), ("ONNX Runtime int8", ORT_REFERENCE,
                                                                           TIME_BAR_VS_ORT)):
            ratio = best_time / t.loc[reference, column] if reference in t.index else math.nan
            measured.append((f"kd_pcptq time vs {what} ({label})", ratio, f"<= {bar}"))
            paths.append(best)
    size = t.loc["kd_pcptq", "size_mb"] / t.loc[FLOAT, "size_mb"] if "kd_pcptq" in t.index else math.nan
    measured.append(("kd_pcptq size vs fp32", size, f"<= {SIZE_BAR_VS_FP32}"))
    paths.append("stored artifact")
    out = bars_table(measured).assign(path=paths, cpu=cpu or cpu_model())
    return out[["bar", "path", "measured", "threshold", "met", "cpu"]]


def environment(settings: Settings, inputs: Inputs, chosen: StudyPolicy, n_parameters: int) -> pd.DataFrame:
    """The machine, the versions and the settings of the run, one row per item. The load
    average (read when this is called, after the timing) says how busy the cores were: with
    other processes on them, torch's threads wait for each other at every operator."""
    import onnxruntime

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    items = {"cpu": cpu_model(), "isa": " ".join(isa_flags()), "vnni": has_vnni(), "cores": os.cpu_count(),
             "load_average_1_5_15_min": load, "torch_threads": settings.threads,
             "ort_intra_op_threads": settings.threads, "ort_spinning": ORT_SPINNING, "torch": torch.__version__,
             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "quantized_engine": torch.backends.quantized.engine,
             "onnxruntime": onnxruntime.__version__, "shape": str(asdict(settings.shape)), "parameters": n_parameters,
             "weights": f"random, seed {settings.seed} (size and speed do not depend on their values)",
             "batch": f"{settings.batch_size} x {inputs.n_tokens} tokens", "tokens": inputs.tokens_source,
             "repeats_b32": settings.repeats, "singles_b1": settings.singles,
             "static_calibration": f"{settings.calibration_batches} random-token batches of 8",
             "policy": chosen.source}
    return pd.DataFrame({"item": list(items), "value": [str(v) for v in items.values()]})


@dataclass
class Measurement:
    table: pd.DataFrame
    bars: pd.DataFrame
    environment: pd.DataFrame
    mapped_policy: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


def measure(profile, settings: Settings | None = None, kernel_cache=None, log=print) -> Measurement:
    """The whole study at the paper's shape, as notebook 11 runs it step by step."""
    settings = settings or settings_for(profile)
    start = time.perf_counter()
    chosen = study_policy(profile)
    n_tokens, source = median_tokens(profile)
    inputs = make_inputs(settings, n_tokens, source)
    fp32, built, mapped = build_variants(profile, settings, inputs, chosen, kernel_cache, log)
    n_parameters = parameter_count(fp32)
    del fp32
    built_s = time.perf_counter() - start
    timing = time_variants(built, inputs, settings)
    table = results_table(built, timing)
    seconds = {"build": built_s, "time": time.perf_counter() - start - built_s}
    result = Measurement(table, bars(table), environment(settings, inputs, chosen, n_parameters), mapped, seconds)
    release(built)
    return result


def release(built: dict[str, Variant]) -> None:
    """Drop the models (gigabytes at XLM-R-base's shape) once they are timed."""
    for v in built.values():
        v.model = None
    gc.collect()
