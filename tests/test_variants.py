"""The variant table (``compactnlu.variants``) is the one place that says what a variant is, its
method's settings included; ``compactnlu.study.make`` makes any variant from its row (built, saved,
registered, evaluated), and the PTQ stage notebooks 05-07 share (``study.ptq_stage``) tabulates."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from compactnlu import study, variants
from compactnlu.artifacts import upsert_rows
from compactnlu.config import ROOT, load_profile
from compactnlu.quant import METHODS, DynamicConfig, OnnxInt8Config, PrecisionConfig, StaticConfig, read_config
from compactnlu.quant.onnx_int8 import reduce_range_for_cpu
from compactnlu.evaluation import evaluate_variant, predictions_dir
from compactnlu.study import bars, holds, ptq_stage
from compactnlu.train import TEACHERS, train_model
from test_train import artifacts, data, profile  # noqa: F401 (fixtures)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_of(notebook) -> str:
    """The notebook's code after its ``parameters`` cell (where a reader may choose variants)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells
                     if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", []))


def test_the_table_is_consistent():
    table = variants.table()
    assert table.name.is_unique and list(table.name) == variants.ORDER
    for v in variants.VARIANTS:
        # what a variant is derived from is in the table, and its fp32 model is at the end of that chain
        chain = variants.lineage(v.name)
        assert all(name in variants.BY_NAME for name in chain)
        assert variants.lookup(chain[-1]).method in ("fp32", "classic") and chain[-1] == v.model
        assert (v.derived_from is None) == (v.method in ("fp32", "classic"))
        assert v.runtime in (*variants.RUNTIMES, "sklearn") and re.fullmatch(r"\d\d", v.notebook)
        # a variant is made no earlier than what it is derived from
        assert v.derived_from is None or variants.lookup(v.derived_from).notebook <= v.notebook
    assert set(TEACHERS) == set(variants.made_by("03"))


def test_queries_read_the_table():
    assert variants.made_by("05_static_ptq") == ["baseline_static", "kd_static"]
    assert variants.derived("kd_pcptq", include_self=True) == ["kd_pcptq", "kd_pcptq_fast", "kd_pcptq_onnx"]
    assert variants.derived("kd", method="precision", runtime="torch") == ["kd_pcptq"]
    assert "baseline_static" not in variants.derived("kd")
    assert variants.replicated("baseline") == ["baseline", "baseline_static", "baseline_dynamic", "baseline_pcptq"]
    # the benchmark's order: each trained model, then what is made from it (the order of Tables 2 and 3)
    assert variants.benchmarked() == ["baseline", "baseline_static", "baseline_dynamic", "baseline_pcptq", "kd",
                                      "kd_static", "kd_dynamic", "kd_pcptq", "kd_pcptq_fast", "kd_pcptq_onnx",
                                      "kd_onnx_int8"]
    assert variants.benchmarked(methods=("fp32", "dynamic")) == ["baseline", "baseline_dynamic", "kd", "kd_dynamic"]
    with pytest.raises(KeyError, match="not a variant"):
        variants.lookup("kd_int3")


def test_each_variant_is_made_by_the_notebook_the_table_names():
    """The notebook the table names makes the variant (``study.make``, which registers it, so
    ``predict(variant=...)`` works once it has run), and no notebook lists variants or reads a
    variant's meaning from its name."""
    for notebook in NOTEBOOKS:
        code = code_of(notebook)
        for name in variants.made_by(notebook.name):
            if name == "classic":  # not a registered artifact: train_classic reloads it
                continue
            made = re.search(rf'make\(P, data, "{name}"', code)
            by_stage = re.search(rf'ptq_stage\(P, data, "{variants.lookup(name).method}"', code)
            trained = re.search(rf'fp32\(P, data, "{name}"', code)  # notebooks 02 and 04's fp32 models
            looped = name in TEACHERS and "fp32(P, data, name" in code  # notebook 03's teachers
            assert made or by_stage or trained or looped, f"{notebook.name} makes {name} but does not register it"
        assert not re.search(r'\.split\("_"\)', code), f"{notebook.name} reads a variant from its name"
        assert not re.search(r'\[\s*"baseline",\s*"(baseline|kd)_', code), f"{notebook.name} lists variants"


def test_register_refuses_what_the_table_does_not_know(profile):  # noqa: F811
    with pytest.raises(ValueError, match="not in the variant table"):
        variants.register(profile, "kd_int3", ROOT)
    with pytest.raises(ValueError, match="runtime"):
        variants.register(profile, "kd", ROOT, runtime="gpu")
    with pytest.raises(KeyError, match="run notebook 08 first"):
        variants.folder_of(profile, "kd_onnx_int8")


def test_upsert_keeps_the_table_order(tmp_path):
    path = tmp_path / "t.csv"
    upsert_rows(path, pd.DataFrame({"variant": ["kd_static", "classic", "extra"], "x": [1, 2, 3]}), ["variant"])
    table = variants.upsert_rows(path, pd.DataFrame({"variant": ["baseline", "kd_static"], "x": [4, 5]}), ["variant"])
    assert list(table.variant) == ["baseline", "kd_static", "classic", "extra"] and list(table.x) == [4, 5, 2, 3]


def test_bars_recompute_met():
    table = bars([("size", 0.32, "<= 0.25"), ("accuracy", -0.005, ">= -0.01"), ("edge", 0.5, "<= 0.5")])
    assert list(table.met) == [False, True, True]
    assert holds(0.7, "< 0.7") is False and holds(1.1, "> 1.0") is True


def test_each_row_says_its_settings(profile):  # noqa: F811
    assert variants.config_of(profile, "kd_static") == variants.STATIC == StaticConfig(n_batches=256)
    assert variants.config_of(profile, "baseline_dynamic") == DynamicConfig()
    assert variants.config_of(profile, "kd_onnx_int8") == OnnxInt8Config(reduce_range=reduce_range_for_cpu())
    assert variants.config_of(profile, "kd") is None and variants.config_of(profile, "classic") is None
    with pytest.raises(KeyError, match="no settings chosen .* run notebook 07 first"):
        variants.config_of(profile, "kd_pcptq")
    choice = PrecisionConfig(None, True, True, True, kind="uniform", bits=8)
    variants.choose(profile, "kd_pcptq", choice)
    assert variants.config_of(profile, "kd_pcptq") == choice
    assert variants.config_of(profile, "kd_pcptq_fast") == choice  # a run-time path of kd_pcptq's artifact
    with pytest.raises(ValueError, match="settings in the variant table"):
        variants.choose(profile, "kd_static", StaticConfig(n_batches=4))
    with pytest.raises(ValueError, match="takes a PrecisionConfig, not a StaticConfig"):
        variants.choose(profile, "baseline_pcptq", StaticConfig(n_batches=4))
    assert variants.table().set_index("name").config["kd_static"] == repr(variants.STATIC)


def test_ptq_stage_makes_registers_evaluates_and_tabulates(profile, data):  # noqa: F811
    trained = train_model(profile, data, "baseline")
    variants.register(profile, "baseline", trained.path)
    evaluate_variant(trained.model, data, profile, "baseline")
    table, evaluations = ptq_stage(profile, data, "dynamic", models=("baseline",))
    assert list(evaluations) == ["baseline_dynamic"]
    assert variants.registered(profile)["baseline_dynamic"]["runtime"] == "torch"
    rows = table.set_index("variant")
    assert {"baseline", "baseline_dynamic"} <= set(rows.index)
    assert rows.size_mb["baseline_dynamic"] < rows.size_mb["baseline"]
    assert rows.id_acc["baseline_dynamic"] == pytest.approx(evaluations["baseline_dynamic"].row()["id_acc"])
    single = pd.read_csv(profile.tables_dir / "massive_single_test.csv")
    assert set(single[single.variant == "baseline_dynamic"].locale) >= {"all"}
    loaded = variants.load(profile, "baseline_dynamic")  # what was registered loads back by name
    assert loaded.tasks == trained.model.tasks
    assert read_config(variants.folder_of(profile, "baseline_dynamic")) == DynamicConfig()


def test_make_builds_any_seed_and_registers_seed_0_only(profile, data, monkeypatch):  # noqa: F811
    static = study.make(profile, data, "baseline_static")
    folder = variants.folder_of(profile, "baseline_static")
    available = -(-len(data.features["train"]) // profile.batch_size)
    assert read_config(folder) == StaticConfig(n_batches=min(256, available))  # what it was calibrated on
    assert static.row()["model"] == "baseline_static" and not static.single.empty

    seed1 = study.make(profile, data, "baseline_static", seed=1, reuse=True)
    assert seed1.row()["model"] == "baseline_static@seed1" and seed1.single.empty  # no single test for PTQ seeds
    assert set(variants.registered(profile)) >= {"baseline", "baseline_static"}
    assert not any("@" in name for name in variants.registered(profile))
    assert (predictions_dir(profile, "baseline_static@seed1") / study.MADE_WITH).exists()
    monkeypatch.setattr(study, "build", lambda *args: pytest.fail("made again"))
    assert study.make(profile, data, "baseline_static", seed=1, reuse=True).row() == seed1.row()


def test_every_quantized_variant_names_a_registered_method():
    quantized = {v.method for v in variants.VARIANTS} - {"fp32", "classic"}
    assert quantized and quantized <= set(METHODS)


def test_the_classic_reference_is_named_as_not_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    with pytest.raises(KeyError, match="not loadable by name"):
        variants.folder_of(load_profile("smoke"), "classic")
