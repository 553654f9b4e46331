"""The paper's efficiency claims at the paper's scale: size and CPU time of every PTQ method
of the study on the study's model class built at XLM-R-base's shape (notebook 11).

The paper's size and time ratios (KD + PC-PTQ at 0.40x the baseline's size, 0.33x its CPU
time) are about XLM-R-base, 278M parameters; the study's own encoder has about 2M, where
quantizing activations on the fly costs about what the int8 products save. So the same
methods run here on ``MultiTaskNLU`` at XLM-R-base's shape (vocabulary 250,002, hidden 768,
12 layers of 12 heads, MLP 3072, 514 positions) with the study's heads and CRF.

The weights are random (seeded): bytes on disk and time per batch depend on the shapes and
bit-widths, not on the values, so no accuracy is measured here (it would mean nothing).
Static PTQ is calibrated on random-token batches: its scales differ from a trained model's,
not its bytes or its kernels.

Every variant is built, saved to a temporary folder under ``artifacts/paper_scale`` (its
bytes measured with ``bench.artifact_size_mb``, then the folder deleted: the fp32 model alone
is 1.1 GB), smoke-run once (which is also its warm-up), and kept in memory for the timing,
which interleaves all variants (``bench.time_passes``, ``bench.latency``). A method that fails
at this scale (an ONNX export, say) leaves a row with its error in ``note``, not a crash.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import bench, paper, variants
from .artifacts import read_json
from .cpu import cpu_model, has_vnni, isa_flags
from .model import MultiTaskNLU, NLUConfig

PAPER_LAYERS = 12
# The study's heads (MASSIVE: 60 intents, 18 scenarios, 55 slot types -> 111 BIO tags).
N_INTENTS, N_DOMAINS, N_SLOT_TYPES = 60, 18, 55
DEFAULT_TOKENS = 24  # tokens per example when the study's data is not built (MASSIVE's median, about)
SEED = 0

# When notebook 07 has not registered ``kd_pcptq`` (tests, or 07 not run): the policy the
# default profile's run selected (figures/pcptq_policies.png, "sensitivity"), as 2 layers.
DEFAULT_POLICY = {"embedding": 4, "layer0.attention": 4, "layer1.attention": 4, "layer0.mlp": 8,
                  "layer1.mlp": 8, "head.id": 16, "head.dc": 16, "head.sf": 8}
DEFAULT_POLICY_SOURCE = ("stated default: kd_pcptq of the committed default-profile run (embedding and attention "
                         "4-bit, MLP 8-bit, ID and DC heads 16-bit, SF head 8-bit); no kd_pcptq artifact registered "
                         "for this profile")

# The paper's Table 2 variant each of ours stands beside (size and time over the paper's baseline).
PAPER_COUNTERPART = {"fp32": "baseline", "static": "baseline_static", "dynamic": "baseline_dynamic",
                     "kd_pcptq": "kd_pcptq", "kd_pcptq_fast": "kd_pcptq", "kd_pcptq_nbits": "kd_pcptq"}
# The bars for kd_pcptq on its fastest path.
TIME_BAR_VS_FP32, TIME_BAR_VS_ORT, SIZE_BAR_VS_FP32 = 0.5, 1.0, 0.40


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 514


XLMR_BASE = Shape(vocab_size=250_002, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
# The smoke profile's stand-in: nbval runs every notebook in seconds there.
SMOKE_SHAPE = Shape(vocab_size=2000, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class Settings:
    """What one measurement builds and how long it times it."""
    shape: Shape
    repeats: int  # interleaved timed passes of the batch of 32, median reported
    singles: int  # batch-1 examples, interleaved one by one, median reported
    calibration_batches: int = 4  # static PTQ: random-token batches of 8
    batch_size: int = 32
    threads: int = 2
    seed: int = SEED


def paper_shape(profile) -> Shape:
    """XLM-R-base's shape for the default and paper profiles; a small stand-in for smoke."""
    return SMOKE_SHAPE if profile.name == "smoke" else XLMR_BASE


def settings_for(profile) -> Settings:
    """The shape and the repeats. At XLM-R-base's shape building the 11 variants takes about
    4.5 minutes on a busy 2-core machine, and one interleaved round about 50 s at batch 32 and
    25 s at batch 1 (the paper's path dequantizes every weight on every call: 3-12 s a call);
    3 repeats and 3 batch-1 examples keep the notebook near 8 minutes there. The smoke stand-in
    runs on one thread: its times mean nothing, and on a busy 2-core machine two torch threads
    wait for each other at every small operator (the smoke notebook took 65 s so, 15 s on one)."""
    if profile.name == "smoke":
        return Settings(shape=SMOKE_SHAPE, repeats=2, singles=2, calibration_batches=2, threads=1)
    return Settings(shape=paper_shape(profile), repeats=3, singles=3)


# ---------------------------------------------------------------- the model

def placeholder_tags(n_slot_types: int = N_SLOT_TYPES) -> tuple[str, ...]:
    """BIO tags of the study's size (``O`` plus B-/I- per slot type); names do not change sizes."""
    return ("O",) + tuple(f"{p}-slot{i:02d}" for i in range(n_slot_types) for p in ("B", "I"))


def paper_config(shape: Shape, pooling: str = "max") -> NLUConfig:
    """The study's model config at ``shape`` (XLM-R's special ids: <s> 0, <pad> 1, </s> 2)."""
    encoder = {"vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
               "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
               "intermediate_size": shape.intermediate_size, "max_position_embeddings": shape.max_positions,
               "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
               "layer_norm_eps": 1e-5}
    return NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=placeholder_tags(), pooling=pooling,
                     encoder=encoder)


def build_model(shape: Shape, pooling: str = "max", seed: int = SEED) -> MultiTaskNLU:
    """``MultiTaskNLU`` at ``shape`` with seeded random weights (XLM-R's initialisation), eval mode."""
    torch.manual_seed(seed)
    return MultiTaskNLU(paper_config(shape, pooling)).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the study's policy, mapped by depth

@dataclass
class StudyPolicy:
    policy: dict[str, int]
    per_layer: bool
    embedding: bool
    per_channel: bool
    source: str


def study_policy(profile) -> StudyPolicy:
    """The policy notebook 07 selected (``kd_pcptq``'s ``quantization.json``), or ``DEFAULT_POLICY``
    when that variant is not registered for ``profile``."""
    try:
        folder = variants.folder_of(profile, "kd_pcptq")
        details = read_json(folder / "quantization.json")
    except (KeyError, FileNotFoundError):
        return StudyPolicy(dict(DEFAULT_POLICY), per_layer=True, embedding=True, per_channel=True,
                           source=DEFAULT_POLICY_SOURCE)
    return StudyPolicy({g: int(b) for g, b in details["policy"].items()}, per_layer=bool(details["per_layer"]),
                       embedding=bool(details["embedding"]), per_channel=bool(details.get("per_channel", True)),
                       source=f"kd_pcptq registered by notebook 07 ({folder.name})")


_LAYER_GROUP = re.compile(r"layer(\d+)\.(.+)")


def policy_layers(policy: dict[str, int]) -> int:
    """How many encoder layers a per-layer policy covers (0 for a shared or head-only one)."""
    found = [int(m.group(1)) for m in map(_LAYER_GROUP.fullmatch, policy) if m]
    return max(found) + 1 if found else 0


def map_policy(policy: dict[str, int], target_layers: int) -> dict[str, int]:
    """``policy`` onto a model of ``target_layers`` encoder layers by relative depth: target layer
    ``l`` takes study layer ``floor(l * L_study / target_layers)``, for each component; groups
    that are not per layer (heads, embedding, pooler, shared attention/mlp) keep their names."""
    study_layers = policy_layers(policy)
    mapped = {g: b for g, b in policy.items() if not _LAYER_GROUP.fullmatch(g)}
    kinds = sorted({m.group(2) for m in map(_LAYER_GROUP.fullmatch, policy) if m})
    for layer in range(target_layers if study_layers else 0):
        source = layer * study_layers // target_layers
        for kind in kinds:
            bits = policy.get(f"layer{source}.{kind}")
            if bits is not None:
                mapped[f"layer{layer}.{kind}"] = bits
    return mapped


def mapped_policy_table(policy: dict[str, int]) -> pd.DataFrame:
    """Bits as component x layer (numeric layer order; heads and embedding in ``all``)."""
    rows = []
    for group, bits in policy.items():
        m = _LAYER_GROUP.fullmatch(group)
        rows.append({"component": m.group(2) if m else group, "layer": int(m.group(1)) if m else "all", "bits": bits})
    table = pd.DataFrame(rows).pivot(index="component", columns="layer", values="bits")
    order = sorted(table.columns, key=lambda c: (c == "all", c if c != "all" else 0))
    return table[order]


def uniform(model: MultiTaskNLU, bits: int) -> dict[str, int]:
    """Every precision group (per layer, word embedding included) at ``bits``."""
    from .quant.groups import precision_groups

    return {g: bits for g in precision_groups(model, per_layer=True, embedding=True)}


# ---------------------------------------------------------------- inputs

def median_tokens(profile) -> tuple[int, str]:
    """The composed test split's median ``input_ids`` length, and where it came from; ``DEFAULT_TOKENS``
    when the study's data is not built."""
    from .features import load_study_data

    try:
        test = load_study_data(profile).features["test"]
    except FileNotFoundError:
        return DEFAULT_TOKENS, f"stated default ({DEFAULT_TOKENS}): the study's data is not built"
    lengths = [len(ids) for ids in test["input_ids"]]
    return int(np.median(lengths)), f"median input_ids length of the composed test split ({len(lengths)} examples)"


def random_batch(shape: Shape, batch_size: int, n_tokens: int, seed: int) -> dict:
    """``<s> random tokens </s>``, no padding; every inner token starts a word (the CRF decodes
    ``n_tokens - 2`` words per row: at most the real work, the same for every variant)."""
    if not 3 <= n_tokens <= shape.max_positions - 2:  # XLM-R counts positions from pad + 1
        raise ValueError(f"n_tokens must lie in 3..{shape.max_positions - 2}, got {n_tokens}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape.vocab_size, (batch_size, n_tokens), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    word_mask = torch.zeros(batch_size, n_tokens, dtype=torch.bool)
    word_mask[:, 1:-1] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "word_mask": word_mask}


@dataclass
class Inputs:
    n_tokens: int
    tokens_source: str
    batch32: dict
    singles: list[dict]
    calibration: list[dict]


def make_inputs(settings: Settings, n_tokens: int, tokens_source: str) -> Inputs:
    """The timed batch of ``batch_size``, the batch-1 examples and the calibration batches
    (each from its own seed, so calibration never sees the timed batches)."""
    shape, seed = settings.shape, settings.seed
    return Inputs(
        n_tokens=n_tokens, tokens_source=tokens_source,
        batch32=random_batch(shape, settings.batch_size, n_tokens, seed + 1),
        singles=[random_batch(shape, 1, n_tokens, seed + 100 + i) for i in range(settings.singles)],
        calibration=[random_batch(shape, 8, n_tokens, seed + 1000 + i) for i in range(settings.calibration_batches)])


# ---------------------------------------------------------------- building the variants

@dataclass
class Variant:
    name: str
    method: str
    path: str  # how it runs: torch float, torch.ao, paper path, fast path, ONNX Runtime
    policy: str = ""
    model: object | None = None  # None when the method failed
    size_mb: float = math.nan
    kernels: str = ""
    build_s: float = math.nan
    note: str = ""


def _failure(error: BaseException) -> str:
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
            bench.infer(model, self.inputs.batch32)
            variant.model, variant.size_mb, variant.kernels = model, size_mb, kernels
        except Exception as error:  # a method that fails at this scale is a finding, not a crash
            variant.note = "; ".join(filter(None, [variant.note, _failure(error)]))
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
        return self.add(variant, lambda folder: _with_size(make(base.model), base.size_mb))

    def close(self) -> None:
        """Remove the scratch root if nothing else is in it."""
        try:
            self.root.rmdir()
        except OSError:
            pass


def _with_size(made, size_mb):
    model, kernels = made
    return model, size_mb, kernels


def _fp32(model):
    def build(folder):
        model.save(folder)
        return model, bench.artifact_size_mb(folder), bench.kernels_used(model)
    return build


def _static(model, calibration):
    from .quant import quantize_static, save_quantized

    def build(folder):
        quantized, used = quantize_static(model, iter(calibration), len(calibration))
        save_quantized(quantized, folder, "static", {"calibration": f"{used} random-token batches"})
        return quantized, bench.artifact_size_mb(folder), bench.kernels_used(quantized)
    return build


def _dynamic(model):
    from .quant import quantize_dynamic, save_quantized

    def build(folder):
        quantized = quantize_dynamic(model)
        save_quantized(quantized, folder, "dynamic")
        return quantized, bench.artifact_size_mb(folder), bench.kernels_used(quantized)
    return build


def _precision(model, policy: dict, per_layer: bool, embedding: bool, per_channel: bool):
    from .quant import apply_policy, precision_groups, save_quantized

    def build(folder):
        groups = precision_groups(model, per_layer=per_layer, embedding=embedding)
        quantized = apply_policy(model, policy, groups, per_channel=per_channel).eval()
        save_quantized(quantized, folder, "precision", {"policy": policy, "per_channel": per_channel,
                                                         "per_layer": per_layer, "embedding": embedding})
        return quantized, bench.artifact_size_mb(folder), bench.kernels_used(quantized)
    return build


def _fast(rows: int, cache):
    from .quant.fast import to_fast

    def make(model):
        fast = to_fast(model, "auto", rows=rows, cache=cache)
        return fast, "fast: " + bench.kernels_used(fast)
    return make


@contextlib.contextmanager
def _quiet_root_logger():
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


def _onnx_int8(model, threads: int):
    from .onnx_runtime import OnnxNLU, export_onnx
    from .quant.onnx_int8 import quantize_onnx_dynamic

    def build(folder):
        with _quiet_root_logger():
            exported = export_onnx(model, folder / "fp32")
            quantized = quantize_onnx_dynamic(exported, folder / "int8")
        shutil.rmtree(exported)  # 1.1 GB at XLM-R-base's shape; the session reads int8 only
        session = OnnxNLU.load(quantized, threads=threads)
        reduce_range = session.quantization.get("reduce_range") if session.quantization else None
        return session, bench.artifact_size_mb(quantized), f"onnxruntime (MLAS), reduce_range={reduce_range}"
    return build


def _onnx_nbits(builder: Builder, source: str, threads: int):
    from .quant.onnx_nbits import ACCURACY_LEVEL, export_precision_onnx
    from .onnx_runtime import OnnxNLU

    def build(folder):
        base = builder.variants[source].model
        if base is None:
            raise RuntimeError(f"{source} failed, nothing to export")
        with _quiet_root_logger():
            export_precision_onnx(base, folder / "nbits", accuracy_level=ACCURACY_LEVEL)
        session = OnnxNLU.load(folder / "nbits", threads=threads)
        kernels = f"onnxruntime MatMulNBits (accuracy_level {ACCURACY_LEVEL})"
        return session, bench.artifact_size_mb(folder / "nbits"), kernels
    return build


def build_variants(profile, settings: Settings, inputs: Inputs, chosen: StudyPolicy, kernel_cache=None,
                   log=print) -> tuple[MultiTaskNLU, dict[str, Variant], dict[str, int]]:
    """Every PTQ method of the study on the model at ``settings.shape``: fp32; static (calibrated
    on random tokens); dynamic; the study's policy mapped by depth (``kd_pcptq``), uniform 8 and
    uniform 4, each on the paper's path and on the fast path; ONNX Runtime's dynamic int8; the
    policy exported to MatMulNBits. Returns the fp32 model, the variants and the mapped policy."""
    torch.set_num_threads(settings.threads)
    fp32 = build_model(settings.shape, profile.pooling, settings.seed)
    mapped = map_policy(chosen.policy, settings.shape.num_layers) if chosen.per_layer else dict(chosen.policy)
    rows = settings.batch_size * inputs.n_tokens  # the fast path picks kernels for the timed batch's rows
    b = Builder(profile.artifacts_dir / "paper_scale", inputs, log)
    b.add(Variant("fp32", "fp32", "torch float"), _fp32(fp32))
    # ONNX first: its exports hold extra copies of the fp32 weights, best made while little else is in memory
    b.add(Variant("onnx_int8", "onnxruntime dynamic int8", "ONNX Runtime"), _onnx_int8(fp32, settings.threads))
    b.add(Variant("static", "static int8", "torch.ao"), _static(fp32, inputs.calibration))
    b.add(Variant("dynamic", "dynamic int8", "torch.ao"), _dynamic(fp32))
    policies = {"kd_pcptq": (mapped, chosen.per_layer, chosen.embedding, chosen.per_channel, "study (mapped)"),
                "uniform8": (uniform(fp32, 8), True, True, True, "uniform 8"),
                "uniform4": (uniform(fp32, 4), True, True, True, "uniform 4")}
    for name, (policy, per_layer, embedding, per_channel, label) in policies.items():
        b.add(Variant(name, "pcptq", "paper path", label), _precision(fp32, policy, per_layer, embedding, per_channel))
        if name == "kd_pcptq":
            b.add(Variant("kd_pcptq_nbits", "pcptq -> onnx MatMulNBits", "ONNX Runtime", label),
                  _onnx_nbits(b, name, settings.threads))
        b.same_artifact(Variant(f"{name}_fast", "pcptq", "fast path", label), name, _fast(rows, kernel_cache))
    b.close()
    order = ["fp32", "static", "dynamic", "kd_pcptq", "kd_pcptq_fast", "kd_pcptq_nbits", "uniform8", "uniform8_fast",
             "uniform4", "uniform4_fast", "onnx_int8"]
    return fp32, {name: b.variants[name] for name in order}, mapped


# ---------------------------------------------------------------- timing and the table

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
    fp32 = table.set_index("variant").loc["fp32"]
    table["size_vs_fp32"] = table.size_mb / fp32.size_mb
    table["time_b32_vs_fp32"] = table.time_b32_s / fp32.time_b32_s
    table["time_b1_vs_fp32"] = table.time_b1_ms / fp32.time_b1_ms
    table["paper_variant"] = table.variant.map(PAPER_COUNTERPART)
    table = table.merge(paper_ratios(), on="paper_variant", how="left")
    columns = ["variant", "method", "path", "policy", "kernels", "size_mb", "size_vs_fp32", "paper_size_vs_baseline",
               "time_b32_s", "time_b32_vs_fp32", "paper_time_vs_baseline", "time_b1_ms", "time_b1_vs_fp32",
               "time_b32_min_s", "time_b32_max_s", "paper_variant", "build_s", "note"]
    return table[columns]


KD_PCPTQ_PATHS = ("kd_pcptq", "kd_pcptq_fast", "kd_pcptq_nbits")


def bars(table: pd.DataFrame, cpu: str | None = None) -> pd.DataFrame:
    """The issue's bars, measured in this one run: ``kd_pcptq`` on its fastest path (the one of
    ``KD_PCPTQ_PATHS`` with the smallest time at that batch) <= 0.5x fp32 time and <= 1.0x ONNX
    Runtime int8, at batch 32 and at batch 1; its size <= 0.40x fp32. ``met`` is False where a
    number is missing (a failed variant)."""
    t = table.set_index("variant")
    cpu = cpu or cpu_model()
    out = []
    for column, label in (("time_b32_s", "batch 32"), ("time_b1_ms", "batch 1")):
        paths = t.loc[[p for p in KD_PCPTQ_PATHS if p in t.index], column].dropna()
        best = paths.idxmin() if len(paths) else None
        best_time = paths.min() if len(paths) else math.nan
        for what, reference, bar in (("fp32", "fp32", TIME_BAR_VS_FP32), ("ONNX Runtime int8", "onnx_int8",
                                                                            TIME_BAR_VS_ORT)):
            ratio = best_time / t.loc[reference, column] if reference in t.index else math.nan
            out.append({"bar": f"kd_pcptq time vs {what} ({label})", "path": best, "measured": ratio,
                        "threshold": f"<= {bar}", "met": bool(ratio <= bar), "cpu": cpu})
    size = t.loc["kd_pcptq", "size_mb"] / t.loc["fp32", "size_mb"] if "kd_pcptq" in t.index else math.nan
    out.append({"bar": "kd_pcptq size vs fp32", "path": "stored artifact", "measured": size,
                "threshold": f"<= {SIZE_BAR_VS_FP32}", "met": bool(size <= SIZE_BAR_VS_FP32), "cpu": cpu})
    return pd.DataFrame(out)


def environment(settings: Settings, inputs: Inputs, chosen: StudyPolicy, n_parameters: int) -> pd.DataFrame:
    """The machine, the versions and the settings of the run, one row per item. The load
    average (read when this is called, after the timing) says how busy the cores were: with
    other processes on them, torch's threads wait for each other at every operator."""
    import onnxruntime

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    items = {"cpu": cpu_model(), "isa": " ".join(isa_flags()), "vnni": has_vnni(), "cores": os.cpu_count(),
             "load_average_1_5_15_min": load, "torch_threads": settings.threads,
             "ort_intra_op_threads": settings.threads, "torch": torch.__version__,
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
