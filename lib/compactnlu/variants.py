"""Every deployed variant of the study by name: where its artifact lies and how to load it.

The notebook that makes a variant registers its artifact folder here
(``artifacts/variants/<result key>.json``); later notebooks (benchmark, per-language,
significance) and the ``predict`` helper load variants by name without knowing how each
was made.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import read_json, write_json
from .config import Profile
from .model import MultiTaskNLU
from .quant import DETAILS_FILE, load_quantized
from .quant.fast import to_fast

# Which notebook makes each variant, for the error that names the step to run first.
MADE_BY = {"baseline": "02", "kd": "04", "baseline_static": "05", "kd_static": "05", "baseline_dynamic": "06",
           "kd_dynamic": "06", "kd_pcptq": "07", "baseline_pcptq": "07", "kd_pcptq_fast": "07", "kd_pcptq_onnx": "08",
           "kd_onnx_int8": "08"}
# A run-time that loads the same artifact another way.
RUNTIMES = ("torch", "fast")


def _registry(profile: Profile) -> Path:
    return profile.artifacts_dir / "variants" / f"{profile.result_key}.json"


def register(profile: Profile, variant: str, folder: Path | str, runtime: str = "torch") -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    path = _registry(profile)
    entries = read_json(path) if path.exists() else {}
    entries[variant] = {"folder": str(Path(folder).resolve()), "runtime": runtime}
    write_json(path, entries)


def registered(profile: Profile) -> dict[str, dict]:
    path = _registry(profile)
    return read_json(path) if path.exists() else {}


def folder_of(profile: Profile, variant: str) -> Path:
    entry = registered(profile).get(variant)
    if entry is None:
        step = MADE_BY.get(variant)
        hint = f"run notebook {step} first" if step else "no notebook makes it"
        raise KeyError(f"variant {variant!r} is not registered for profile {profile.name!r}: {hint}")
    return Path(entry["folder"])


def load(profile: Profile, variant: str):
    """The variant's model, ready for ``compactnlu.metrics.predict`` and the benchmark: a
    quantized artifact as its recorded method loads it (``quant.load_quantized``), a folder
    without ``quantization.json`` as the fp32 ``MultiTaskNLU``; runtime "fast" puts a
    precision-controlled model on fast kernels."""
    folder = folder_of(profile, variant)
    if not (folder / DETAILS_FILE).exists():
        return MultiTaskNLU.load(folder)
    model = load_quantized(folder)
    return to_fast(model) if registered(profile)[variant]["runtime"] == "fast" else model
