"""Notebook 07's study: precision-controlled PTQ policies of a trained model, searched, exported,
measured, and one of them picked by a rule fixed before any test number is seen.

Every candidate (a λ of the search, a uniform bit-width, the sensitivity-only policy) is
saved with ``save_quantized(method="precision")`` under ``artifacts/quantized/``, keyed by
the fp32 model it came from and every setting of its search, so a rerun reloads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .artifacts import atomic_write, read_json, write_json
from .bench import artifact_size_mb
from .distill import DistillCollator, DistillConfig, Distiller, attach_rows, teacher_hidden_size
from .metrics import METRIC_COLUMNS, predict, task_metrics
from .quant import load_quantized, quantized_dir, read_details, save_quantized
from .quant.precision import export_policy
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
    policy_name: str  # "lambda=0.5", "uniform-4", "sensitivity"
    lam: float | None
    policy: dict[str, int]
    folder: Path
    quantized: nn.Module
    history: pd.DataFrame | None = None  # the search's steps (λ candidates only)


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


def _saved(folder: Path) -> tuple[dict, pd.DataFrame | None]:
    details = read_details(folder)
    history = folder / "search_history.csv"
    return details, (pd.read_csv(history) if history.exists() else None)


def searched(profile, data, cache, name: str, trained, config: SearchConfig) -> Candidate:
    """Algorithm 1 on ``trained.model`` at ``config.lam`` (loaded when already done)."""
    details = {**config.details(), "source": Path(trained.path).name}
    folder = quantized_dir(profile, f"{name}_pcptq", trained.path, details, artifact="pcptq")
    label = f"lambda={config.lam:g}"
    if not folder.exists():
        result = search(trained.model, data, cache, config, desc=f"{name} {label}")
        save_quantized(result.model, folder, "precision", {**details, "policy": result.policy,
                                                            "probabilities": result.probabilities.to_dict("index")})
        atomic_write(folder / "search_history.csv", lambda tmp: result.history.to_csv(tmp, index=False))
    saved, history = _saved(folder)
    return Candidate(name, label, config.lam, saved["policy"], folder, load_quantized(folder, labels=data.labels), history)


def fixed(profile, name: str, trained, policy_name: str, policy: dict[str, int], config: SearchConfig) -> Candidate:
    """A policy applied to the trained weights as they are (no search, no fine-tuning)."""
    details = {"policy": policy, "per_channel": config.per_channel, "per_layer": config.per_layer,
               "embedding": config.embedding, "source": Path(trained.path).name}
    folder = quantized_dir(profile, f"{name}_{policy_name}", trained.path, details)
    if not folder.exists():
        quantized = export_policy(trained.model, policy, config.per_layer, config.embedding, config.per_channel)
        save_quantized(quantized, folder, "precision", details)
    return Candidate(name, policy_name, None, policy, folder, load_quantized(folder))


def candidates(profile, data, cache, name: str, trained, config: SearchConfig, lambdas) -> list[Candidate]:
    """The λ sweep, the uniform policies at each candidate width, and the sensitivity-only policy."""
    out = [searched(profile, data, cache, name, trained, replace(config, lam=float(lam))) for lam in lambdas]
    for bits in config.bits:
        out.append(fixed(profile, name, trained, f"uniform-{bits}",
                         uniform_policy(trained.model, bits, config.per_layer, config.embedding), config))
    out.append(fixed(profile, name, trained, "sensitivity", sensitivity_only(trained.model, data, cache, config),
                     config))
    return out


def reapply(profile, data, cache, name: str, trained, policy_name: str, config: SearchConfig) -> Candidate:
    """The candidate called ``policy_name`` (as :func:`candidates` names them) made for ``trained``:
    how a policy selected on one training seed is carried to the models of the others."""
    if policy_name.startswith("lambda="):
        return searched(profile, data, cache, name, trained, replace(config, lam=float(policy_name[7:])))
    if policy_name.startswith("uniform-"):
        bits = int(policy_name[8:])
        return fixed(profile, name, trained, policy_name,
                     uniform_policy(trained.model, bits, config.per_layer, config.embedding), config)
    if policy_name == "sensitivity":
        return fixed(profile, name, trained, policy_name, sensitivity_only(trained.model, data, cache, config), config)
    raise ValueError(f"unknown PC-PTQ policy {policy_name!r}; expected lambda=<x>, uniform-<bits> or sensitivity")


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
    row = {"model": candidate.model, "policy": candidate.policy_name, "lam": candidate.lam,
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
