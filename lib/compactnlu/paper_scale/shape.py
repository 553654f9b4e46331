"""The study's model class at XLM-R-base's shape, and how long one measurement times it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import MultiTaskNLU, NLUConfig

PAPER_LAYERS = 12
# The study's heads (MASSIVE: 60 intents, 18 scenarios, 55 slot types -> 111 BIO tags).
N_INTENTS, N_DOMAINS, N_SLOT_TYPES = 60, 18, 55
SEED = 0


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 514


XLMR_BASE = Shape(vocab_size=250_002, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
# The smoke profile's stand-in: nbval runs every notebook in seconds there.
SMOKE_SHAPE = Shape(vocab_size=2000, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class Settings:
    """What one measurement builds and how long it times it."""
    shape: Shape
    repeats: int  # interleaved timed passes of the batch of 32, median reported
    singles: int  # batch-1 examples, interleaved one by one, median reported
    calibration_batches: int = 4  # static PTQ: random-token batches of 8
    batch_size: int = 32
    threads: int = 2
    seed: int = SEED


def paper_shape(profile) -> Shape:
    """XLM-R-base's shape for the default and paper profiles; a small stand-in for smoke."""
    return SMOKE_SHAPE if profile.name == "smoke" else XLMR_BASE


def settings_for(profile) -> Settings:
    """The shape and the repeats. At XLM-R-base's shape building the 11 variants takes about
    4.5 minutes on a busy 2-core machine, and one interleaved round about 50 s at batch 32 and
    25 s at batch 1 (the paper's path dequantizes every weight on every call: 3-12 s a call);
    3 repeats and 3 batch-1 examples keep the notebook near 8 minutes there. The smoke stand-in
    runs on one thread: its times mean nothing, and on a busy 2-core machine two torch threads
    wait for each other at every small operator (the smoke notebook took 65 s so, 15 s on one)."""
    if profile.name == "smoke":
        return Settings(shape=SMOKE_SHAPE, repeats=2, singles=2, calibration_batches=2, threads=1)
    return Settings(shape=paper_shape(profile), repeats=3, singles=3)


def placeholder_tags(n_slot_types: int = N_SLOT_TYPES) -> tuple[str, ...]:
    """BIO tags of the study's size (``O`` plus B-/I- per slot type); names do not change sizes."""
    return ("O",) + tuple(f"{p}-slot{i:02d}" for i in range(n_slot_types) for p in ("B", "I"))


def paper_config(shape: Shape, pooling: str = "max") -> NLUConfig:
    """The study's model config at ``shape`` (XLM-R's special ids: <s> 0, <pad> 1, </s> 2)."""
    encoder = {"vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
               "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
               "intermediate_size": shape.intermediate_size, "max_position_embeddings": shape.max_positions,
               "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
               "layer_norm_eps": 1e-5}
    return NLUConfig(n_intents=N_INTENTS, n_domains=N_DOMAINS, tags=placeholder_tags(), pooling=pooling,
                     encoder=encoder)


def build_model(shape: Shape, pooling: str = "max", seed: int = SEED) -> MultiTaskNLU:
    """``MultiTaskNLU`` at ``shape`` with seeded random weights (XLM-R's initialisation), eval mode."""
    torch.manual_seed(seed)
    return MultiTaskNLU(paper_config(shape, pooling)).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
