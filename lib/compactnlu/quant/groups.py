"""The precision groups of a ``MultiTaskNLU`` and how a policy reaches its modules.

A policy is ``group -> bits``; ``layer_bits`` expands it to ``module name -> bits`` (what
torchao's ``FqnToConfig`` maps: fully qualified module names to a setting), and
``apply_policy`` / ``apply_mixed`` swap exactly those modules. The module paths of the
study's encoder (Hugging Face's BERT/XLM-R layout) are stated once, in ``LAYER_MEMBERS``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..model import assert_finite
from .controller import GumbelController, MixedPrecisionEmbedding, MixedPrecisionLinear
from .quantizer import qmax, qmin
from .stored import PrecisionEmbedding, PrecisionLinear, StoredWeight

Groups = dict[str, list[tuple[str, nn.Module]]]

ENCODER_LAYER = "encoder.encoder.layer.{i}"
# Per encoder layer, the linear layers of each component (attention: Q, K, V and its output projection).
LAYER_MEMBERS = {"attention": ("attention.self.query", "attention.self.key", "attention.self.value",
                               "attention.output.dense"),
                 "mlp": ("intermediate.dense", "output.dense")}
WORD_EMBEDDINGS = "encoder.embeddings.word_embeddings"
POOLER = "encoder.pooler.dense"


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
        add("embedding", WORD_EMBEDDINGS)
    for i in range(len(model.encoder.encoder.layer)):
        prefix = ENCODER_LAYER.format(i=i)
        for kind, names in LAYER_MEMBERS.items():
            for name in names:
                add(f"layer{i}.{kind}" if per_layer else kind, f"{prefix}.{name}")
    if getattr(model.encoder, "pooler", None) is not None:
        add("pooler", POOLER)
    for task in model.tasks:
        add(f"head.{task}", f"{task}_head")
    return groups


def group_param_counts(groups: Groups) -> dict[str, int]:
    """Weight elements per group (biases stay float, so they are not counted)."""
    return {g: sum(m.weight.numel() for _, m in members) for g, members in groups.items()}


def check_groups(names: Iterable[str], groups: Groups) -> None:
    unknown = [g for g in names if g not in groups]
    if unknown:
        raise KeyError(f"unknown groups {unknown}")


def layer_bits(policy: Mapping[str, int], groups: Groups) -> dict[str, int]:
    """``policy`` (group -> bits) as module name -> bits, in the groups' order."""
    check_groups(policy, groups)
    return {name: bits for group, bits in policy.items() for name, _ in groups[group]}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def stored_module(module: nn.Module, bits: int, per_channel: bool, name: str) -> StoredWeight:
    """``module`` (a float layer or a search-time wrapper, which gives up its float layer) in ``bits``."""
    if isinstance(module, MixedPrecisionLinear):
        module = module.linear
    elif isinstance(module, MixedPrecisionEmbedding):
        module = module.embedding
    if isinstance(module, nn.Linear):
        return PrecisionLinear.from_linear(module, bits, per_channel)
    if isinstance(module, nn.Embedding):
        return PrecisionEmbedding.from_embedding(module, bits, per_channel)
    raise TypeError(f"{name} is a {type(module).__name__}, not a Linear or an Embedding")


def apply_policy(model: nn.Module, policy: Mapping[str, int], groups: Groups, per_channel: bool = True) -> nn.Module:
    """A copy of ``model`` with each grouped ``nn.Linear`` (``nn.Embedding``) replaced by a
    ``PrecisionLinear`` (``PrecisionEmbedding``) at its group's bits; groups absent from
    ``policy`` stay float. ``model`` may be the float model or ``apply_mixed``'s search
    copy (its wrappers give up their float layers, as trained). The original is left as it is.
    NaN or inf anywhere in ``model`` is a ValueError naming the tensor."""
    bits_of = layer_bits(policy, groups)
    assert_finite(model.state_dict(), "apply_policy")
    out = copy.deepcopy(model)
    for name, bits in bits_of.items():
        set_module(out, name, stored_module(out.get_submodule(name), bits, per_channel, name))
    return out


def apply_mixed(model: nn.Module, groups: Groups, controller: GumbelController, per_channel: bool = True) -> nn.Module:
    """A copy of ``model`` for the search: each grouped layer wrapped in ``MixedPrecisionLinear``
    (``MixedPrecisionEmbedding``) tied to ``controller``. The copy's float weights are its
    own parameters; ``controller`` is shared, not copied."""
    check_groups(controller.groups, groups)
    out = copy.deepcopy(model)
    for group in controller.groups:
        for name, _ in groups[group]:
            module = out.get_submodule(name)
            wrapper = MixedPrecisionEmbedding if isinstance(module, nn.Embedding) else MixedPrecisionLinear
            set_module(out, name, wrapper(module, controller, group, per_channel))
    return out


def check_stored_integers(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse stored weights that do not fit the bits their layer is recorded with.

    ``model`` is the structure rebuilt from the recorded policy, ``state`` the saved tensors.
    Without this, a 16-bit layer recorded as 8 would have its int16 values wrapped into int8
    by ``load_state_dict``. Packed int4 bytes hold only values in [-8, 7], so they always fit.
    """
    for name, module in model.named_modules():
        stored = state.get(f"{name}.qweight") if isinstance(module, StoredWeight) else None
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
