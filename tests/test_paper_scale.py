"""Notebook 11's library (compactnlu.paper_scale) on a tiny shape: the policy mapped by depth,
the table (every variant, ratios from its own fp32 row, sizes in the expected order), the bars,
a failing method recorded instead of raised. No assertion depends on a time's value."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from compactnlu import paper, paper_scale as ps, variants
from compactnlu.artifacts import with_checksums
from compactnlu.config import load_profile
from compactnlu.paper_scale.build import fp32_build
from compactnlu.quant import FORMAT_VERSION, precision_groups

TINY = ps.Shape(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64)
VARIANTS = ["fp32", "baseline_static", "baseline_dynamic", "kd_pcptq", "kd_pcptq_fast", "kd_pcptq_onnx", "uniform8",
            "uniform8_fast", "uniform4", "uniform4_fast", "kd_onnx_int8"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The measurement sets torch's thread count (2, as the notebook); other tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """The smoke profile with an empty artifacts folder: no study data, no registered variant."""
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "artifacts"))
    return load_profile("smoke")


# ---------------------------------------------------------------- the policy

def test_a_two_layer_policy_maps_onto_six_layers_by_relative_depth():
    policy = {"layer0.attention": 4, "layer1.attention": 8, "layer0.mlp": 16, "layer1.mlp": 4,
              "head.id": 16, "head.dc": 8, "head.sf": 4, "embedding": 8}
    mapped = ps.map_policy(policy, 6)
    # target layer l takes study layer floor(l * 2 / 6): 0, 0, 0, 1, 1, 1
    assert [mapped[f"layer{l}.attention"] for l in range(6)] == [4, 4, 4, 8, 8, 8]
    assert [mapped[f"layer{l}.mlp"] for l in range(6)] == [16, 16, 16, 4, 4, 4]
    assert {g: mapped[g] for g in ("head.id", "head.dc", "head.sf", "embedding")} == \
        {"head.id": 16, "head.dc": 8, "head.sf": 4, "embedding": 8}
    assert len(mapped) == 6 * 2 + 4
    # the names are the deeper model's precision groups
    six = ps.build_model(ps.Shape(1000, 32, 6, 2, 64, 64))
    assert set(mapped) == set(precision_groups(six, per_layer=True, embedding=True))


def test_the_paper_rule_floor_l_times_study_layers_over_12():
    policy = {f"layer{i}.mlp": i for i in range(2, 5)} | {"layer0.mlp": 2, "layer1.mlp": 3}  # 5 study layers
    mapped = ps.map_policy(policy, 12)
    assert [mapped[f"layer{l}.mlp"] for l in range(12)] == [policy[f"layer{l * 5 // 12}.mlp"] for l in range(12)]


def test_groups_that_are_not_per_layer_keep_their_names():
    shared = {"attention": 8, "mlp": 4, "head.id": 16}
    assert ps.map_policy(shared, 12) == shared


def test_the_stated_default_stands_in_when_notebook_07_has_not_run(profile):
    chosen = ps.study_policy(profile)
    assert chosen.config.policy == ps.DEFAULT_POLICY and chosen.source.startswith("stated default")
    assert chosen.config.per_layer and chosen.config.embedding
    assert ps.mapped(chosen.config, 12).policy == ps.map_policy(ps.DEFAULT_POLICY, 12)


def test_the_registered_kd_pcptq_policy_is_read(profile, tmp_path):
    folder = tmp_path / "kd_pcptq-artifact"
    folder.mkdir()
    policy = {"layer0.attention": 8, "layer0.mlp": 4, "head.id": 16, "head.dc": 16, "head.sf": 8, "embedding": 4}
    record = {"format_version": FORMAT_VERSION, "method": "precision", "policy": policy, "per_layer": True,
              "embedding": True, "per_channel": True}
    (folder / "quantization.json").write_text(json.dumps(with_checksums(record, folder, [])))  # sealed, as saved
    variants.register(profile, "kd_pcptq", folder)
    chosen = ps.study_policy(profile)
    assert chosen.config.policy == policy and "notebook 07" in chosen.source


# ---------------------------------------------------------------- shape and inputs

def test_the_shape_follows_the_profile():
    assert ps.paper_shape(load_profile("default")) == ps.XLMR_BASE
    assert ps.paper_shape(load_profile("paper")) == ps.XLMR_BASE
    assert ps.paper_shape(load_profile("smoke")) == ps.SMOKE_SHAPE
    config = ps.paper_config(ps.XLMR_BASE)
    assert (config.encoder["vocab_size"], config.encoder["hidden_size"], config.encoder["num_hidden_layers"],
            config.encoder["num_attention_heads"], config.encoder["intermediate_size"],
            config.encoder["max_position_embeddings"]) == (250_002, 768, 12, 12, 3072, 514)
    assert (config.n_intents, config.n_domains, len(config.tags)) == (60, 18, 111)


def test_random_batches_are_seeded_and_framed_by_bos_and_eos():
    a, b = ps.random_batch(TINY, 4, 10, seed=3), ps.random_batch(TINY, 4, 10, seed=3)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].shape == (4, 10) and (a["input_ids"][:, 0] == 0).all() and (a["input_ids"][:, -1] == 2).all()
    assert int(a["word_mask"].sum()) == 4 * 8 and bool(a["attention_mask"].all())
    with pytest.raises(ValueError):
        ps.random_batch(TINY, 1, TINY.max_positions, seed=0)


# ---------------------------------------------------------------- the whole measurement, tiny

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_scale")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPACTNLU_ARTIFACTS", str(root / "artifacts"))
        profile = load_profile("smoke")
        artifacts = profile.artifacts_dir
        settings = ps.Settings(shape=TINY, repeats=1, singles=1, calibration_batches=1, threads=1)
        threads = torch.get_num_threads()
        try:
            result = ps.measure(profile, settings, kernel_cache=root / "kernels.json", log=lambda msg: None)
        finally:
            torch.set_num_threads(threads)
    return result, artifacts


def test_the_table_has_every_variant_and_none_failed(measured):
    result, _ = measured
    table = result.table
    assert list(table.variant) == VARIANTS
    # the study's names, with the study's methods
    for row in table[table.variant.isin(variants.ORDER)].itertuples():
        assert row.method == variants.lookup(row.variant).method, row.variant
    assert not table.note.str.startswith("failed").any(), table.note.tolist()
    assert table[["size_mb", "time_b32_s", "time_b1_ms"]].notna().all().all()
    assert table.set_index("variant").kernels["kd_pcptq_fast"].startswith("fast: ")


def test_ratios_come_from_the_tables_own_fp32_row(measured):
    t = measured[0].table.set_index("variant")
    fp32 = t.loc["fp32"]
    pd.testing.assert_series_equal(t.size_vs_fp32, t.size_mb / fp32.size_mb, check_names=False)
    pd.testing.assert_series_equal(t.time_b32_vs_fp32, t.time_b32_s / fp32.time_b32_s, check_names=False)
    pd.testing.assert_series_equal(t.time_b1_vs_fp32, t.time_b1_ms / fp32.time_b1_ms, check_names=False)
    assert fp32.size_vs_fp32 == fp32.time_b32_vs_fp32 == fp32.time_b1_vs_fp32 == 1.0


def test_the_papers_ratios_stand_beside_their_counterparts(measured):
    t = measured[0].table.set_index("variant")
    theirs = paper.TABLE2.set_index("variant")
    for ours, counterpart in (("fp32", "baseline"), ("baseline_static", "baseline_static"),
                              ("baseline_dynamic", "baseline_dynamic"), ("kd_pcptq", "kd_pcptq"),
                              ("kd_pcptq_fast", "kd_pcptq"), ("kd_pcptq_onnx", "kd_pcptq")):
        assert t.paper_size_vs_baseline[ours] == pytest.approx(theirs.size_mb[counterpart] / theirs.size_mb["baseline"])
        assert t.paper_time_vs_baseline[ours] == pytest.approx(
            theirs.inference_s[counterpart] / theirs.inference_s["baseline"])
    assert t.paper_size_vs_baseline[["uniform8", "uniform4", "kd_onnx_int8"]].isna().all()


def test_sizes_are_ordered_as_the_bits_say(measured):
    size = measured[0].table.set_index("variant").size_mb
    assert size["uniform4"] < size["uniform8"] < size["fp32"]
    assert size["baseline_dynamic"] < size["fp32"]
    for path in ("kd_pcptq", "uniform8", "uniform4"):  # the fast path runs the same stored artifact
        assert size[f"{path}_fast"] == size[path]


def test_the_bars_follow_their_measured_ratios(measured):
    result, _ = measured
    bars, t = result.bars, result.table.set_index("variant")
    assert len(bars) == 5 and bars.met.map(type).eq(bool).all()
    assert (bars.met == (bars.measured <= bars.threshold.str.removeprefix("<= ").astype(float))).all()
    size = bars.set_index("bar").loc["kd_pcptq size vs fp32"]
    assert size.measured == pytest.approx(t.size_mb["kd_pcptq"] / t.size_mb["fp32"])
    b32 = bars.set_index("bar").loc["kd_pcptq time vs fp32 (batch 32)"]
    assert b32.path in ps.KD_PCPTQ_PATHS == ("kd_pcptq", "kd_pcptq_fast", "kd_pcptq_onnx")
    assert b32.measured == pytest.approx(t.time_b32_s[list(ps.KD_PCPTQ_PATHS)].min() / t.time_b32_s["fp32"])
    ort = bars.set_index("bar").loc["kd_pcptq time vs ONNX Runtime int8 (batch 1)"]
    assert ort.measured == pytest.approx(t.time_b1_ms[list(ps.KD_PCPTQ_PATHS)].min() / t.time_b1_ms["kd_onnx_int8"])
    assert bars.cpu.nunique() == 1 and bars.cpu.iloc[0]


def test_temporary_folders_are_deleted_and_the_environment_is_named(measured):
    result, artifacts = measured
    scratch = artifacts / "paper_scale"
    assert artifacts.is_dir() and not scratch.exists()  # each variant's folder, then their root, removed
    env = result.environment.set_index("item").value
    assert env["cpu"] and "torch_threads" in env and env["parameters"] == str(sum(
        p.numel() for p in ps.build_model(TINY).parameters()))


def test_a_method_that_fails_is_a_note_not_a_crash(tmp_path):
    inputs = ps.make_inputs(ps.Settings(shape=TINY, repeats=1, singles=1, calibration_batches=1), 8, "test")
    builder = ps.Builder(tmp_path / "scratch", inputs, log=lambda msg: None)
    model = ps.build_model(TINY)
    builder.add(ps.Variant("fp32", "fp32", "torch float"), fp32_build(model))

    def broken(folder):
        raise MemoryError("too big at this scale")

    failed = builder.add(ps.Variant("kd_onnx_int8", "onnxruntime_dynamic", "ONNX Runtime"), broken)
    assert failed.model is None and failed.note.startswith("failed: MemoryError: too big at this scale")
    skipped = builder.same_artifact(ps.Variant("kd_onnx_int8_fast", "x", "fast path"), "kd_onnx_int8",
                                    lambda m: (m, ""))
    assert skipped.note.startswith("skipped")
    timing = ps.time_variants(builder.variants, inputs, ps.Settings(shape=TINY, repeats=1, singles=1, threads=1))
    table = ps.results_table(builder.variants, timing)
    row = table.set_index("variant").loc["kd_onnx_int8"]
    assert math.isnan(row.size_mb) and math.isnan(row.time_b32_s) and row.note.startswith("failed")
    assert not any((tmp_path / "scratch").iterdir())
