"""Every variant of the study: one table of what each is, and where each one's artifact lies.

:data:`VARIANTS` is the one place that says what a variant is: the fp32 model it comes from,
the variant it is derived from, its method and that method's settings, the run-time that loads it
and the notebook that makes it. Table order, the benchmark's list and the fp32 reference of each
quantized variant are read from it (:func:`table`, :func:`benchmarked`, :func:`made_by`,
:func:`derived`), and a variant's settings too (:func:`config_of`), never from a name.

``compactnlu.study.make`` makes a variant from its row and registers its artifact folder
(``artifacts/variants/<result key>.json``); later notebooks and the ``predict`` helper load it by
name (:func:`load`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from . import artifacts
from .artifacts import read_json, write_json
from .cachekeys import artifact_dir
from .config import Profile
from .model import MultiTaskNLU
from .quant import (METHODS, DynamicConfig, MethodConfig, NBitsConfig, OnnxInt8Config, StaticConfig,
                    load_quantized)
from .quant.fast import to_fast


class Chosen:
    """The settings of a row that the notebook making it chooses (notebook 07's selection among
    its candidates), recorded with :func:`choose`."""

    def __repr__(self) -> str:
        return "CHOSEN"


CHOSEN = Chosen()
# A row's settings: the method's config, a function of the profile that gives it, CHOSEN, or None
# (a trained model, or a run-time path of the artifact of the variant it is derived from).
Settings = MethodConfig | Callable[[Profile], MethodConfig] | Chosen | None


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # the trained model whose weights it holds (itself for a trained model)
    derived_from: str | None  # the variant it is made from (None: trained)
    method: str  # fp32, classic, or the name a quantization method is registered under (quant.METHODS)
    runtime: str  # what runs it: torch, fast (integer kernels), onnx (ONNX Runtime), sklearn
    notebook: str  # the notebook that makes and registers it
    replicated: bool  # made once per training seed (notebooks 02, 04, 08); else seed 0 only
    benchmarked: bool  # timed by notebook 08 and broken down by notebook 09
    config: Settings = None  # the method's settings (Settings above)


def _v(name, model, derived_from, method, runtime, notebook, replicated=True, benchmarked=True,
       config: Settings = None) -> Variant:
    return Variant(name, model, derived_from, method, runtime, notebook, replicated, benchmarked, config)


# The reported static models' calibration: 256 training batches, as in the paper's experiments
# (notebook 05 sweeps 1-256 beside them); a profile with fewer batches calibrates on all it has.
STATIC = StaticConfig(n_batches=256)


# In the order the study's tables list them.
VARIANTS = (
    _v("baseline", "baseline", None, "fp32", "torch", "02"),
    _v("teacher_idsf", "teacher_idsf", None, "fp32", "torch", "03", replicated=False, benchmarked=False),
    _v("teacher_iddc", "teacher_iddc", None, "fp32", "torch", "03", replicated=False, benchmarked=False),
    _v("teacher_dcsf", "teacher_dcsf", None, "fp32", "torch", "03", replicated=False, benchmarked=False),
    _v("kd", "kd", None, "fp32", "torch", "04"),
    _v("baseline_static", "baseline", "baseline", "static", "torch", "05", config=STATIC),
    _v("baseline_dynamic", "baseline", "baseline", "dynamic", "torch", "06", config=DynamicConfig()),
    _v("kd_static", "kd", "kd", "static", "torch", "05", config=STATIC),
    _v("kd_dynamic", "kd", "kd", "dynamic", "torch", "06", config=DynamicConfig()),
    _v("kd_pcptq", "kd", "kd", "precision", "torch", "07", config=CHOSEN),
    _v("baseline_pcptq", "baseline", "baseline", "precision", "torch", "07", config=CHOSEN),
    _v("kd_pcptq_fast", "kd", "kd_pcptq", "precision", "fast", "07", replicated=False),
    _v("kd_pcptq_onnx", "kd", "kd_pcptq", "onnx_matmulnbits", "onnx", "08", replicated=False, config=NBitsConfig()),
    # reduce_range is the CPU's choice (quant.onnx_int8), not the profile's
    _v("kd_onnx_int8", "kd", "kd", "onnxruntime_dynamic", "onnx", "08", replicated=False,
       config=lambda profile: OnnxInt8Config.for_this_cpu()),
    _v("classic", "classic", None, "classic", "sklearn", "02", replicated=False, benchmarked=False),
)
BY_NAME = {v.name: v for v in VARIANTS}
# Table order; names outside it (e.g. ablation runs) go last.
ORDER = [v.name for v in VARIANTS]
# Run-times a registered artifact can be loaded with (the classic reference is not registered).
RUNTIMES = ("torch", "fast", "onnx")


def table() -> pd.DataFrame:
    """The variant table, one row per variant (``config``: the settings as written, a function's
    as "from the profile")."""
    rows = [{f.name: getattr(v, f.name) for f in fields(Variant)} for v in VARIANTS]
    shown = ["from the profile" if callable(v.config) else "" if v.config is None else repr(v.config)
             for v in VARIANTS]
    return pd.DataFrame(rows).assign(config=shown)


def lookup(name: str) -> Variant:
    """The table's row for ``name``; an unknown name is a KeyError naming the closest known one."""
    if name not in BY_NAME:
        raise KeyError(f"{name!r} is not a variant of the study{_closest(name)}; variants: {', '.join(ORDER)}")
    return BY_NAME[name]


def _closest(name) -> str:
    text = str(name).strip().lower()
    if text in BY_NAME:
        return f" (did you mean {text!r}? names are lower case)"
    close = difflib.get_close_matches(text, ORDER, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def made_by(notebook: str) -> list[str]:
    """The variants notebook ``notebook`` (``"05"`` or ``"05_static_ptq"``) makes, in table order."""
    return [v.name for v in VARIANTS if v.notebook == notebook[:2]]


def lineage(name: str) -> list[str]:
    """``name`` and every variant it is derived from, nearest first."""
    chain = [name]
    while (parent := lookup(chain[-1]).derived_from) is not None:
        chain.append(parent)
    return chain


def derived(from_: str, method: str | None = None, runtime: str | None = None,
            include_self: bool = False) -> list[str]:
    """The variants made from ``from_`` directly or through another variant, in table order;
    ``method``, ``runtime``: of that method, run-time only; ``include_self``: ``from_`` first."""
    out = [v.name for v in VARIANTS if v.name != from_ and from_ in lineage(v.name)
           and method in (None, v.method) and runtime in (None, v.runtime)]
    return [from_, *out] if include_self else out


def replicated(model: str) -> list[str]:
    """The variants of trained model ``model`` made on every training seed, in table order."""
    return [v.name for v in VARIANTS if v.model == model and v.replicated]


def benchmarked(methods: tuple[str, ...] | None = None) -> list[str]:
    """The variants notebook 08 times (``methods``: of those methods only), each trained model's
    together: the model first, then what is made from it, in table order."""
    chosen = [v for v in VARIANTS if v.benchmarked and (methods is None or v.method in methods)]
    models = list(dict.fromkeys(v.model for v in chosen))
    return [v.name for m in models for v in chosen if v.model == m]


def config_of(profile: Profile, name: str) -> MethodConfig | None:
    """The settings variant ``name`` is made with on ``profile``: its row's, or the function's
    answer, or what :func:`choose` recorded; a run-time path has its source artifact's; None for
    a trained model."""
    row = lookup(name)
    if row.config is None:
        same_artifact = row.derived_from is not None and lookup(row.derived_from).method == row.method
        return config_of(profile, row.derived_from) if same_artifact else None
    if isinstance(row.config, Chosen):
        chosen = _read(_chosen_path(profile)).get(name)
        if chosen is None:
            raise KeyError(f"variant {name!r} has no settings chosen for profile {profile.name!r}: run notebook "
                           f"{row.notebook} first")
        return METHODS[row.method].config.from_record(chosen)
    return row.config(profile) if callable(row.config) else row.config


def choose(profile: Profile, name: str, config: MethodConfig) -> None:
    """Record ``config`` as the settings of ``name``, a row whose settings its notebook chooses (CHOSEN)."""
    row = lookup(name)
    if not isinstance(row.config, Chosen):
        raise ValueError(f"variant {name!r} has its settings in the variant table; only a CHOSEN row's are chosen")
    if not isinstance(config, METHODS[row.method].config):
        raise ValueError(f"variant {name!r} is made by {row.method!r}, which takes a "
                         f"{METHODS[row.method].config.__name__}, not a {type(config).__name__}")
    path = _chosen_path(profile)
    write_json(path, {**_read(path), name: dataclasses.asdict(config)})


def _chosen_path(profile: Profile) -> Path:
    return artifact_dir(profile, "variants", "chosen").with_suffix(".json")


def _read(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def upsert_rows(path: Path | str, rows: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """:func:`compactnlu.artifacts.upsert_rows` with the rows kept in the table's order."""
    return artifacts.upsert_rows(path, rows, key, order=ORDER)


def _registry(profile: Profile) -> Path:
    return artifact_dir(profile, "variants", "").with_suffix(".json")


def register(profile: Profile, name: str, folder: Path | str, runtime: str | None = None) -> None:
    """Record ``folder`` as variant ``name``'s artifact, loaded with ``runtime`` (default: the table's)."""
    if name not in BY_NAME:
        raise ValueError(f"{name!r} is not in the variant table (compactnlu.variants.VARIANTS); add it there first")
    runtime = runtime or BY_NAME[name].runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    path = _registry(profile)
    write_json(path, {**_read(path), name: {"folder": str(Path(folder).resolve()), "runtime": runtime}})


def registered(profile: Profile) -> dict[str, dict]:
    return _read(_registry(profile))


def folder_of(profile: Profile, name: str) -> Path:
    lookup(name)
    entry = registered(profile).get(name)
    if BY_NAME[name].runtime not in RUNTIMES:
        raise KeyError(f"variant {name!r} runs on {BY_NAME[name].runtime}, not loadable by name; "
                       f"see compactnlu.{BY_NAME[name].method}")
    if entry is None:
        raise KeyError(f"variant {name!r} is not registered for profile {profile.name!r}: run notebook "
                       f"{BY_NAME[name].notebook} first")
    return Path(entry["folder"])


def load(profile: Profile, variant: str):
    """The variant's model, ready for ``compactnlu.metrics.predict`` and the benchmark: an fp32
    variant (the table's method) as ``MultiTaskNLU``, any other as the method recorded in its
    ``quantization.json`` loads it (``quant.load_quantized``); runtime "fast" puts a
    precision-controlled model on fast kernels."""
    folder = folder_of(profile, variant)
    if lookup(variant).method == "fp32":
        return MultiTaskNLU.load(folder)
    model = load_quantized(folder)
    return to_fast(model) if registered(profile)[variant]["runtime"] == "fast" else model
