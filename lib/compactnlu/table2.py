"""The paper's Table 2 for this study (notebook 08): every benchmarked variant and the classic
reference, with bytes on disk, time, peak memory and the six metrics over training seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import variants
from .bench import artifact_size_mb
from .classic import size_bytes as classic_size_bytes
from .config import Profile
from .metrics import METRIC_COLUMNS

STD_COLUMNS = [f"{m}_std" for m in METRIC_COLUMNS]
COLUMNS = ["variant", "size_mb", "inference_s", *METRIC_COLUMNS, "latency_p50_ms", "latency_p95_ms", "throughput",
           "peak_mb", "inference_min_s", "inference_max_s", "repeats", *STD_COLUMNS, "n_seeds"]


def build_table2(profile: Profile, over_seeds: pd.DataFrame, timing: pd.DataFrame, classic_timing: pd.DataFrame,
                 memory: pd.DataFrame, classic_folder: Path | str) -> pd.DataFrame:
    """One row per variant of ``variants.benchmarked()``, then ``classic``: its registered artifact's
    bytes on disk (the classic reference's saved files), its timing (``bench.summarise``'s rows:
    ``timing`` and ``classic_timing``), its peak memory (``bench.peak_memory_mb``'s rows) and the
    metrics' mean and std over training seeds (``replicates.mean_std``'s rows, ``over_seeds``)."""
    names = variants.benchmarked()
    sizes = {**{v: artifact_size_mb(variants.folder_of(profile, v)) for v in names},
             "classic": classic_size_bytes(classic_folder) / 1e6}
    accuracy = over_seeds.set_index("variant").loc[[*names, "classic"], [*METRIC_COLUMNS, *STD_COLUMNS, "n_seeds"]]
    table = (accuracy.assign(size_mb=pd.Series(sizes)).rename_axis("variant").reset_index()
             .merge(pd.concat([timing, classic_timing], ignore_index=True), on="variant", how="left")
             .merge(memory[["variant", "peak_mb"]], on="variant", how="left"))
    return table[COLUMNS]
