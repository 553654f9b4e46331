"""Sensitivity (Algorithm 1, line 8): ``s_g = mean over the group's layers of Var(W)·Var(A)``;
with the cost it initialises the controller's ``θ`` (``controller_prior``) or, on its own,
assigns bits by quantile (``sensitivity_policy``, a no-learning baseline)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .groups import Groups
from .quantizer import DEFAULT_BITS


@torch.no_grad()
def activation_variance(model: nn.Module, groups: Groups, batches: Iterable) -> dict[str, float]:
    """Population variance of each grouped module's activation over ``batches`` (dicts are
    passed as keyword arguments): a linear layer's input, an embedding's output (its input
    is token ids). The caller puts the model in eval mode."""
    stats: dict[str, list[float]] = {}
    handles = []

    def hook(name):
        def record(module, args, output):
            a = (output if isinstance(module, nn.Embedding) else args[0]).detach().double()
            s = stats.setdefault(name, [0.0, 0.0, 0])
            s[0] += float(a.sum())
            s[1] += float((a * a).sum())
            s[2] += a.numel()
        return record

    for members in groups.values():
        for name, module in members:
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: max(total2 / n - (total / n) ** 2, 0.0) for name, (total, total2, n) in stats.items()}


def sensitivity_scores(groups: Groups, activations: Mapping[str, float]) -> dict[str, float]:
    """``s_g = mean over the group's layers of Var(W) · Var(A)``.

    The paper only says "based on weight and activation variance". The product is the
    scale of a layer's output, hence of the rounding noise a fixed bit-width adds to it:
    a step-``s`` error on W (on A) is a fraction of Var(W) (of Var(A)) and is multiplied by
    the other operand. ``activations`` is ``activation_variance``'s output.
    """
    scores = {}
    for group, members in groups.items():
        per_layer = [float(m.weight.detach().double().var(unbiased=False)) * activations[name] for name, m in members]
        scores[group] = sum(per_layer) / len(per_layer)
    return scores


def rank_fraction(scores: Mapping[str, float]) -> torch.Tensor:
    """Each group's rank among the scores, scaled to [0, 1] (lowest 0, highest 1)."""
    values = torch.tensor([float(v) for v in scores.values()], dtype=torch.float64)
    ranks = values.argsort(stable=True).argsort().double()
    return ranks / (len(values) - 1) if len(values) > 1 else torch.full_like(values, 0.5)


def controller_prior(scores: Mapping[str, float], counts: Mapping[str, int], bits: Sequence[int] = DEFAULT_BITS,
                     lam: float = 0.0, strength: float = 1.0) -> torch.Tensor:
    """Initial ``θ`` (rows in ``scores``' order): Algorithm 1's ``P(q | s_l, α)`` as logits.

    ``θ_gk = strength · (0.5 + r_g) · u_k − λ · b_k · n_g / (32 · N)``: ``u_k`` places the
    widths on [0, 1] (fewest bits 0, most 1) and ``r_g`` is the group's sensitivity rank on
    [0, 1], so every group starts leaning to more bits, the sensitive ones more steeply; the
    second term is the group's share of the search's own cost at ``λ`` (``n_g`` its weights,
    ``N`` all controlled weights), so a large λ starts the big groups at few bits. Without
    the cost term, λ = 0 would leave the choice between 8 and 16 bits to a loss that cannot
    tell them apart on a small model. ``strength=0, lam=0`` is uniform.
    """
    bit_values = torch.tensor([float(b) for b in bits], dtype=torch.float64)
    span = bit_values.max() - bit_values.min()
    u = (bit_values - bit_values.min()) / span if span > 0 else torch.zeros_like(bit_values)
    r = rank_fraction(scores)
    n = torch.tensor([float(counts[g]) for g in scores], dtype=torch.float64)
    theta = strength * (0.5 + r)[:, None] * u[None, :] - lam * bit_values[None, :] * (n / n.sum())[:, None] / 32.0
    return theta.float()


def sensitivity_policy(scores: Mapping[str, float], bits: Sequence[int] = DEFAULT_BITS) -> dict[str, int]:
    """No-learning baseline: groups ranked by score and cut into ``len(bits)`` equal quantiles,
    the least sensitive getting the fewest bits."""
    ladder = sorted(bits)
    values = torch.tensor([float(v) for v in scores.values()], dtype=torch.float64)
    ranks = values.argsort(stable=True).argsort().tolist()
    n = len(ranks)
    return {g: ladder[min(r * len(ladder) // n, len(ladder) - 1)] for g, r in zip(scores, ranks)}
