"""Measurements made the same way for every variant of the study: size, time, memory.

Time is the model's: batches are tokenized and padded before the clock starts (the same
batches for every variant), and a pass is what scoring runs too, ``interface.infer``: the
forward plus the decisions (label sets for ID and DC, Viterbi for SF). Variants are
interleaved, each repeat in a fresh seeded order, so drift of the machine hits them alike and
no variant always runs after the same one.
Peak memory is measured in a fresh process per variant (``python -m compactnlu.bench``),
so one variant's allocations cannot hide another's.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import PROFILES, load_profile
from .cpu import cpu_model, has_vnni, isa_flags
from .features import load_study_data
from .interface import IGNORE, infer
from .progress import bar
from .quant import DETAILS_FILE, read_details
from .quant.fast import kernel_summary
from .quant.onnx_int8 import ORT_INT8
from .quant.stored import PrecisionLinear
from .train import collator_for
from .variants import load as load_variant

# What a deployment loads: weights (embeddings included), scales, configs; not training logs.
# The classic reference's files (``classic.FILES`` and its manifest) are named here rather than
# imported, so sizing needs neither scikit-learn nor CRFsuite (a test checks they agree).
DEPLOYED = ("model.*", "config.json", "quantization.json", "classic.json", "text.skops", "slots.crfsuite")


def artifact_size_mb(folder: Path | str) -> float:
    """Bytes on disk of a saved model artifact (any variant's folder, or the classic reference's),
    in MB (10^6 bytes): its files alone, nothing imported or loaded."""
    folder = Path(folder)
    files = {p for pattern in DEPLOYED for p in folder.glob(pattern) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"no saved model in {folder}")
    return sum(p.stat().st_size for p in files) / 1e6


def prepared_batches(dataset, collator, batch_size: int) -> list[dict]:
    """The whole split, sorted by length and padded per batch: ``input_ids``, ``attention_mask``
    and the first-subword ``word_mask`` the CRF decodes."""
    order = np.argsort(np.asarray(dataset["n_subwords"][:]), kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        batch = collator([dataset[int(i)] for i in order[start:start + batch_size]])
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "word_mask": batch["slot_labels"] != IGNORE})
    return batches


def running_orders(names: list[str], repeats: int, seed: int = 0):
    """``(repeat, order)`` for each repeat: a fresh permutation of ``names``, seeded, so a rerun
    times in the same orders. A fixed rotation put each variant after the same one in every
    repeat, so whatever one variant leaves behind (ONNX Runtime's workers, the caches it
    filled) always landed on the same next one; in notebook 08 that was the fp32 baseline, the
    denominator of every ratio, always right after the ONNX Runtime int8 session."""
    rng = np.random.default_rng(seed)
    for r in range(repeats):
        yield r, [names[i] for i in rng.permutation(len(names))]


def time_passes(models: dict, batches: list[dict], repeats: int = 5, warmup: int = 1) -> pd.DataFrame:
    """Seconds per full pass over ``batches``: one row per variant and repeat (warm-up not kept)."""
    names = list(models)
    for name in names:
        for _ in range(warmup):
            for batch in batches[:: max(1, len(batches) // 8)]:
                infer(models[name], batch)
    rows = []
    with bar(desc="timed passes", total=repeats * len(names)) as progress:
        for r, order in running_orders(names, repeats):
            for name in order:
                start = time.perf_counter()
                for batch in batches:
                    infer(models[name], batch)
                rows.append({"variant": name, "repeat": r, "seconds": time.perf_counter() - start})
                progress.update()  # after the clock stopped
    return pd.DataFrame(rows)


def latency(models: dict, singles: list[dict], warmup: int = 10) -> pd.DataFrame:
    """Milliseconds per utterance at batch 1, variants interleaved utterance by utterance, each
    utterance in a fresh order (``running_orders``)."""
    names = list(models)
    for name in names:
        for batch in singles[:warmup]:
            infer(models[name], batch)
    rows = []
    with bar(desc="latency", total=len(singles)) as progress:
        for (i, order), batch in zip(running_orders(names, len(singles)), singles):
            for name in order:
                start = time.perf_counter()
                infer(models[name], batch)
                rows.append({"variant": name, "utterance": i, "ms": 1e3 * (time.perf_counter() - start)})
            progress.update()  # between utterances, outside every timed call
    return pd.DataFrame(rows)


def time_classic(model, dataset, labels, repeats: int = 5, n_latency: int = 200) -> pd.DataFrame:
    """The classic reference (``compactnlu.classic``) in :func:`summarise`'s layout: passes of its
    ``predict_frame`` over ``dataset`` (features, linear models, CRF and the output table), latency
    on ``n_latency`` single utterances, throughput over the whole pass. Variant name ``classic``."""
    passes = []
    for r in bar(range(repeats), desc="classic passes"):  # the bar advances between passes
        start = time.perf_counter()
        model.predict_frame(dataset, labels)
        passes.append({"variant": "classic", "repeat": r, "seconds": time.perf_counter() - start})
    sample = np.random.default_rng(0).choice(len(dataset), size=min(len(dataset), n_latency), replace=False)
    singles = [dataset.select([int(i)]) for i in sample]
    latencies = []
    for i, single in enumerate(bar(singles, desc="classic latency")):
        start = time.perf_counter()
        model.predict_frame(single, labels)
        latencies.append({"variant": "classic", "utterance": i, "ms": 1e3 * (time.perf_counter() - start)})
    passes = pd.DataFrame(passes)
    return summarise(passes, pd.DataFrame(latencies), passes, n_throughput=len(dataset))


def ratios_within_repeats(passes: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each variant's pass over ``reference``'s pass in the same repeat (``time_passes``' rows),
    as its median, min and max over repeats: a burst of load on a shared machine slows the
    passes of one repeat, so a ratio within a repeat is steadier than a ratio of medians."""
    wide = passes.pivot(index="repeat", columns="variant", values="seconds")
    ratio = wide.div(wide[reference], axis=0)
    return pd.DataFrame({"median": ratio.median(), "min": ratio.min(), "max": ratio.max()}).rename_axis("variant")


def summarise(passes: pd.DataFrame, latencies: pd.DataFrame, throughput_passes: pd.DataFrame,
              n_throughput: int) -> pd.DataFrame:
    """Median and spread per variant: ``inference_s`` (median pass), its min/max, latency p50/p95,
    throughput (utterances per second at batch 32, median pass)."""
    t = passes.groupby("variant")["seconds"]
    out = pd.DataFrame({"inference_s": t.median(), "inference_min_s": t.min(), "inference_max_s": t.max(),
                        "repeats": t.size()})
    lat = latencies.groupby("variant")["ms"]
    out["latency_p50_ms"] = lat.quantile(0.5)
    out["latency_p95_ms"] = lat.quantile(0.95)
    out["throughput"] = n_throughput / throughput_passes.groupby("variant")["seconds"].median()
    return out.reset_index()


# ---------------------------------------------------------------- memory, in a fresh process

def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib * 1024 / 1e6


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh, so building the batches does not count (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_mb(profile, variant: str, n_batches: int = 20, batch_size: int = 128,
                   threads: int | None = None) -> dict:
    """Peak resident memory of a fresh process that loads ``variant`` and answers
    ``n_batches`` batches of the test set; ``peak_mb`` counts from just before the load."""
    overrides = {k: v for k, v in profile.to_dict().items() if v != getattr(PROFILES[profile.name], k)}
    cmd = [sys.executable, "-m", "compactnlu.bench", profile.name, json.dumps(overrides, default=list), variant,
           str(n_batches), str(batch_size), str(threads or torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ.copy())
    if done.returncode:
        raise RuntimeError(f"memory probe of {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memories(profile, variants: list[str], **kw) -> pd.DataFrame:
    """``peak_memory_mb`` of each of ``variants`` in turn (a fresh process each), with a progress bar."""
    return pd.DataFrame([peak_memory_mb(profile, v, **kw) for v in bar(variants, desc="peak memory")])


def _memory_probe(profile_name: str, overrides: dict, variant: str, n_batches: int, batch_size: int,
                  threads: int) -> dict:
    torch.set_num_threads(threads)
    profile = load_profile(profile_name, overrides)
    data = load_study_data(profile)
    test = data.features["test"]
    batches = prepared_batches(test.select(range(min(len(test), n_batches * batch_size))), collator_for(data),
                               batch_size)
    _reset_peak()
    before = _status_mb("VmRSS")
    model = load_variant(profile, variant)
    loaded = _status_mb("VmRSS")
    for batch in batches:
        infer(model, batch)
    return {"variant": variant, "load_mb": loaded - before, "peak_mb": _status_mb("VmHWM") - before}


def environment() -> dict:
    """The machine and the library versions a benchmark ran on. ``isa`` lists the flags that
    select int8/bf16 kernels; ``vnni`` says whether int8 products accumulate exactly (else
    ONNX Runtime needs 7-bit weights, see ``compactnlu.cpu``); ``cpu_capability`` is the
    vector ISA torch dispatches to (lowered by ``ATEN_CPU_CAPABILITY``)."""
    import onnxruntime
    import transformers

    return {"cpu": cpu_model(), "isa": " ".join(isa_flags()), "vnni": has_vnni(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def kernels_used(model) -> str:
    """For the environment table: which matrix-multiply kernels a loaded variant runs on."""
    if type(model).__name__ == "OnnxNLU":
        workers = "spinning" if model.spinning else "sleeping"
        return f"onnxruntime (MLAS), workers {workers} in a run{', and after it' if model.spinning_after_runs else ''}"
    modules = list(model.modules())
    if any(hasattr(m, "kernel") for m in modules):
        return ", ".join(f"{k} x{n}" for k, n in sorted(kernel_summary(model).items()))
    if any(isinstance(m, PrecisionLinear) for m in modules):
        return "paper path (dequantize per call, float matmul)"
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in modules):
        return f"torch.ao quantized ({torch.backends.quantized.engine}: fbgemm/oneDNN)"
    return "float (torch)"


def onnx_int8_settings(folder: Path | str) -> dict:
    """For the environment table: an ONNX Runtime int8 artifact's ``reduce_range``, the CPU it
    was chosen for, and whether this CPU runs it without saturating (7-bit weights, or VNNI).
    The record is read as loading reads it (``quant.read_details``: a registered method, this
    format version); it must be ORT's dynamic int8."""
    path = Path(folder) / DETAILS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {DETAILS_FILE} in {folder}: not a quantized artifact")
    details = read_details(folder)
    if details["method"] != ORT_INT8.name:
        raise ValueError(f"{path}: method must be {ORT_INT8.name!r}, got {details['method']!r}")
    if not isinstance(details.get("reduce_range"), bool):
        raise ValueError(f"{path}: 'reduce_range' must be true or false, got {details.get('reduce_range')!r}")
    made_on = details.get("quantized_on", {})  # absent in artifacts written before it was recorded
    return {"onnx_int8_reduce_range": details["reduce_range"], "onnx_int8_quantized_on": made_on.get("cpu"),
            "onnx_int8_quantized_on_vnni": made_on.get("vnni"),
            "onnx_int8_fits_this_cpu": details["reduce_range"] or has_vnni()}


if __name__ == "__main__":
    name, overrides, variant, n, size, threads = sys.argv[1:7]
    print(json.dumps(_memory_probe(name, json.loads(overrides), variant, int(n), int(size), int(threads))))


class ZeroLinear(nn.Module):
    """A linear layer's output, as zeros of its shape: no multiply (``without_matmuls``)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_matmuls(model: nn.Module) -> nn.Module:
    """A copy of a float model whose every ``nn.Linear`` only writes zeros of its output shape.
    Its pass costs what the model's pass costs outside its matrix multiplies (the attention's
    own products, softmax, GELU, layer norms, embeddings, the decisions and Viterbi, whose costs
    do not depend on the values): the floor that no faster matrix-multiply kernel, integer
    or otherwise, can take a pass of this model below. Its outputs mean nothing."""
    floor = copy.deepcopy(model).eval()
    for name, module in list(floor.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(floor.get_submodule(parent) if parent else floor, attr, ZeroLinear(module.out_features))
    return floor


@torch.no_grad()
def time_split(models: dict, batches: list[dict], repeats: int = 2) -> pd.DataFrame:
    """Where a pass goes: seconds in the forward pass and in the Viterbi decoding, per variant
    (median over ``repeats`` interleaved passes, after one warm-up batch)."""
    rows = []
    for name, model in models.items():
        infer(model, batches[0])
    for r, order in bar(running_orders(list(models), repeats), desc="time split", total=repeats):
        for name in order:
            model = models[name]
            start = time.perf_counter()
            outputs = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in batches]
            middle = time.perf_counter()
            for out, b in zip(outputs, batches):
                model.decode_slots(out.slot_logits, b["word_mask"])
            rows.append({"variant": name, "repeat": r, "forward_s": middle - start,
                         "viterbi_s": time.perf_counter() - middle})
    out = pd.DataFrame(rows).groupby("variant")[["forward_s", "viterbi_s"]].median()
    out["viterbi_share"] = out.viterbi_s / (out.forward_s + out.viterbi_s)
    return out.reset_index()
