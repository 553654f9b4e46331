"""The precision policy notebook 07 selected, mapped by relative depth onto a deeper model."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pandas as pd

from .. import variants
from ..model import MultiTaskNLU
from ..quant import PrecisionConfig, precision_groups, read_config

# When notebook 07 has not registered ``kd_pcptq`` (tests, or 07 not run): the policy the
# default profile's run selected (figures/pcptq_policies.png, "sensitivity"), as 2 layers.
DEFAULT_POLICY = {"embedding": 4, "layer0.attention": 4, "layer1.attention": 4, "layer0.mlp": 8,
                  "layer1.mlp": 8, "head.id": 16, "head.dc": 16, "head.sf": 8}
DEFAULT_POLICY_SOURCE = ("stated default: kd_pcptq of the committed default-profile run (embedding and attention "
                         "4-bit, MLP 8-bit, ID and DC heads 16-bit, SF head 8-bit); no kd_pcptq artifact registered "
                         "for this profile")

_LAYER_GROUP = re.compile(r"layer(\d+)\.(.+)")  # a per-layer group name: layer index, component


@dataclass
class StudyPolicy:
    config: PrecisionConfig  # the policy with its bits for the study's encoder
    source: str  # where it came from


def study_policy(profile) -> StudyPolicy:
    """The policy notebook 07 selected (the settings ``kd_pcptq``'s artifact was made with), or
    ``DEFAULT_POLICY`` when that variant is not registered for ``profile``."""
    try:
        folder = variants.folder_of(profile, "kd_pcptq")
        config = read_config(folder)
    except (KeyError, FileNotFoundError):
        return StudyPolicy(PrecisionConfig(DEFAULT_POLICY, per_channel=True, per_layer=True, embedding=True),
                           DEFAULT_POLICY_SOURCE)
    return StudyPolicy(config, f"kd_pcptq registered by notebook 07 ({folder.name}, {config.label})")


def policy_layers(policy: dict[str, int]) -> int:
    """How many encoder layers a per-layer policy covers (0 for a shared or head-only one)."""
    found = [int(m.group(1)) for m in map(_LAYER_GROUP.fullmatch, policy) if m]
    return max(found) + 1 if found else 0


def map_policy(policy: dict[str, int], target_layers: int) -> dict[str, int]:
    """``policy`` onto a model of ``target_layers`` encoder layers by relative depth: target layer
    ``l`` takes study layer ``floor(l * L_study / target_layers)``, for each component; groups
    that are not per layer (heads, embedding, pooler, shared attention/mlp) keep their names."""
    study_layers = policy_layers(policy)
    mapped = {g: b for g, b in policy.items() if not _LAYER_GROUP.fullmatch(g)}
    kinds = sorted({m.group(2) for m in map(_LAYER_GROUP.fullmatch, policy) if m})
    for layer in range(target_layers if study_layers else 0):
        source = layer * study_layers // target_layers
        for kind in kinds:
            bits = policy.get(f"layer{source}.{kind}")
            if bits is not None:
                mapped[f"layer{layer}.{kind}"] = bits
    return mapped


def mapped(config: PrecisionConfig, target_layers: int) -> PrecisionConfig:
    """``config`` with its bits mapped onto ``target_layers`` encoder layers (:func:`map_policy`);
    a policy shared by the layers fits any depth as it is."""
    return replace(config, policy=map_policy(config.policy, target_layers)) if config.per_layer else config


def mapped_policy_table(policy: dict[str, int]) -> pd.DataFrame:
    """Bits as component x layer (numeric layer order; heads and embedding in ``all``)."""
    rows = []
    for group, bits in policy.items():
        m = _LAYER_GROUP.fullmatch(group)
        rows.append({"component": m.group(2) if m else group, "layer": int(m.group(1)) if m else "all", "bits": bits})
    table = pd.DataFrame(rows).pivot(index="component", columns="layer", values="bits")
    order = sorted(table.columns, key=lambda c: (c == "all", c if c != "all" else 0))
    return table[order]


def uniform(model: MultiTaskNLU, bits: int) -> PrecisionConfig:
    """Every precision group (per layer, word embedding included) at ``bits``."""
    policy = {g: bits for g in precision_groups(model, per_layer=True, embedding=True)}
    return PrecisionConfig(policy, per_channel=True, per_layer=True, embedding=True, kind="uniform", bits=bits)
