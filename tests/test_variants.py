"""The variant table (``compactnlu.variants``) is the one place that says what a variant is; the
PTQ stage notebooks 05-07 share (``compactnlu.study.ptq_stage``) registers, evaluates and tabulates."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from compactnlu import variants
from compactnlu.artifacts import upsert_rows
from compactnlu.config import ROOT, load_profile
from compactnlu.quant import METHODS
from compactnlu.evaluation import evaluate_variant
from compactnlu.study import bars, dynamic_quantizer, holds, ptq_stage
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


def test_each_variant_is_registered_by_the_notebook_that_makes_it():
    """The notebook the table names registers the variant (so ``predict(variant=...)`` works once it
    has run), and no notebook lists variants or reads a variant's meaning from its name."""
    for notebook in NOTEBOOKS:
        code = code_of(notebook)
        for name in variants.made_by(notebook.name):
            if name == "classic":  # not a registered artifact: train_classic reloads it
                continue
            literal = re.search(rf'register\(P, "{name}"', code)
            looped = name in TEACHERS and "register(P, name, teachers[name].path)" in code
            by_stage = re.search(rf'ptq_stage\(P, data, models, "{variants.lookup(name).method}"', code)
            assert literal or looped or by_stage, f"{notebook.name} makes {name} but does not register it"
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


def test_ptq_stage_registers_evaluates_and_tabulates(profile, data):  # noqa: F811
    trained = train_model(profile, data, "baseline")
    variants.register(profile, "baseline", trained.path)
    evaluate_variant(trained.model, data, profile, "baseline")
    table, evaluations = ptq_stage(profile, data, {"baseline": trained}, "dynamic", dynamic_quantizer(profile))
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


def test_every_quantized_variant_names_a_registered_method():
    quantized = {v.method for v in variants.VARIANTS} - {"fp32", "classic"}
    assert quantized and quantized <= set(METHODS)


def test_the_classic_reference_is_named_as_not_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    with pytest.raises(KeyError, match="not loadable by name"):
        variants.folder_of(load_profile("smoke"), "classic")
