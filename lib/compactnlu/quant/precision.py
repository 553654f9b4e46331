"""Precision-controlled task-specific PTQ (the paper's Sec. 4.2.3 and Algorithm 1): the method.

The pieces, one module each: the quantizer (``quantizer``), the exported layers that hold
weights in 4, 8 or 16 bits (``stored``), the controller and search-time layers
(``controller``), the model's precision groups and how a policy reaches their modules
(``groups``), sensitivity (``sensitivity``) and the search (``search``). This module is the
method's handler: a policy applied to a model, saved as ``model.safetensors`` (plain integer
and float tensors) and rebuilt from the recorded policy on load; and the method's settings,
``PrecisionConfig``: how the bits are chosen and, once chosen for a model, the bits of each group.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..artifacts import read_safetensors
from ..model import MultiTaskNLU, NLUConfig
from .common import TorchModelMethod, load_state
from .groups import apply_policy, check_stored_integers, layer_bits, precision_groups
from .method import DETAILS_FILE, MethodConfig, skeleton, write_config
from .quantizer import check_bits
from .stored import stored_layers

# What quantization.json must record to rebuild the structure (besides the method's own details).
STRUCTURE = ("policy", "per_channel", "per_layer", "embedding")
# How a policy's bits are chosen: Algorithm 1's search at a λ, one width for every group,
# the sensitivity score alone, or bits given as they are.
KINDS = ("searched", "uniform", "sensitivity", "given")


@dataclass(frozen=True)
class PrecisionConfig(MethodConfig):
    """A precision policy. ``policy`` (bits per group) is None until the policy is chosen for a
    model: a searched or sensitivity-only policy gives each trained model bits of its own."""

    policy: Mapping[str, int] | None
    per_channel: bool  # one weight scale per output row (False: per tensor)
    per_layer: bool  # one decision per encoder layer, or one shared by the layers
    embedding: bool  # the word embedding is a group of its own
    kind: str = "given"  # one of KINDS
    lam: float | None = None  # searched: the weight of the size cost
    bits: int | None = None  # uniform: every group's width

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for flag in ("per_channel", "per_layer", "embedding"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        searched = self.kind == "searched"
        if searched != (self.lam is not None) or searched and not (
                isinstance(self.lam, numbers.Real) and not isinstance(self.lam, bool) and self.lam >= 0):
            raise ValueError(f"lam={self.lam!r}: a searched policy needs a λ >= 0, any other kind none")
        if (self.kind == "uniform") != (self.bits is not None):
            raise ValueError(f"bits={self.bits!r}: a uniform policy needs a width, any other kind none")
        if self.bits is not None:
            object.__setattr__(self, "bits", check_bits(self.bits))
        if self.policy is None and self.kind == "given":
            raise ValueError("policy: a given policy needs its bits per group")
        if self.policy is not None:
            try:
                policy = {str(group): check_bits(bits) for group, bits in dict(self.policy).items()}
            except (TypeError, ValueError) as error:
                raise ValueError(f"policy must map each group to a bit-width in 2..16: {error}") from None
            if self.bits is not None and set(policy.values()) - {self.bits}:
                raise ValueError(f"policy: a uniform {self.bits}-bit policy gives every group {self.bits} bits")
            object.__setattr__(self, "policy", policy)

    @property
    def label(self) -> str:
        """How tables and file names show it: ``lambda=0.25``, ``uniform-4``, ``sensitivity``, ``given``."""
        if self.kind == "searched":
            return f"lambda={self.lam:g}"
        return f"uniform-{self.bits}" if self.kind == "uniform" else self.kind

    def for_model(self, policy: Mapping[str, int]) -> "PrecisionConfig":
        """This choice with the bits it gave one model."""
        return replace(self, policy=policy)

    def choice(self) -> "PrecisionConfig":
        """How the bits are chosen, without the bits one model got (what another model is given)."""
        return self if self.kind == "given" else replace(self, policy=None)

    def structure(self) -> dict:
        """What rebuilds the stored layers on load (``STRUCTURE``)."""
        if self.policy is None:
            raise ValueError(f"the {self.label} policy has no bits yet: it is chosen for a model first")
        return {"policy": dict(self.policy), "per_channel": self.per_channel, "per_layer": self.per_layer,
                "embedding": self.embedding}


def export_policy(model: nn.Module, policy: Mapping[str, int], per_layer: bool = True, embedding: bool = True,
                  per_channel: bool = True) -> nn.Module:
    """``model`` with ``policy`` applied to its trained weights as they are (plain PTQ)."""
    groups = precision_groups(model, per_layer=per_layer, embedding=embedding)
    return apply_policy(model, policy, groups, per_channel=per_channel).eval()


def apply_config(model: nn.Module, config: PrecisionConfig) -> nn.Module:
    """``model`` with ``config``'s bits applied to its trained weights as they are."""
    structure = config.structure()
    return export_policy(model, structure["policy"], config.per_layer, config.embedding, config.per_channel)


def precision_structure(model: MultiTaskNLU, details: dict, source: Path) -> MultiTaskNLU:
    """The stored layers of the recorded policy in place on the float ``model`` (to load weights into)."""
    try:
        config = PrecisionConfig.from_record(details)
        groups = precision_groups(model, per_layer=config.per_layer, embedding=config.embedding)
        return apply_policy(model, config.structure()["policy"], groups, per_channel=config.per_channel)
    except (KeyError, TypeError, ValueError) as error:  # a missing field, an unknown group, bad bits
        raise ValueError(f"{source}: cannot rebuild the precision structure: {error!r}") from None


class PrecisionPTQ(TorchModelMethod):
    """Saved as ``model.safetensors``; ``details`` must carry ``STRUCTURE``. Loads back as a
    ``MultiTaskNLU`` with ``PrecisionLinear``/``PrecisionEmbedding`` layers (the paper's path;
    ``fast.to_fast`` puts it on fast kernels), its stored integers checked against the bits
    each layer is recorded with."""

    name = "precision"
    config = PrecisionConfig
    weights = "model.safetensors"

    def check(self, model: MultiTaskNLU, folder: Path, details: dict) -> None:
        """Refuse details that could not rebuild ``model`` on load: a ``STRUCTURE`` field missing,
        or a policy whose bits (or scale layout) are not the model's stored layers'."""
        super().check(model, folder, details)
        missing = [key for key in STRUCTURE if key not in details]
        if missing:
            raise ValueError(f"saving {folder}: the precision details must record {STRUCTURE}; missing {missing}")
        try:
            groups = precision_groups(model, per_layer=details["per_layer"], embedding=details["embedding"])
            recorded = {name: (bits, bool(details["per_channel"]))
                        for name, bits in layer_bits(details["policy"], groups).items()}
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"saving {folder}: the recorded policy does not fit the model: {error!r}") from None
        stored = {name: (layer.bits, layer.per_channel) for name, layer in stored_layers(model).items()}
        if recorded != stored:
            differ = sorted(set(recorded.items()) ^ set(stored.items()))[0][0]
            raise ValueError(f"saving {folder}: the recorded policy does not describe the model: {differ} is "
                             f"{stored.get(differ, 'float')} (bits, per channel) in the model, "
                             f"{recorded.get(differ, 'float')} in the details")

    def write(self, model: MultiTaskNLU, tmp: Path, details: dict) -> dict:
        write_config(model, tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / self.weights)
        return details

    def read_state(self, weights: Path) -> dict:
        return read_safetensors(weights)

    def load(self, folder: Path, config: NLUConfig, details: dict) -> MultiTaskNLU:
        state, weights = self.checked_state(folder)
        model = precision_structure(skeleton(config), details, folder / DETAILS_FILE)
        check_stored_integers(model, state, str(weights))
        return load_state(model, state, weights)
