"""Notebook 07's study: precision-controlled PTQ policies of a trained model, searched, exported,
measured, and one of them picked by a rule fixed before any test number is seen.

Every candidate is a ``PrecisionConfig`` (a λ of the search, a uniform bit-width, the
sensitivity-only policy) made for a trained model (:func:`candidate`) and saved by the precision
method under ``artifacts/quantized/``, keyed by the fp32 model it came from and every setting of
its search, so a rerun reloads it. The one selected is recorded, as a ``PrecisionConfig``, as its
variant's settings (:func:`choose`): every training seed's model is given the same choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import variants
from .artifacts import atomic_write, read_json, write_json
from .bench import artifact_size_mb
from .distill import DistillCollator, DistillConfig, Distiller, attach_rows, teacher_hidden_size
from .metrics import METRIC_COLUMNS, predict, task_metrics
from .quant import PrecisionConfig, apply_config, load_quantized, quantized_dir, read_config, save_quantized
from .quant.search import SearchConfig, model_bytes, search_policy, sensitivity_only_policy, uniform_policy
from .train import collator_for

# The search's objective: the teachers' targets without a trained fusion (which only the
# distilled student has), and without the representation terms, whose projection would need
# training from scratch.
SEARCH_DISTILLATION = DistillConfig(fusion="mean", use_mse=False, use_crd=False)

# The selection rule, fixed before looking at test numbers.
SELECTION_RULE = ("the smallest artifact whose dev id_acc and sf_f1 are both within {tolerance:.0%} "
                  "(absolute) of its fp32 model's dev numbers; if none is, the one with the best mean of the two")


@dataclass
class Candidate:
    model: str  # the fp32 model it quantizes: "kd" or "baseline"
    config: PrecisionConfig  # how its bits were chosen, and the bits
    folder: Path
    quantized: nn.Module
    history: pd.DataFrame | None = None  # the search's steps (searched candidates only)

    @property
    def label(self) -> str:
        return self.config.label


def teacher_batches(data, cache: dict, collator, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless batches of the training split (never dev or test), each with its rows' cached
    teacher outputs; a fresh seeded order each pass."""
    train = attach_rows(data.features["train"])
    collate = DistillCollator(collator, cache)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(train))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([train[int(i)] for i in order[start:start + batch_size]])


def search_batches(data, cache: dict, config: SearchConfig) -> Iterator[dict]:
    """The search's calibration batches: ``teacher_batches`` at the config's batch size and seed."""
    return teacher_batches(data, cache, collator_for(data), config.batch_size, config.seed)


def distillation_objective(cache: dict):
    """The search's objective (``quant.search.Objective``): the distillation loss against the
    teachers' cached outputs, fused by their mean, plus the task losses; the baseline and the
    student are searched under this one objective."""
    def bind(model: nn.Module):
        distiller = Distiller(model, SEARCH_DISTILLATION, teacher_hidden_size(cache)).eval()

        def loss(batch: Mapping) -> torch.Tensor:
            return distiller(**batch)["loss"]
        return loss
    return bind


def search(model: nn.Module, data, cache: dict, config: SearchConfig, desc: str = "search"):
    """Algorithm 1 on ``model`` under the study's objective (``quant.search.search_policy``)."""
    return search_policy(model, search_batches(data, cache, config), distillation_objective(cache), config, desc)


def sensitivity_only(model: nn.Module, data, cache: dict, config: SearchConfig) -> dict[str, int]:
    """The sensitivity-only policy of ``model`` on the search's calibration batches."""
    policy, _ = sensitivity_only_policy(model, search_batches(data, cache, config), config)
    return policy


def searched(profile, data, cache, name: str, trained, config: SearchConfig) -> Candidate:
    """Algorithm 1 on ``trained.model`` at ``config.lam`` (loaded when already done)."""
    choice = PrecisionConfig(None, config.per_channel, config.per_layer, config.embedding, kind="searched",
                             lam=config.lam)
    # the flags beside the search's settings: how searches have always been keyed, so saved ones are found
    key = {"search": asdict(config), "per_channel": config.per_channel, "per_layer": config.per_layer,
           "embedding": config.embedding}
    folder = quantized_dir(profile, f"{name}_pcptq", trained.path, key, artifact="pcptq")
    if not folder.exists():
        result = search(trained.model, data, cache, config, desc=f"{name} {choice.label}")
        save_quantized(result.model, folder, choice.for_model(result.policy),
                       {"search": asdict(config), "source": Path(trained.path).name,
                        "probabilities": result.probabilities.to_dict("index")})
        atomic_write(folder / "search_history.csv", lambda tmp: result.history.to_csv(tmp, index=False))
    history = folder / "search_history.csv"
    return Candidate(name, choice.for_model(read_config(folder).policy), folder,
                     load_quantized(folder, labels=data.labels), pd.read_csv(history) if history.exists() else None)


def fixed(profile, name: str, trained, config: PrecisionConfig) -> Candidate:
    """``config``'s bits applied to the trained weights as they are (no search, no fine-tuning)."""
    folder = quantized_dir(profile, f"{name}_{config.label}", trained.path, config.structure())
    if not folder.exists():
        save_quantized(apply_config(trained.model, config), folder, config, {"source": Path(trained.path).name})
    return Candidate(name, config, folder, load_quantized(folder))


def candidate(profile, data, cache, name: str, trained, choice: PrecisionConfig, config: SearchConfig) -> Candidate:
    """``choice`` made for ``trained`` (loaded when made before): Algorithm 1 at its λ, or its bits
    (one width, the sensitivity-only policy, or given) applied to the trained weights as they are.
    ``config``: the search's settings (its groups and scales are ``choice``'s)."""
    config = replace(config, per_channel=choice.per_channel, per_layer=choice.per_layer, embedding=choice.embedding)
    if choice.kind == "searched":
        return searched(profile, data, cache, name, trained, replace(config, lam=choice.lam))
    if choice.kind == "uniform":
        policy = uniform_policy(trained.model, choice.bits, choice.per_layer, choice.embedding)
    elif choice.kind == "sensitivity":
        policy = sensitivity_only(trained.model, data, cache, config)
    else:
        policy = choice.policy
    return fixed(profile, name, trained, choice.for_model(policy))


def choices(config: SearchConfig, lambdas) -> list[PrecisionConfig]:
    """Notebook 07's candidates: the λ sweep, one uniform policy per width, the sensitivity-only policy."""
    flags = {"per_channel": config.per_channel, "per_layer": config.per_layer, "embedding": config.embedding}
    return ([PrecisionConfig(None, kind="searched", lam=float(lam), **flags) for lam in lambdas]
            + [PrecisionConfig(None, kind="uniform", bits=bits, **flags) for bits in config.bits]
            + [PrecisionConfig(None, kind="sensitivity", **flags)])


def candidates(profile, data, cache, name: str, trained, config: SearchConfig, lambdas) -> list[Candidate]:
    """Every one of :func:`choices` made for ``trained``."""
    return [candidate(profile, data, cache, name, trained, choice, config) for choice in choices(config, lambdas)]


def split_metrics(model: nn.Module, data, split: str) -> dict[str, float]:
    """The six metrics on a whole composed split (``dev`` for choosing, ``test`` for reporting)."""
    df = predict(model, data.features[split], collator_for(data), data.labels, desc=split)
    return {k: v for k, v in task_metrics(df, data.labels).items() if k in METRIC_COLUMNS}


def measure(candidate: Candidate, data, cache_dir: Path) -> dict:
    """Sizes, and dev and test metrics of one candidate (cached beside its artifact)."""
    path = Path(cache_dir) / f"{candidate.folder.name}.json"
    if path.exists():
        return read_json(path)
    sizes = model_bytes(candidate.quantized)
    row = {"model": candidate.model, "policy": candidate.label, "lam": candidate.config.lam,
           "size_mb": artifact_size_mb(candidate.folder), "floor_mb": sizes["floor"] / 1e6,
           "dev": split_metrics(candidate.quantized, data, "dev"),
           "test": split_metrics(candidate.quantized, data, "test"), "folder": candidate.folder.name}
    write_json(path, row)
    return row


def sweep_table(rows: list[dict]) -> pd.DataFrame:
    """``pcptq_sweep.csv``: test metrics, plus the dev metrics the selection used (``dev_`` columns)."""
    records = [{k: r[k] for k in ("model", "lam", "policy", "size_mb", "floor_mb")} | r["test"]
               | {f"dev_{m}": r["dev"][m] for m in ("id_acc", "sf_f1")} for r in rows]
    return pd.DataFrame(records)[["model", "lam", "policy", "size_mb", "floor_mb", *METRIC_COLUMNS,
                                  "dev_id_acc", "dev_sf_f1"]]


def select(sweep: pd.DataFrame, reference_dev: dict[str, float], model: str, tolerance: float = 0.01) -> pd.Series:
    """Apply ``SELECTION_RULE`` to ``model``'s rows of the sweep (dev columns only)."""
    rows = sweep[sweep.model == model]
    close = rows[(rows.dev_id_acc >= reference_dev["id_acc"] - tolerance)
                 & (rows.dev_sf_f1 >= reference_dev["sf_f1"] - tolerance)]
    if len(close):
        return close.sort_values(["size_mb", "dev_id_acc"], ascending=[True, False]).iloc[0]
    return rows.loc[(rows.dev_id_acc + rows.dev_sf_f1).idxmax()]


def selected(candidates: list[Candidate], row: pd.Series) -> Candidate:
    """The candidate of ``candidates`` that a row of the sweep (``select``'s answer) shows."""
    return next(c for c in candidates if c.label == row.policy)


def choose(profile, chosen: Mapping[str, Candidate]) -> None:
    """Record each model's chosen candidate as its precision variant's settings (``variants.choose``):
    ``compactnlu.study.make`` makes that variant of every training seed's model by the same choice."""
    for name, c in chosen.items():
        (variant,) = variants.derived(name, method="precision", runtime="torch")
        variants.choose(profile, variant, c.config.choice())
