"""The committed default-profile tables (``figures/tables``) agree with each other, with the variant
table and with the profile: each ``met`` is its comparison, each mean is over the profile's training
seeds, each variant's rows are where the table's order puts them."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from compactnlu import variants
from compactnlu.config import ROOT, load_profile
from compactnlu.metrics import METRIC_COLUMNS
from compactnlu.study import holds

TABLES = ROOT / "figures" / "tables"
ROUNDED = 2e-4  # the tables hold 4 decimals: a difference of two rounded numbers is off by up to 1e-4
PROFILE = load_profile("default")


def read(name: str) -> pd.DataFrame:
    return pd.read_csv(TABLES / f"{name}.csv")


def seeds_of(variant: str) -> int:
    """How many training seeds a variant's numbers are over on the default profile."""
    return PROFILE.train_seeds if variant in variants.BY_NAME and variants.lookup(variant).replicated else 1


def test_met_columns_are_their_comparisons():
    table = read("paper_scale_bars")
    assert len(table) >= 3
    for row in table.itertuples():
        assert bool(row.met) == holds(row.measured, row.threshold), row.bar


def test_rows_follow_the_variant_table():
    for name in ("massive_single_test", "ptq_results", "train_seeds"):
        table = read(name)
        assert set(table.variant) <= set(variants.ORDER), name
        rank = table.variant.map(variants.ORDER.index)
        assert rank.is_monotonic_increasing, f"{name}.csv is not in the variant table's order"
    assert list(read("table2_variants").variant) == [*variants.benchmarked(), "classic"]
    assert list(dict.fromkeys(read("table3_languages").variant)) == variants.benchmarked()


def test_means_are_over_the_profiles_training_seeds():
    per_seed = read("train_seeds")
    for variant, rows in per_seed.groupby("variant"):
        assert sorted(rows.train_seed) == list(range(seeds_of(variant))), variant
    table2 = read("table2_variants").set_index("variant")
    for variant, row in table2.iterrows():
        assert row.n_seeds == seeds_of(variant), variant
        seeds = per_seed[per_seed.variant == variant]
        for metric in METRIC_COLUMNS:
            assert row[metric] == pytest.approx(seeds[metric].mean(), abs=ROUNDED), (variant, metric)
    table3 = read("table3_languages")
    assert (table3.n_seeds == table3.variant.map(seeds_of)).all()
    assert set(table3.locale) == set(PROFILE.locales)
    table4 = read("table4_significance")
    over_seeds = table4[table4.samples == "train_seeds"]
    assert len(over_seeds) and (over_seeds.n_a == over_seeds.a.map(seeds_of)).all()
    assert (over_seeds.n_b == over_seeds.b.map(seeds_of)).all()
    p = table4.p_value.dropna()
    assert len(p) and p.between(0, 1).all()


def test_sizes_and_ratios_agree():
    table2 = read("table2_variants").set_index("variant")
    ptq = read("ptq_results").set_index("variant")
    for variant in ptq.index:  # one artifact per variant: the same bytes in both tables
        assert table2.size_mb[variant] == pytest.approx(ptq.size_mb[variant], abs=ROUNDED)
    for variant in variants.benchmarked():
        model = variants.lookup(variant).model
        if variant != model:
            assert table2.size_mb[variant] < table2.size_mb[model], variant
    relative = read("table2_vs_paper").set_index("variant")
    for variant, row in relative.iterrows():
        assert row.size_vs_baseline == pytest.approx(table2.size_mb[variant] / table2.size_mb["baseline"], abs=ROUNDED)
        assert row.time_vs_baseline == pytest.approx(table2.inference_s[variant] / table2.inference_s["baseline"],
                                                     abs=ROUNDED)
        assert row.id_acc_diff == pytest.approx(table2.id_acc[variant] - table2.id_acc["baseline"], abs=ROUNDED)


def test_the_selected_policies_are_candidates_of_their_model():
    sweep = read("pcptq_sweep")
    for row in read("pcptq_selected").itertuples():
        assert ((sweep.model == row.model) & (sweep.policy == row.policy)).any(), row
    # the precision variant of each model is the selected candidate: the same test accuracy
    ptq = read("ptq_results").set_index("variant")
    for row in read("pcptq_selected").itertuples():
        (variant,) = variants.derived(row.model, method="precision", runtime="torch")
        chosen = sweep[(sweep.model == row.model) & (sweep.policy == row.policy)].iloc[0]
        assert ptq.id_acc[variant] == pytest.approx(chosen.id_acc, abs=ROUNDED)
        assert not math.isnan(chosen.dev_id_acc)
