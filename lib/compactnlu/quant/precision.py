"""Precision-controlled task-specific PTQ (the paper's Sec. 4.2.3 and Algorithm 1), pure torch.

The paper's pieces, and the choices this module makes where the text is silent:

- Quantizer (Eqs. 7-9): symmetric integers in ``[-2^(b-1), 2^(b-1)-1]``, scale ``max|H|/qmax``,
  ``clip(round(H/s)) * s``. Weights get one scale per output channel by default (a per-tensor
  scale, literally Eq. 8, is an option); activations get one scale per tensor, computed on
  the fly from the batch, so no calibration is needed at run time.
- Search: a controller with logits ``θ`` per group samples ``p(b|L) = softmax((θ_L + g)/τ)``
  (Eq. 10, Gumbel-softmax). A group's linear layers then output the mixture
  ``Σ_k p_k · linear_{b_k}(x)``, so a task or distillation loss plus ``λ · expected_cost``
  reaches ``θ`` (and, through a straight-through estimator, the weights).
- Export: the argmax of ``θ`` is frozen; weights are stored as int4 (two per byte), int8 or
  int16 with float32 scales (``PrecisionLinear``), activations are fake-quantized at run
  time with the same bits.
- Sensitivity (Algorithm 1, line 8): ``s_g = mean over the group's layers of Var(W)·Var(A)``;
  with the cost it initialises ``θ`` (``controller_prior``) or, on its own, assigns bits by
  quantile (a no-learning baseline).

Candidate bits: the paper's text says {4, 8, 16}, its Algorithm 1 says {4, 6, 8}; any
integer width in 2..16 works here, the default is the text's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import assert_finite

DEFAULT_BITS = (4, 8, 16)


# ---------------------------------------------------------------- quantizer (Eqs. 7-9)

def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def qmin(bits: int) -> int:
    return -(2 ** (bits - 1))


def _check_bits(bits: int) -> int:
    if int(bits) != bits or not 2 <= bits <= 16:
        raise ValueError(f"bit-width must be an integer in 2..16, got {bits!r}")
    return int(bits)


def int_dtype(bits: int) -> torch.dtype:
    """The smallest signed container (int4 values sit in int8 until they are packed)."""
    return torch.int8 if _check_bits(bits) <= 8 else torch.int16


def _scale(x: torch.Tensor, bits: int, per_channel: bool, axis: int) -> torch.Tensor:
    """``max|x| / qmax`` per channel along ``axis`` (or per tensor), shaped to broadcast against ``x``.

    An all-zero channel (or tensor) would give scale 0 and 0/0 = NaN; it gets scale 1
    instead, which quantizes its zeros to exact zeros. 1-D tensors are always per tensor.
    """
    x = x.detach().float().abs()
    if per_channel and x.dim() >= 2:
        axis = axis % x.dim()
        amax = x.amax(dim=[d for d in range(x.dim()) if d != axis], keepdim=True)
    else:
        amax = x.amax().reshape([1] * x.dim())
    return torch.where(amax > 0, amax / qmax(bits), torch.ones_like(amax))


def _round_clip(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(x.detach().float() / scale), qmin(bits), qmax(bits))


def quantize_symmetric(x: torch.Tensor, bits: int, per_channel: bool = True, axis: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (int8 for bits <= 8, else int16) and the float32 scale that maps them back."""
    bits = _check_bits(bits)
    assert_finite({"x": x}, "quantize_symmetric")  # NaN would round to 0 and inf give a NaN scale
    scale = _scale(x, bits, per_channel, axis)
    return _round_clip(x, scale, bits).to(int_dtype(bits)), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class _FakeQuantize(torch.autograd.Function):
    """Forward: quantize-dequantize exactly. Backward: identity (straight-through).

    The scale comes from ``max|x|`` of the same tensor, so nothing is ever outside the
    range and the clipped variant of the estimator would zero no gradient anyway.
    """

    @staticmethod
    def forward(ctx, x, bits, per_channel, axis):
        scale = _scale(x, bits, per_channel, axis)
        return (_round_clip(x, scale, bits) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize(x: torch.Tensor, bits: int, per_channel: bool = False, axis: int = 0) -> torch.Tensor:
    """``x`` rounded to ``bits`` and back to float; gradients pass through unchanged."""
    return _FakeQuantize.apply(x, _check_bits(bits), per_channel, axis)


def fake_quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """A weight as ``PrecisionLinear`` will store it (one scale per output row by default)."""
    return fake_quantize(w, bits, per_channel=per_channel, axis=0)


# ---------------------------------------------------------------- int4 packing

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values (in an integer tensor, any shape) two per uint8: element 2i in the
    low nibble, 2i+1 in the high one, flattened; an odd count is padded with a zero."""
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = flat & 0xF  # two's complement in 4 bits
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` int8 values of ``pack_int4``'s output, flat."""
    b = packed.reshape(-1).to(torch.int16)
    both = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


# ---------------------------------------------------------------- exported layers

class _StoredWeight(nn.Module):
    """A 2-D weight held in its bits: ``qweight`` (int4 packed row by row into uint8, rows
    padded to an even length so a row can be gathered alone; int8; or int16) and float32
    ``scale`` of shape ``[rows, 1]`` (per channel) or ``[1, 1]`` (per tensor).

    Every buffer is a plain tensor, so ``state_dict`` saves with safetensors; a fresh module
    built with the same shape and bits loads it back with ``load_state_dict``.
    """

    def __init__(self, rows: int, cols: int, bits: int, per_channel: bool):
        super().__init__()
        self.bits = _check_bits(bits)
        self.rows, self.cols, self.per_channel = rows, cols, per_channel
        if self.bits == 4:
            qweight = torch.zeros(rows, (cols + 1) // 2, dtype=torch.uint8)
        else:
            qweight = torch.zeros(rows, cols, dtype=int_dtype(self.bits))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(rows if per_channel else 1, 1))

    @torch.no_grad()
    def _store(self, weight: torch.Tensor) -> None:
        q, scale = quantize_symmetric(weight, self.bits, per_channel=self.per_channel, axis=0)
        if self.bits == 4:
            q = F.pad(q, (0, self.cols % 2)).contiguous()  # even rows: row i is bytes [i*c/2, (i+1)*c/2)
            q = pack_int4(q).reshape(self.qweight.shape)
        self.qweight.copy_(q)
        self.scale.copy_(scale.reshape(self.scale.shape))

    def _integers(self, packed_rows: torch.Tensor) -> torch.Tensor:
        """Integer values of some rows of ``qweight`` (shape ``[..., stored columns]``)."""
        if self.bits != 4:
            return packed_rows
        padded = packed_rows.shape[-1] * 2
        q = unpack_int4(packed_rows, packed_rows.numel() * 2).reshape(*packed_rows.shape[:-1], padded)
        return q[..., :self.cols]

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self._integers(self.qweight), self.scale)

    def weight_bytes(self) -> dict[str, float]:
        """``stored``: bytes of the buffers as held (weight container + scales + bias);
        ``floor``: the same with the weight at exactly ``numel * bits / 8`` bytes (what int6
        or odd-length int4 would take if packed tightly)."""
        extra = self.scale.numel() * self.scale.element_size()
        bias = getattr(self, "bias", None)
        if bias is not None:
            extra += bias.numel() * bias.element_size()
        return {"stored": self.qweight.numel() * self.qweight.element_size() + extra,
                "floor": self.rows * self.cols * self.bits / 8 + extra}


class PrecisionLinear(_StoredWeight):
    """A frozen ``nn.Linear`` with its weight stored in ``bits``; the run-time path of the
    paper: dequantize the weight, fake-quantize the input per tensor at the same bits, linear."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, per_channel: bool = True):
        super().__init__(out_features, in_features, bits, per_channel)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, per_channel: bool = True) -> "PrecisionLinear":
        module = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, per_channel)
        module._store(linear.weight)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize(x, self.bits), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"per_channel={self.per_channel}, bias={self.bias is not None}")


class PrecisionEmbedding(_StoredWeight):
    """A frozen ``nn.Embedding`` table stored in ``bits`` (one scale per row by default).

    Only the looked-up rows are dequantized, so a 250k-row table never exists in float.
    Its output is not fake-quantized: it feeds LayerNorm, not a linear layer.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, per_channel: bool = True,
                 padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, bits, per_channel)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, per_channel: bool = True) -> "PrecisionEmbedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits, per_channel, embedding.padding_idx)
        module._store(embedding.weight)
        return module.to(embedding.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.scale[ids] if self.per_channel else self.scale.reshape(1)
        return dequantize(self._integers(self.qweight[ids]), scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, per_channel={self.per_channel}"


# ---------------------------------------------------------------- search: the controller (Eq. 10)

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
        self.bits = tuple(_check_bits(b) for b in bits)
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


class _Controlled(nn.Module):
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


class MixedPrecisionLinear(_Controlled):
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


class MixedPrecisionEmbedding(_Controlled):
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


# ---------------------------------------------------------------- groups of MultiTaskNLU

Groups = dict[str, list[tuple[str, nn.Module]]]


def precision_groups(model: nn.Module, per_layer: bool = True, embedding: bool = False) -> Groups:
    """The paper's precision groups of a ``MultiTaskNLU``: group name -> ``[(module name, module)]``.

    Per encoder layer ``layer{i}.attention`` (Q, K, V and the attention output projection)
    and ``layer{i}.mlp`` (intermediate and output dense), or one ``attention`` and one ``mlp``
    group across layers with ``per_layer=False``; ``head.id``/``head.dc``/``head.sf`` for the
    heads the model has; ``pooler`` for XLM-R's pooler (``pooling="cls"`` only; it feeds both
    ID and DC, so it is its own group); ``embedding`` (the word embeddings) if asked for.
    """
    groups: Groups = {}

    def add(group: str, name: str) -> None:
        groups.setdefault(group, []).append((name, model.get_submodule(name)))

    if embedding:
        add("embedding", "encoder.embeddings.word_embeddings")
    for i in range(len(model.encoder.encoder.layer)):
        prefix = f"encoder.encoder.layer.{i}"
        for kind, names in (("attention", ("attention.self.query", "attention.self.key", "attention.self.value",
                                           "attention.output.dense")),
                            ("mlp", ("intermediate.dense", "output.dense"))):
            for name in names:
                add(f"layer{i}.{kind}" if per_layer else kind, f"{prefix}.{name}")
    if getattr(model.encoder, "pooler", None) is not None:
        add("pooler", "encoder.pooler.dense")
    for task in model.tasks:
        add(f"head.{task}", f"{task}_head")
    return groups


def group_param_counts(groups: Groups) -> dict[str, int]:
    """Weight elements per group (biases stay float, so they are not counted)."""
    return {g: sum(m.weight.numel() for _, m in members) for g, members in groups.items()}


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _check_groups(policy_or_groups: Iterable[str], groups: Groups) -> None:
    unknown = [g for g in policy_or_groups if g not in groups]
    if unknown:
        raise KeyError(f"unknown groups {unknown}")


def apply_policy(model: nn.Module, policy: Mapping[str, int], groups: Groups, per_channel: bool = True) -> nn.Module:
    """A copy of ``model`` with each grouped ``nn.Linear`` (``nn.Embedding``) replaced by a
    ``PrecisionLinear`` (``PrecisionEmbedding``) at its group's bits; groups absent from
    ``policy`` stay float. ``model`` may be the float model or ``apply_mixed``'s search
    copy (its wrappers give up their float layers, as trained). The original is left as it is.
    NaN or inf anywhere in ``model`` is a ValueError naming the tensor."""
    _check_groups(policy, groups)
    assert_finite(model.state_dict(), "apply_policy")
    out = copy.deepcopy(model)
    for group, bits in policy.items():
        for name, _ in groups[group]:
            module = out.get_submodule(name)
            if isinstance(module, MixedPrecisionLinear):
                module = module.linear
            elif isinstance(module, MixedPrecisionEmbedding):
                module = module.embedding
            if isinstance(module, nn.Linear):
                new = PrecisionLinear.from_linear(module, bits, per_channel)
            elif isinstance(module, nn.Embedding):
                new = PrecisionEmbedding.from_embedding(module, bits, per_channel)
            else:
                raise TypeError(f"{name} is a {type(module).__name__}, not a Linear or an Embedding")
            _set_module(out, name, new)
    return out


def check_stored_integers(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse stored weights that do not fit the bits their layer is recorded with.

    ``model`` is the structure rebuilt from the recorded policy, ``state`` the saved tensors.
    Without this, a 16-bit layer recorded as 8 would have its int16 values wrapped into int8
    by ``load_state_dict``. Packed int4 bytes hold only values in [-8, 7], so they always fit.
    """
    for name, module in model.named_modules():
        stored = state.get(f"{name}.qweight") if isinstance(module, _StoredWeight) else None
        if stored is None or (module.bits == 4 and stored.dtype == torch.uint8):
            continue
        if not stored.is_floating_point() and stored.numel():
            lo, hi = int(stored.min()), int(stored.max())
            if lo < qmin(module.bits) or hi > qmax(module.bits):
                raise ValueError(f"{where}: layer {name} is recorded as {module.bits}-bit, but its stored integers "
                                 f"span [{lo}, {hi}], outside [{qmin(module.bits)}, {qmax(module.bits)}]")
        if stored.dtype != module.qweight.dtype:
            raise ValueError(f"{where}: layer {name} is recorded as {module.bits}-bit ({module.qweight.dtype}), but "
                             f"its weights are stored as {stored.dtype}")


def apply_mixed(model: nn.Module, groups: Groups, controller: GumbelController, per_channel: bool = True) -> nn.Module:
    """A copy of ``model`` for the search: each grouped layer wrapped in ``MixedPrecisionLinear``
    (``MixedPrecisionEmbedding``) tied to ``controller``. The copy's float weights are its
    own parameters; ``controller`` is shared, not copied."""
    _check_groups(controller.groups, groups)
    out = copy.deepcopy(model)
    for group in controller.groups:
        for name, _ in groups[group]:
            module = out.get_submodule(name)
            wrapper = MixedPrecisionEmbedding if isinstance(module, nn.Embedding) else MixedPrecisionLinear
            _set_module(out, name, wrapper(module, controller, group, per_channel))
    return out


# ---------------------------------------------------------------- sensitivity (Algorithm 1, line 8)

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


def _rank_fraction(scores: Mapping[str, float]) -> torch.Tensor:
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
    r = _rank_fraction(scores)
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
