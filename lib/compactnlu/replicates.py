"""The study over training seeds: every fp32 model trained once per seed, every PTQ method applied to each.

Seed ``s``'s variants are made by ``study.make`` like seed 0's, under the names
``study.replicate_name`` gives them (``baseline@seed1``, ``kd_static@seed2``, ...). Each replicate
is evaluated once and reloaded from its saved predictions afterwards, so Table 2, Table 3 and the
over-seed tests of Table 4 all read the same numbers.
"""

from __future__ import annotations

import pandas as pd

from . import variants
from .evaluation import Evaluation, predictions_dir
from .metrics import METRIC_COLUMNS, by_locale, load_predictions
from .study import evaluated, make, replicate_name, seeded  # noqa: F401 (notebooks 02 and 04 import them from here)

# The MASSIVE single-utterance measures kept per seed: mean of the six locales.
SINGLE_COLUMNS = ["intent_acc", "slot_span_f1", "exact_match"]


def ptq_replicate(profile, data, s: int, models: tuple[str, ...] = ("baseline", "kd")) -> dict[str, Evaluation]:
    """Seed ``s``'s fp32 models and every variant the table makes of them on every training seed
    (static, dynamic, precision-controlled), each made as its row says (``study.make``: the
    precision variants by the choice notebook 07 recorded on seed 0) and evaluated once."""
    return {variant: make(profile, data, variant, seed=s, reuse=True)
            for model in models for variant in variants.replicated(model)}


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
