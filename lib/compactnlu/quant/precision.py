"""Precision-controlled task-specific PTQ (the paper's Sec. 4.2.3 and Algorithm 1): the method.

The pieces, one module each: the quantizer (``quantizer``), the exported layers that hold
weights in 4, 8 or 16 bits (``stored``), the controller and search-time layers
(``controller``), the model's precision groups and how a policy reaches their modules
(``groups``), sensitivity (``sensitivity``) and the search (``search``). This module is the
method's handler: a policy applied to a model, saved as ``model.safetensors`` (plain integer
and float tensors) and rebuilt from the recorded policy on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..artifacts import read_safetensors
from ..model import MultiTaskNLU, NLUConfig
from .common import TorchModelMethod, load_state
from .groups import apply_policy, check_stored_integers, layer_bits, precision_groups
from .method import DETAILS_FILE, skeleton, write_config
from .stored import stored_layers

# What quantization.json must record to rebuild the structure (besides the method's own details).
STRUCTURE = ("policy", "per_channel", "per_layer", "embedding")


def export_policy(model: nn.Module, policy: Mapping[str, int], per_layer: bool = True, embedding: bool = True,
                  per_channel: bool = True) -> nn.Module:
    """``model`` with ``policy`` applied to its trained weights as they are (plain PTQ)."""
    groups = precision_groups(model, per_layer=per_layer, embedding=embedding)
    return apply_policy(model, policy, groups, per_channel=per_channel).eval()


def precision_structure(model: MultiTaskNLU, details: dict, source: Path) -> MultiTaskNLU:
    """The stored layers of the recorded policy in place on the float ``model`` (to load weights into)."""
    try:
        groups = precision_groups(model, per_layer=details["per_layer"], embedding=details["embedding"])
        return apply_policy(model, details["policy"], groups, per_channel=details["per_channel"])
    except (KeyError, TypeError, ValueError) as error:  # a missing field, an unknown group, bad bits
        raise ValueError(f"{source}: cannot rebuild the precision structure: {error!r}") from None


class PrecisionPTQ(TorchModelMethod):
    """Saved as ``model.safetensors``; ``details`` must carry ``STRUCTURE``. Loads back as a
    ``MultiTaskNLU`` with ``PrecisionLinear``/``PrecisionEmbedding`` layers (the paper's path;
    ``fast.to_fast`` puts it on fast kernels), its stored integers checked against the bits
    each layer is recorded with."""

    name = "precision"
    weights = "model.safetensors"
    quantize = staticmethod(export_policy)

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
