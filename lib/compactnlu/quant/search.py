"""Algorithm 1: search a bit-width per group of a trained model, then freeze and export it.

One search (``search_policy``):

1. Sensitivity (line 8): weight and activation variance of each group on calibration
   batches of the training split; with the cost at λ it initialises the controller's
   logits ``θ`` (``controller_prior``: Algorithm 1's ``P(q | s_l, α)``).
2. For ``steps`` calibration batches (lines 5-13): draw a Gumbel-softmax sample at the
   annealed temperature, run the model whose grouped layers mix their 4/8/16-bit versions
   by that sample, and minimise

       objective(batch) + λ · expected cost

   where the cost is the expected bits of the controlled weights as a fraction of fp32 and
   the objective is the caller's (the study's: distillation against the fused teachers plus
   the task losses, ``compactnlu.pcptq.distillation_objective``), so this module needs no
   training code. ``θ`` and, if
   ``weight_lr > 0`` (the paper's Algorithm 1 updates both), the float weights are trained;
   weights get their gradient through the quantizer's straight-through estimator.
3. Freeze (line 15): the argmax of ``θ`` per group, exported as ``PrecisionLinear`` /
   ``PrecisionEmbedding`` layers (weights in 4, 8 or 16 bits) by ``apply_policy``.

The model stays in eval mode throughout (no dropout): the search calibrates a trained
model, it does not retrain it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..progress import bar
from .controller import GumbelController, anneal_rate, tau_at
from .groups import Groups, apply_mixed, apply_policy, group_param_counts, precision_groups
from .quantizer import DEFAULT_BITS
from .sensitivity import activation_variance, controller_prior, sensitivity_policy, sensitivity_scores
from .stored import StoredWeight

# Binds the search's loss to the model it searches (the mixed-precision copy): called once,
# before the first step, it returns ``loss(batch) -> scalar tensor``.
Objective = Callable[[nn.Module], Callable[[Mapping], torch.Tensor]]


@dataclass(frozen=True)
class SearchConfig:
    steps: int  # calibration batches the controller is trained on (the profile's pcptq_steps)
    lam: float = 1.0  # weight of the expected cost (fraction of fp32 size) in the objective
    bits: tuple[int, ...] = DEFAULT_BITS
    per_layer: bool = True  # one decision per encoder layer (the paper's θ_L) or shared across layers
    embedding: bool = True  # the word embedding is a group of its own, its size counted and controlled
    per_channel: bool = True  # one weight scale per output row (False: per tensor, literally Eq. 8)
    batch_size: int = 32
    theta_lr: float = 0.05
    weight_lr: float = 1e-5  # 0: only θ is trained (pure PTQ)
    tau0: float = 5.0
    tau_min: float = 0.5
    hard: bool = False  # straight-through one-hot samples instead of the soft mixture
    sensitivity_strength: float = 1.0  # how strongly the sensitivity ranking initialises θ
    sensitivity_batches: int = 8
    seed: int = 0

    @classmethod
    def for_profile(cls, profile, **changes) -> "SearchConfig":
        """The study's search: its length from the profile (``pcptq_steps``), the rest as ``changes`` say."""
        return cls(steps=profile.pcptq_steps, **changes)


@dataclass
class SearchResult:
    policy: dict[str, int]  # group -> frozen bits
    model: nn.Module  # the exported model (PrecisionLinear / PrecisionEmbedding layers)
    probabilities: pd.DataFrame  # final softmax(θ): one row per group, one column per bit-width
    history: pd.DataFrame  # per step: tau, loss, the objective's loss ("distillation"), expected cost, bits per group
    sensitivity: dict[str, float]
    config: SearchConfig


def _inputs(batch: Mapping) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def group_sensitivity(model: nn.Module, groups: Groups, batches: Sequence[Mapping]) -> dict[str, float]:
    model.eval()
    return sensitivity_scores(groups, activation_variance(model, groups, [_inputs(b) for b in batches]))


def _groups_and_sensitivity(model: nn.Module, batches: Iterator[Mapping], config: SearchConfig):
    """The model's groups and each group's sensitivity on the next ``config.sensitivity_batches``
    of ``batches``."""
    groups = precision_groups(model, per_layer=config.per_layer, embedding=config.embedding)
    scores = group_sensitivity(model, groups, list(itertools.islice(batches, config.sensitivity_batches)))
    return groups, scores


def search_policy(model: nn.Module, batches: Iterator[Mapping], objective: Objective, config: SearchConfig,
                  desc: str = "search") -> SearchResult:
    """Run Algorithm 1 on a copy of ``model`` (left as it is) and return the frozen, exported result.

    ``batches``: endless calibration batches of the training split (the first
    ``config.sensitivity_batches`` score sensitivity, then one per step); ``objective``: the
    loss the search minimises besides the cost (``Objective``).
    """
    torch.manual_seed(config.seed)
    groups, scores = _groups_and_sensitivity(model, batches, config)
    counts = group_param_counts(groups)
    controller = GumbelController(list(groups), config.bits,
                                  controller_prior(scores, counts, config.bits, config.lam, config.sensitivity_strength))
    mixed = apply_mixed(model, groups, controller, per_channel=config.per_channel).eval()
    loss_of = objective(mixed)
    parameters = [{"params": controller.parameters(), "lr": config.theta_lr}]
    if config.weight_lr > 0:
        parameters.append({"params": mixed.parameters(), "lr": config.weight_lr})
    else:
        mixed.requires_grad_(False)
    optimizer = torch.optim.Adam(parameters)
    rate = anneal_rate(config.steps, config.tau0, config.tau_min)
    history = []
    for step in bar(range(config.steps), desc=desc):
        tau = tau_at(step, config.tau0, config.tau_min, rate)
        controller.resample(tau, hard=config.hard)
        task_loss = loss_of(next(batches))
        cost = controller.expected_cost(counts)
        loss = task_loss + config.lam * cost
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            expected = dict(zip(controller.groups, controller.expected_bits().tolist()))
        history.append({"step": step, "tau": tau, "loss": loss.item(), "distillation": task_loss.item(),
                        "expected_cost": cost.item(), **{f"bits:{g}": b for g, b in expected.items()}})
    controller.current = None
    policy = controller.freeze()
    probabilities = pd.DataFrame(controller.probs().detach().numpy(), index=controller.groups,
                                 columns=[f"p{b}" for b in controller.bits])
    exported = apply_policy(mixed, policy, groups, per_channel=config.per_channel).eval()
    return SearchResult(policy, exported, probabilities, pd.DataFrame(history), scores, config)


# ---------------------------------------------------------------- policies without learning

def uniform_policy(model: nn.Module, bits: int, per_layer: bool = True, embedding: bool = True) -> dict[str, int]:
    return {g: bits for g in precision_groups(model, per_layer=per_layer, embedding=embedding)}


def sensitivity_only_policy(model: nn.Module, batches: Iterator[Mapping], config: SearchConfig
                            ) -> tuple[dict[str, int], dict[str, float]]:
    """Algorithm 1's sensitivity score alone, on the next ``config.sensitivity_batches`` of
    ``batches``: groups cut into equal quantiles, the least sensitive getting the fewest bits
    (no controller, no training)."""
    _, scores = _groups_and_sensitivity(model, batches, config)
    return sensitivity_policy(scores, config.bits), scores


# ---------------------------------------------------------------- reporting

def model_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of every tensor the model saves: ``stored`` as held in memory and on disk
    (int4 packed two per byte), ``floor`` with each quantized weight at exactly
    ``numel · bits / 8`` bytes. Scales, biases and float tensors count in both."""
    stored = floor = 0.0
    counted = set()
    for name, module in model.named_modules():
        if isinstance(module, StoredWeight):
            b = module.weight_bytes()
            stored += b["stored"]
            floor += b["floor"]
            counted.update(f"{name}.{k}" for k in ("qweight", "scale", "bias"))
    for name, tensor in model.state_dict().items():
        if name not in counted:
            size = tensor.numel() * tensor.element_size()
            stored += size
            floor += size
    return {"stored": stored, "floor": floor}


def policy_table(policy: Mapping[str, int]) -> pd.DataFrame:
    """Bits as a component × layer table (``layer{i}.attention`` -> row attention, column i;
    shared and head groups in column ``all``), for printing and the heatmap."""
    rows = []
    for group, bits in policy.items():
        first, _, rest = group.partition(".")
        if first.startswith("layer") and first[5:].isdigit():
            rows.append({"component": rest, "layer": first[5:], "bits": bits})
        else:
            rows.append({"component": group, "layer": "all", "bits": bits})
    table = pd.DataFrame(rows).pivot(index="component", columns="layer", values="bits")
    layers = sorted(table.columns, key=lambda c: (c == "all", int(c) if c.isdigit() else 0))  # 2 before 10
    return table.reindex(index=sorted(table.index, key=lambda c: (c.startswith("head"), c)), columns=layers)


def bits_share(policy: Mapping[str, int], counts: Mapping[str, int]) -> dict[int, float]:
    """Fraction of the controlled weights held at each bit-width."""
    total = sum(counts[g] for g in policy)
    share: dict[int, float] = {}
    for group, bits in policy.items():
        share[bits] = share.get(bits, 0.0) + counts[group] / total
    return {bits: round(float(v), 4) for bits, v in sorted(share.items())}
