"""Table 2 is one library function (``compactnlu.table2.build_table2``): every benchmarked variant
in the table's order and the classic reference, each with its artifact's bytes, its timing, its
peak memory and its metrics over training seeds. Built here from stand-in rows and folders."""

from __future__ import annotations

import pandas as pd
import pytest

from compactnlu import classic, variants
from compactnlu.config import load_profile
from compactnlu.metrics import METRIC_COLUMNS
from compactnlu.table2 import COLUMNS, STD_COLUMNS, build_table2


@pytest.fixture
def profile(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "artifacts"))
    return load_profile("smoke")


def test_table2_joins_sizes_timing_memory_and_metrics(profile, tmp_path):
    names = variants.benchmarked()
    for i, name in enumerate(names):  # a stand-in artifact of (i + 1) kB per variant
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000 * (i + 1))
        variants.register(profile, name, folder)
    fitted = tmp_path / "classic"
    fitted.mkdir()
    for file in [*classic.FILES, classic.MANIFEST]:
        (fitted / file).write_bytes(b"y" * 500)
    everything = [*names, "classic"]
    over_seeds = pd.DataFrame([{"variant": v, **{m: 0.5 for m in METRIC_COLUMNS}, **{s: 0.01 for s in STD_COLUMNS},
                                "n_seeds": 1 if v == "classic" else 2} for v in reversed(everything)])
    timing = pd.DataFrame([{"variant": v, "inference_s": 1.0 + i, "inference_min_s": 0.9, "inference_max_s": 1.1,
                            "repeats": 2, "latency_p50_ms": 3.0, "latency_p95_ms": 4.0, "throughput": 100.0}
                           for i, v in enumerate(names)])
    classic_timing = timing.iloc[:1].assign(variant="classic", inference_s=0.5)
    memory = pd.DataFrame([{"variant": v, "load_mb": 1.0, "peak_mb": 10.0 + i} for i, v in enumerate(names)])

    table = build_table2(profile, over_seeds, timing, classic_timing, memory, fitted)
    assert list(table.columns) == COLUMNS and list(table.variant) == everything
    rows = table.set_index("variant")
    assert list(rows.size_mb[names]) == pytest.approx([0.001 * (i + 1) for i in range(len(names))])
    assert rows.size_mb["classic"] == pytest.approx(0.0015)
    assert rows.inference_s["classic"] == 0.5 and rows.inference_s[names[-1]] == len(names)
    assert pd.isna(rows.peak_mb["classic"]) and rows.peak_mb[names[0]] == 10.0  # classic: no memory probe
    assert rows.n_seeds["classic"] == 1 and (rows.n_seeds[names] == 2).all()
