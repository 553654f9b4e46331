"""The numbers each notebook's smoke run recorded (``compactnlu.notebook.record`` ->
``runs/smoke/records/<notebook>.json``), asserted within tolerances that run-to-run noise on the
smoke profile stays inside and a broken pipeline does not: accuracy well above chance, quantized
models near their fp32 model and smaller, every ``met`` equal to its comparison.

``make test`` runs this after nbval with ``COMPACTNLU_REQUIRE_RECORDS=1`` (a missing record fails);
alone, without a smoke run, it skips.

Which issue bars hold on smoke (its 30k-parameter encoder, 1 layer): notebook 07's accuracy bars
(``kd_pcptq`` within 1 point of ``kd`` on id_acc and sf_f1) hold and its size bar (<= 0.25x the
baseline) does not: the float LayerNorm, position embeddings and CRF weigh more at that size; notebook
11's size bar (<= 0.40x fp32) holds. The speed bars of notebooks 08 and 11 are timings of a few
milliseconds on a shared machine: only their ``met`` columns are checked, not their outcome.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from compactnlu import variants
from compactnlu.config import load_profile
from compactnlu.notebook import records_dir
from compactnlu.study import holds
from compactnlu.train import TEACHERS

SMOKE = load_profile("smoke")
REQUIRED = os.environ.get("COMPACTNLU_REQUIRE_RECORDS") == "1"
# Exact-set accuracy of 1-3 labels among ~10: chance is near 0; a model that learned gets far more.
ABOVE_CHANCE = {"id_acc": 0.25, "dc_acc": 0.25, "sf_f1": 0.5, "intent_acc": 0.5}
# Most a PTQ method may move a metric from its fp32 model on smoke (observed: up to 0.017).
PTQ_MOVE = 0.05


def record(notebook: str) -> dict:
    path = records_dir(SMOKE) / f"{notebook}.json"
    if not path.exists():
        if REQUIRED:
            pytest.fail(f"{path} is missing: notebook {notebook} did not record its results on the smoke run")
        pytest.skip(f"no smoke run recorded ({path}); make test runs the notebooks first")
    return json.loads(path.read_text(encoding="utf-8"))


def by(rows: list[dict], key: str = "variant") -> dict[str, dict]:
    return {row[key]: row for row in rows}


def above_chance(row: dict, label: str) -> None:
    for metric, floor in ABOVE_CHANCE.items():
        if metric in row and not math.isnan(row[metric]):
            assert row[metric] > floor, f"{label}: {metric} {row[metric]:.3f} is not above {floor}"


def check_bars(rows: list[dict]) -> dict[str, bool]:
    assert rows
    for row in rows:
        assert row["met"] == holds(row["measured"], row["threshold"]), row
    return {row["bar"]: row["met"] for row in rows}


def near_fp32(ptq: dict[str, dict], variant: str) -> None:
    fp32 = ptq[variants.lookup(variant).model]
    for metric in ("id_acc", "dc_acc", "sf_f1"):
        assert abs(ptq[variant][metric] - fp32[metric]) <= PTQ_MOVE, (variant, metric)
    assert ptq[variant]["size_mb"] < fp32["size_mb"], variant


def test_01_data():
    r = record("01_data")
    assert 2 <= r["n_intents"] <= 60 and 2 <= r["n_domains"] <= 18 and r["n_slot_types"] >= 1
    assert all(r["examples"][split] > 0 for split in ("train", "dev", "test", "test_single"))
    assert r["examples"]["train"] > r["examples"]["test"] and 0 <= r["truncated_share"] <= 0.05


def test_02_baseline():
    r = record("02_baseline")
    above_chance(r["composed"], "baseline")
    above_chance({"intent_acc": r["massive"]["intent_acc"], "sf_f1": r["massive"]["slot_span_f1"]}, "baseline MASSIVE")
    versus = by(r["versus"])
    assert versus["baseline"]["n_seeds"] == SMOKE.train_seeds and versus["classic"]["n_seeds"] == 1
    above_chance(versus["classic"], "classic")


def test_03_teachers():
    rows = by(record("03_teachers")["table1"], "model")
    assert set(rows) == set(TEACHERS)
    for name, tasks in TEACHERS.items():
        above_chance(rows[name], name)
        for task, metric in (("id", "id_acc"), ("dc", "dc_acc"), ("sf", "sf_f1")):
            assert math.isnan(rows[name][metric]) == (task not in tasks), (name, metric)


def test_04_distillation():
    r = record("04_distillation")
    above_chance(r["composed"], "kd")
    compare = by(r["compare"])
    assert compare["kd"]["n_seeds"] == compare["baseline"]["n_seeds"] == SMOKE.train_seeds
    assert all(compare[t]["n_seeds"] == 1 for t in TEACHERS)
    # equal budgets: three teachers and a student take four baselines' optimizer steps
    assert r["steps_vs_baseline"] == pytest.approx(4.0, abs=0.05)
    assert {row["config"] for row in r["ablation"]} == {"full", "mean_fusion", "no_mse_crd", "ce_only"}
    assert all(0 <= row[m] <= 1 for row in r["ablation"] for m in ("id_acc", "dc_acc", "sf_f1"))
    # the control at the main budget: paired by seed against the student and the baseline, six metrics each
    control = r["control"]
    assert {(row["a"], row["b"]) for row in control} == {("no_teachers", "kd"), ("baseline", "no_teachers")}
    assert len(control) == 12 and all(row["n_a"] == SMOKE.train_seeds for row in control)
    assert all(math.isnan(row["p_holm"]) or row["p_value"] <= row["p_holm"] <= 1 for row in control)


def test_05_static_ptq():
    r = record("05_static_ptq")
    ptq = by(r["ptq"])
    assert set(ptq) == {"baseline", "kd", *variants.made_by("05")}
    for variant in variants.made_by("05"):
        near_fp32(ptq, variant)
        model = variants.lookup(variant).model
        assert 0.3 < ptq[variant]["size_mb"] / ptq[model]["size_mb"] < 0.7  # int8 linears, 8-bit embedding
    # the sweep's largest N is the reported model's calibration: the same test numbers on the same sample
    for row in r["calibration"]:
        assert row["n_batches"] <= r["n_batches"] and 0 <= row["id_acc"] <= 1
    fp32 = by(r["fp32_sample"], "model")
    for row in r["calibration"]:
        assert abs(row["sf_f1"] - fp32[row["model"]]["sf_f1"]) <= PTQ_MOVE


def test_06_dynamic_ptq():
    r = record("06_dynamic_ptq")
    ptq = by(r["ptq"])
    for variant in variants.made_by("06"):
        near_fp32(ptq, variant)
        static = variants.derived(variants.lookup(variant).model, method="static")[0]
        assert ptq[variant]["size_mb"] < ptq[static]["size_mb"]  # no activation observers, int8 embedding
    for row in r["relative"]:
        assert 0 < row["size_vs_fp32"] <= 1 and abs(row["id_acc_change"]) <= PTQ_MOVE


def test_07_precision_ptq():
    r = record("07_precision_ptq")
    met = check_bars(r["bars"])
    assert set(met) == {"kd_pcptq size vs fp32 baseline", "kd_pcptq id_acc change vs fp32 kd",
                        "kd_pcptq sf_f1 change vs fp32 kd"}
    assert met["kd_pcptq size vs fp32 baseline"] is False  # 0.32 on smoke, far from 0.25
    # The accuracy bars sit within a test decision or two of their -0.01 threshold on smoke's 180
    # examples (sf_f1 -0.0123 on one AMD EPYC, above -0.01 on another), so only the smoke
    # tolerance is asserted; check_bars has checked each met against its measurement.
    measured = {b["bar"]: b["measured"] for b in r["bars"]}
    assert min(measured["kd_pcptq id_acc change vs fp32 kd"], measured["kd_pcptq sf_f1 change vs fp32 kd"]) \
        >= -METRIC_TOLERANCE
    ptq = by(r["ptq"])
    for variant in variants.made_by("07"):
        if variant in ptq:
            near_fp32(ptq, variant)
            assert ptq[variant]["size_mb"] / ptq[variants.lookup(variant).model]["size_mb"] < 0.5
    sweep = r["sweep"]
    for name, policy in r["selected"].items():  # the chosen policy is one of the model's candidates
        assert any(row["model"] == name and row["policy"] == policy for row in sweep)
    assert abs(r["fast"]["id_acc"] - ptq["kd_pcptq"]["id_acc"]) <= 0.02
    # the integer kernels agree with the paper path; int_mm and dequant compute its arithmetic, but
    # a float sum in another order can move an activation across a rounding step of the next
    # layer on another CPU, so "the same decisions" is asked to hold for 98% of examples, not all
    for kernel, agreement in r["agreement"].items():
        assert min(agreement[f"same_{t}"] for t in ("id", "dc", "sf")) >= (0.98 if kernel in ("int_mm", "dequant")
                                                                          else 0.9), kernel


def test_08_benchmark():
    r = record("08_benchmark")
    check_bars(r["bars"])
    table2 = by(r["table2"])
    assert list(table2) == [*variants.benchmarked(), "classic"]
    for name, row in table2.items():
        replicated = name in variants.BY_NAME and variants.lookup(name).replicated
        assert row["n_seeds"] == (r["train_seeds"] if replicated else 1), name
        assert row["inference_s"] > 0 and row["size_mb"] > 0
    for variant in variants.benchmarked():
        model = variants.lookup(variant).model
        if variant != model:
            assert table2[variant]["size_mb"] < table2[model]["size_mb"], variant
            assert abs(table2[variant]["id_acc"] - table2[model]["id_acc"]) <= PTQ_MOVE, variant
    assert r["nbits_agreement"]["same_id"] >= 0.9
    assert 0 < r["matmul_floor"] < 2  # a timed ratio: only that it was measured and is sane


def test_09_per_language():
    r = record("09_per_language")
    assert r["variants"] == variants.benchmarked() and sorted(r["task_order"]) == ["dc", "id", "sf"]
    assert {row["locale"] for row in r["table3"]} == set(SMOKE.locales)
    for row in r["table3"]:
        replicated = variants.lookup(row["variant"]).replicated
        assert row["n_seeds"] == (SMOKE.train_seeds if replicated else 1)
        assert 0 <= row["id_acc"] <= 1


def test_10_significance():
    r = record("10_significance")
    rows = r["table4"]
    assert rows and all(math.isnan(row["p_value"]) or 0 <= row["p_value"] <= 1 for row in rows)
    over_seeds = [row for row in rows if row["samples"] == "train_seeds"]
    assert over_seeds and all(row["n_a"] == row["n_b"] == r["train_seeds"] for row in over_seeds)
    for row in rows:
        if not math.isnan(row["diff"]):
            assert row["diff"] == pytest.approx(row["b_mean"] - row["a_mean"], abs=1e-9)


def test_11_paper_scale():
    r = record("11_paper_scale")
    met = check_bars(r["bars"])
    assert met["kd_pcptq size vs fp32"] is True
    sizes = {row["variant"]: row["size_mb"] for row in r["table"] if not math.isnan(row["size_mb"])}
    assert sizes["fp32"] == max(sizes.values()) and r["n_parameters"] > 0


# ---------------------------------------------------------------- the smoke run's numbers, pinned
# Floors catch a broken pipeline; these catch a drift. tests/smoke_pinned.json holds the values of
# one smoke run (AMD EPYC, AVX-512 + VNNI); smoke is deterministic on one machine, and on another
# CPU float sums in another order may flip a few of the 180 test decisions (0.05 = 9 of them).
# Per-locale rows (30 examples each) and timings are left out. After an intended change:
# `python tests/test_notebook_results.py --pin` rewrites the file from runs/smoke/records/.
PINNED = Path(__file__).with_name("smoke_pinned.json")
METRIC_TOLERANCE = 0.05
METRICS = {"id_acc", "dc_acc", "sf_f1", "id_f1", "dc_f1", "sf_acc", "intent_acc", "slot_span_f1",
           "massive_intent_acc", "massive_slot_span_f1", "dev_id_acc", "dev_sf_f1"}
COUNTS = {"n_records", "n_intents", "n_domains", "n_slot_types", "train", "dev", "test", "test_single",
          "n_seeds", "n_parameters"}
PINNED_NOTEBOOKS = ("01_data", "02_baseline", "03_teachers", "04_distillation", "05_static_ptq",
                    "06_dynamic_ptq", "08_benchmark", "11_paper_scale")


def pinned_values(records: dict[str, dict]) -> dict[str, float]:
    """``notebook/path/to/key`` -> value for the metrics and counts of ``records`` (no per-locale rows)."""
    out = {}

    def walk(value, path):
        if isinstance(value, dict):
            if "locale" in value:
                return
            for key, inner in value.items():
                walk(inner, f"{path}/{key}")
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                name = next((inner[k] for k in ("variant", "model", "bar") if isinstance(inner, dict) and k in inner), i)
                walk(inner, f"{path}/{name}")
        elif path.rpartition("/")[2] in METRICS | COUNTS and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = value
    for notebook, content in records.items():
        walk(content, notebook)
    return out


def test_smoke_numbers_stay_near_the_pinned_run():
    pinned = json.loads(PINNED.read_text(encoding="utf-8"))
    now = pinned_values({n: record(n) for n in PINNED_NOTEBOOKS})
    assert set(now) == set(pinned), "the recorded numbers changed shape; re-pin after an intended change"
    drift = {k: (pinned[k], v) for k, v in now.items() if
             (abs(v - pinned[k]) > METRIC_TOLERANCE if k.rpartition("/")[2] in METRICS else v != pinned[k])
             and not (math.isnan(v) and math.isnan(pinned[k]))}
    assert drift == {}


def test_the_pin_keeps_metrics_and_counts_and_leaves_out_per_locale_rows():
    fake = {"02_baseline": {"composed": {"id_acc": 0.5, "n_seeds": 2}, "by": [{"locale": "hi-IN", "id_acc": 0.1}]}}
    assert pinned_values(fake) == {"02_baseline/composed/id_acc": 0.5, "02_baseline/composed/n_seeds": 2}


if __name__ == "__main__" and sys.argv[1:] == ["--pin"]:
    values = pinned_values({n: json.loads((records_dir(SMOKE) / f"{n}.json").read_text(encoding="utf-8"))
                            for n in PINNED_NOTEBOOKS})
    PINNED.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"pinned {len(values)} values in {PINNED}")
