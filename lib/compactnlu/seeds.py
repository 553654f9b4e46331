"""The PTQ stage repeated over its own seeds on seed 0's fp32 models, for one of notebook 10's tests.

What a seed varies here: the sample and order of the calibration batches of static PTQ, and
the batch order and Gumbel noise of the precision search (with its fine-tuning). Variation over
training seeds, the test of the paper's claims, is ``compactnlu.replicates``'.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .artifacts import read_json, write_json
from .pcptq import searched, split_metrics
from .quant import calibration_batches, quantize_static
from .artifacts import keyed_path
from .quant.search import SearchConfig
from .train import collator_for


def _cached(profile, kind: str, details: dict, run) -> dict:
    path = keyed_path(profile, "seed_runs", kind, details).with_suffix(".json")
    if not path.exists():
        write_json(path, run())
    return read_json(path)


def static_seed(profile, data, name: str, trained, seed: int, n_batches: int) -> dict:
    """Test metrics of ``name`` statically quantized on ``n_batches`` (notebook 05's parameter)
    calibration batches drawn with ``seed``."""
    def run():
        batches = calibration_batches(data, collator_for(data), profile.batch_size, seed)
        quantized, _ = quantize_static(trained.model, batches, n_batches)
        return split_metrics(quantized, data, "test")
    return _cached(profile, f"{name}_static", {"source": Path(trained.path).name, "seed": seed,
                                               "n_batches": n_batches}, run)


def pcptq_seed(profile, data, cache, name: str, trained, config: SearchConfig, seed: int) -> dict:
    """Test metrics of the precision search of ``name`` at ``config`` with ``seed``."""
    def run():
        candidate = searched(profile, data, cache, name, trained, replace(config, seed=seed))
        return split_metrics(candidate.quantized, data, "test")
    return _cached(profile, f"{name}_pcptq", {"source": Path(trained.path).name, "config": config.details(),
                                              "seed": seed}, run)


def selected_search(folder: Path | str) -> SearchConfig | None:
    """The search settings of a saved ``*_pcptq`` artifact; ``None`` when its policy was not searched."""
    details = read_json(Path(folder) / "quantization.json")
    if "search" not in details:
        return None
    search = dict(details["search"])
    search["bits"] = tuple(search["bits"])
    return SearchConfig(**search)
