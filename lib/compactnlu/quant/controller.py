"""The search's controller (Eq. 10) and the search-time layers it drives.

A controller with logits ``θ`` per group samples ``p(b|L) = softmax((θ_L + g)/τ)``
(Gumbel-softmax). A group's layers then output the mixture ``Σ_k p_k · layer_{b_k}(x)``, so a
task or distillation loss plus ``λ · expected_cost`` reaches ``θ`` (and, through the
quantizer's straight-through estimator, the weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import DEFAULT_BITS, check_bits, fake_quantize, fake_quantize_weight


def tau_at(step: int, tau0: float = 5.0, tau_min: float = 0.5, rate: float = 1e-2) -> float:
    """Exponential annealing ``max(tau_min, tau0 · exp(-rate · step))``."""
    return max(tau_min, tau0 * math.exp(-rate * step))


def anneal_rate(steps: int, tau0: float = 5.0, tau_min: float = 0.5) -> float:
    """The ``rate`` at which ``tau_at`` reaches ``tau_min`` after ``steps`` steps."""
    return math.log(tau0 / tau_min) / max(steps, 1)


class GumbelController(nn.Module):
    """Logits ``θ`` of shape ``[groups, bits]`` and the relaxed choice of bits they define.

    One sample serves a whole forward pass: call ``resample(τ)`` once per step, before the
    model's forward; every ``MixedPrecisionLinear`` of a group reads that group's row.
    ``init=None`` starts uniform (θ = 0); ``controller_prior`` gives an informed start.
    """

    tau_at = staticmethod(tau_at)

    def __init__(self, groups: Sequence[str], bits: Sequence[int] = DEFAULT_BITS, init: torch.Tensor | None = None):
        super().__init__()
        self.groups = list(groups)
        self.bits = tuple(check_bits(b) for b in bits)
        if len(set(self.groups)) != len(self.groups) or len(set(self.bits)) != len(self.bits):
            raise ValueError("groups and bits must be unique")
        shape = (len(self.groups), len(self.bits))
        theta = torch.zeros(shape) if init is None else torch.as_tensor(init, dtype=torch.float32).clone()
        if tuple(theta.shape) != shape:
            raise ValueError(f"init has shape {tuple(theta.shape)}, expected {shape}")
        self.theta = nn.Parameter(theta)
        self.register_buffer("bit_values", torch.tensor(self.bits, dtype=torch.float32), persistent=False)
        self.index = {g: i for i, g in enumerate(self.groups)}
        self.current: torch.Tensor | None = None  # the sample of the current forward pass, [G, K]

    def __getstate__(self):
        # A sample is part of one step's autograd graph, which deepcopy and pickle refuse;
        # a copy starts without one.
        state = super().__getstate__()
        state["current"] = None
        return state

    def probs(self) -> torch.Tensor:
        """``softmax(θ)`` without noise, ``[G, K]``."""
        return self.theta.softmax(dim=-1)

    def weights(self, tau: float, hard: bool = False) -> torch.Tensor:
        """A Gumbel-softmax sample ``softmax((θ + g)/τ)`` per group; ``hard`` gives one-hot
        values with the soft sample's gradient (straight-through)."""
        return F.gumbel_softmax(self.theta, tau=tau, hard=hard, dim=-1)

    def resample(self, tau: float, hard: bool = False, noise: bool = True) -> torch.Tensor:
        """Draw the sample the next forward pass uses (``noise=False``: ``softmax(θ/τ)``)."""
        if noise:
            self.current = self.weights(tau, hard)
        else:
            soft = (self.theta / tau).softmax(dim=-1)
            if hard:
                one_hot = F.one_hot(soft.argmax(dim=-1), len(self.bits)).to(soft.dtype)
                soft = one_hot - soft.detach() + soft
            self.current = soft
        return self.current

    def group_weights(self, group: str) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("call controller.resample(tau) before the model's forward pass")
        return self.current[self.index[group]]

    def expected_bits(self) -> torch.Tensor:
        """``Σ_k p_gk · bits_k`` per group, ``[G]`` (noise-free probabilities)."""
        return self.probs() @ self.bit_values

    def expected_cost(self, param_counts: Mapping[str, int]) -> torch.Tensor:
        """Expected size as a fraction of fp32, ``Σ_g E[bits_g] · n_g / (32 · Σ_g n_g)``, over
        the controller's groups: 1/2 when every group is 16-bit, 1/8 when every group is 4-bit."""
        missing = [g for g in self.groups if g not in param_counts]
        if missing:
            raise KeyError(f"no parameter count for groups {missing}")
        counts = torch.tensor([float(param_counts[g]) for g in self.groups], device=self.theta.device)
        return (self.expected_bits() * counts).sum() / (32.0 * counts.sum())

    def freeze(self) -> dict[str, int]:
        """The deployed policy: each group's most likely bit-width."""
        return {g: self.bits[int(k)] for g, k in zip(self.groups, self.theta.argmax(dim=-1))}


class ControlledLayer(nn.Module):
    """A search-time layer that mixes its candidate widths by the controller's sample.

    The controller is held by reference, not as a submodule, so ``θ`` is not repeated in
    every layer's parameters and state dict; optimise ``controller.parameters()`` alongside.
    """

    def __init__(self, controller: GumbelController, group: str, per_channel: bool):
        super().__init__()
        if group not in controller.index:
            raise KeyError(f"group {group!r} is not one of the controller's")
        self.group, self.per_channel = group, per_channel
        object.__setattr__(self, "controller", controller)


class MixedPrecisionLinear(ControlledLayer):
    """Search-time stand-in for an ``nn.Linear``: ``Σ_k w_k · F.linear(fq(x, b_k), fq(W, b_k), bias)``
    with ``w`` the controller's current sample for ``group``."""

    def __init__(self, linear: nn.Linear, controller: GumbelController, group: str, per_channel: bool = True):
        super().__init__(controller, group, per_channel)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.controller.group_weights(self.group)
        weight, bias = self.linear.weight, self.linear.bias
        return sum(w[k] * F.linear(fake_quantize(x, b), fake_quantize_weight(weight, b, self.per_channel), bias)
                   for k, b in enumerate(self.controller.bits))


class MixedPrecisionEmbedding(ControlledLayer):
    """Search-time stand-in for an ``nn.Embedding``: the looked-up rows, each fake-quantized
    per row at every candidate width, mixed by the controller's sample (cheap: only the rows
    of the batch are quantized, and a row's scale depends on that row alone)."""

    def __init__(self, embedding: nn.Embedding, controller: GumbelController, group: str, per_channel: bool = True):
        super().__init__(controller, group, per_channel)
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.controller.group_weights(self.group)
        if not self.per_channel:  # a per-tensor scale needs the whole table
            return sum(w[k] * F.embedding(ids, fake_quantize(self.embedding.weight, b)) for k, b in
                       enumerate(self.controller.bits))
        rows = self.embedding(ids)
        flat = rows.reshape(-1, rows.shape[-1])
        return sum(w[k] * fake_quantize(flat, b, per_channel=True).reshape(rows.shape)
                   for k, b in enumerate(self.controller.bits))
