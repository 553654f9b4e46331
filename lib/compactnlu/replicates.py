"""The study over training seeds: every fp32 model trained once per seed, every PTQ method applied to each.

Seed ``s`` trains with ``train_seed + s`` (:func:`seeded`), so its models have cache keys of their
own; its variants are named ``baseline@seed1``, ``kd_static@seed2``, ... (:func:`replicate_name`;
seed 0 keeps the plain names that notebooks 02-08 produce). Each replicate is evaluated by
``evaluation.evaluate_variant`` once and reloaded from its saved predictions afterwards, so Table 2,
Table 3 and the over-seed tests of Table 4 all read the same numbers.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from . import pcptq, variants
from .artifacts import read_json, write_json
from .evaluation import Evaluation, evaluate_variant, load_evaluation, predictions_dir
from .metrics import METRIC_COLUMNS, by_locale, load_predictions
from .quant import calibration_batches, quantize_dynamic, quantize_static
from .quant.search import SearchConfig
from .train import collator_for

# The MASSIVE single-utterance measures kept per seed: mean of the six locales.
SINGLE_COLUMNS = ["intent_acc", "slot_span_f1", "exact_match"]
MADE_WITH = "made_with.json"  # beside a replicate's predictions: what its model was made with


def seeded(profile, s: int):
    """The profile of training seed ``s`` (0: the profile itself)."""
    return profile if s == 0 else replace(profile, train_seed=profile.train_seed + s)


def replicate_name(variant: str, s: int) -> str:
    return variant if s == 0 else f"{variant}@seed{s}"


def evaluated(profile, data, variant: str, make_model, single: bool = True, made_with: dict | None = None
              ) -> Evaluation:
    """``variant``'s saved evaluation, or ``make_model()`` evaluated (and saved) now; ``single``: on
    MASSIVE's single-utterance test too. ``made_with``: what the model is made with beyond the
    profile (the PC-PTQ policy notebook 07 selected, static PTQ's calibration batches), saved
    beside the predictions (``MADE_WITH``); a saved evaluation of a model made otherwise is
    evaluated again, so a new selection never leaves seeds 1-2 on the old policy's predictions."""
    folder, made_with = predictions_dir(profile, variant), made_with or {}
    saved = read_json(folder / MADE_WITH) if (folder / MADE_WITH).exists() else {}
    if (folder / "summary.json").exists() and saved == made_with:
        return load_evaluation(profile, data, variant)
    evaluation = evaluate_variant(make_model(), data, profile, variant, single=single)
    write_json(folder / MADE_WITH, made_with)
    return evaluation


def static_ptq(profile, data, model, n_batches: int):
    """``model`` statically quantized on the first ``n_batches`` of the profile's seeded training
    batches: ``(quantized, batches used)``."""
    batches = calibration_batches(data, collator_for(data), profile.batch_size, profile.seed)
    return quantize_static(model, batches, n_batches)


def ptq_replicate(profile, data, s: int, fp32: dict, cache, policies: dict[str, str], n_batches: int,
                  config: SearchConfig) -> dict[str, Evaluation]:
    """Seed ``s``'s fp32 models (``{"baseline": trained, "kd": trained}``) and the variants the table
    makes of them on every training seed (static, dynamic, precision-controlled), each evaluated once.
    ``policies``: the PC-PTQ policy notebook 07 selected for each model on seed 0 (``"lambda=1"``,
    ``"uniform-8"``, ``"sensitivity"``), applied to this seed's model the same way; ``n_batches``:
    static PTQ's calibration batches (notebook 05's parameter, as its saved variant records it)."""
    out = {}
    for name, trained in fp32.items():
        makers = {"fp32": lambda model=trained.model: model,
                  "static": lambda model=trained.model: static_ptq(profile, data, model, n_batches)[0],
                  "dynamic": lambda model=trained.model: quantize_dynamic(model),
                  "precision": lambda name=name, trained=trained: pcptq.reapply(
                      profile, data, cache, name, trained, policies[name], config).quantized}
        for variant in variants.replicated(name):
            # MASSIVE's single-utterance test is read for the fp32 models only (notebooks 02 and 04)
            method = variants.lookup(variant).method
            made_with = {"precision": {"policy": policies[name], "search_steps": config.steps},
                         "static": {"n_batches": n_batches}}.get(method, {})
            out[variant] = evaluated(profile, data, replicate_name(variant, s), makers[method],
                                     single=variant == name, made_with=made_with)
    return out


def single_means(evaluation: Evaluation) -> dict[str, float]:
    """MASSIVE's single-utterance measures, mean of the locales (not the pooled ``all`` row);
    NaN where the variant was not evaluated on that test."""
    rows = evaluation.single[evaluation.single.locale != "all"]
    return {f"massive_{c}": float(rows[c].astype(float).mean()) if len(rows) else float("nan")
            for c in SINGLE_COLUMNS}


def seed_row(variant: str, s: int, evaluation: Evaluation) -> dict:
    """One row of ``train_seeds.csv``: the six composed-test metrics and MASSIVE's three."""
    overall = evaluation.row()
    return {"variant": variant, "train_seed": s, **{m: overall[m] for m in METRIC_COLUMNS},
            **single_means(evaluation)}


def mean_std(per_seed: pd.DataFrame, by: str | list[str] = "variant") -> pd.DataFrame:
    """Mean of every metric over training seeds, with ``<metric>_std`` (sample std, ddof 1) and
    ``n_seeds``; one row per ``by``, in the order the rows first appear."""
    by = [by] if isinstance(by, str) else list(by)
    metrics = [c for c in per_seed.columns if c not in (*by, "train_seed")]
    grouped = per_seed.groupby(by, sort=False)[metrics]
    table = grouped.mean().join(grouped.std(ddof=1).add_suffix("_std"))
    return table.join(per_seed.groupby(by, sort=False).size().rename("n_seeds")).reset_index()


def locale_replicates(profile, data, variants: list[str], seeds: int) -> pd.DataFrame:
    """Per-locale composed-test metrics of every variant and training seed with saved predictions."""
    frames = []
    for variant in variants:
        for s in range(seeds):
            path = predictions_dir(profile, replicate_name(variant, s)) / "test.parquet"
            if path.exists():
                table = by_locale(load_predictions(path), data.labels)
                frames.append(table[table.locale != "all"].assign(variant=variant, train_seed=s))
    columns = ["variant", "locale", "train_seed", *METRIC_COLUMNS]
    return pd.concat(frames, ignore_index=True)[columns]
