"""Training seeds (``compactnlu.replicates``) on the smoke profile: two seeds give two different
fp32 models, their evaluations one table, and the table's mean and std come from both."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from compactnlu import variants
from compactnlu.metrics import METRIC_COLUMNS
from compactnlu.quant import PrecisionConfig
from compactnlu.replicates import (evaluated, locale_replicates, mean_std, ptq_replicate, replicate_name, seed_row,
                                   seeded)
from compactnlu.train import budget_row, model_dir, nlu_config, train_model
from test_train import artifacts, data, profile  # noqa: F401 (fixtures)


def test_seeded_profiles_and_names(profile):  # noqa: F811
    assert seeded(profile, 0) is profile
    assert seeded(profile, 2).train_seed == profile.train_seed + 2
    assert seeded(profile, 2).result_key != profile.result_key
    assert replicate_name("kd_static", 0) == "kd_static" and replicate_name("kd_static", 2) == "kd_static@seed2"


def test_two_training_seeds_give_two_models_and_one_table(profile, data, artifacts):  # noqa: F811
    runs = [train_model(seeded(profile, s), data, "baseline") for s in range(2)]
    assert runs[0].path != runs[1].path  # each seed is cached under a key of its own
    assert runs[1].path == model_dir(seeded(profile, 1), "baseline", nlu_config(profile, data))
    first, second = (r.model.state_dict() for r in runs)
    assert any(not torch.equal(first[k], second[k]) for k in first)

    evaluations = [evaluated(profile, data, replicate_name("baseline", s), lambda t=t: t.model)
                   for s, t in enumerate(runs)]
    per_seed = pd.DataFrame([seed_row("baseline", s, e) for s, e in enumerate(evaluations)])
    assert list(per_seed.train_seed) == [0, 1]
    assert {*METRIC_COLUMNS, "massive_intent_acc", "massive_slot_span_f1"} <= set(per_seed.columns)

    summary = mean_std(per_seed).set_index("variant").loc["baseline"]
    assert summary.n_seeds == 2
    for metric in METRIC_COLUMNS:
        assert summary[metric] == pytest.approx(per_seed[metric].mean())
        assert summary[f"{metric}_std"] == pytest.approx(per_seed[metric].std(ddof=1))
    assert any(summary[f"{m}_std"] > 0 for m in METRIC_COLUMNS)  # two different models, two results

    # a second call reads the saved predictions instead of evaluating again
    again = evaluated(profile, data, replicate_name("baseline", 1), lambda: pytest.fail("evaluated twice"))
    assert again.row() == evaluations[1].row()

    per_locale = locale_replicates(profile, data, ["baseline"], seeds=2)
    assert set(per_locale.train_seed) == {0, 1} and "all" not in set(per_locale.locale)
    table3 = mean_std(per_locale, by=["variant", "locale"])
    assert (table3.n_seeds == 2).all() and len(table3) == per_locale.locale.nunique()

    budget = budget_row("baseline", runs[0])
    assert budget["epochs"] == pytest.approx(profile.epochs) and budget["steps"] > 0
    assert math.isclose(budget["minutes"], runs[0].train_seconds / 60)


def test_mean_std_of_one_seed_has_no_std():
    table = mean_std(pd.DataFrame([{"variant": "classic", "train_seed": 0, "id_acc": 0.5}]))
    assert table.n_seeds.iloc[0] == 1 and math.isnan(table.id_acc_std.iloc[0])


def test_an_evaluation_without_the_single_test_saves_and_reloads(profile, data, artifacts):  # noqa: F811
    trained = train_model(profile, data, "baseline")
    first = evaluated(profile, data, "no_single", lambda: trained.model, single=False)
    assert first.single.empty
    again = evaluated(profile, data, "no_single", lambda: pytest.fail("evaluated twice"))
    assert again.single.empty and again.row() == first.row()

    # made with another policy (say, notebook 07 selected a new one): evaluated again, then kept
    calls = []
    evaluated(profile, data, "no_single", lambda: calls.append(1) or trained.model, single=False,
              made_with={"policy": "lambda=1"})
    evaluated(profile, data, "no_single", lambda: pytest.fail("evaluated twice"), made_with={"policy": "lambda=1"})
    assert calls == [1]
    row = seed_row("no_single", 0, again)
    assert math.isnan(row["massive_intent_acc"]) and not math.isnan(row["id_acc"])


def test_a_seeds_variants_are_made_as_their_rows_say(profile, data, artifacts):  # noqa: F811
    """Every variant of the baseline that the table replicates, for seed 1, by ``study.make`` (the
    precision variant by the choice recorded for it), named for the seed and never registered."""
    choice = PrecisionConfig(None, per_channel=True, per_layer=True, embedding=True, kind="uniform", bits=8)
    variants.choose(profile, "baseline_pcptq", choice)
    made = ptq_replicate(profile, data, 1, models=("baseline",))
    assert list(made) == variants.replicated("baseline")
    assert [e.row()["model"] for e in made.values()] == [replicate_name(v, 1) for v in made]
    assert not any("@" in name for name in variants.registered(profile))
