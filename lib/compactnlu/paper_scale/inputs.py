"""The random-token batches a measurement times and calibrates on, at the study's median length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..features import load_study_data
from .shape import Settings, Shape

DEFAULT_TOKENS = 24  # tokens per example when the study's data is not built (MASSIVE's median, about)


def median_tokens(profile) -> tuple[int, str]:
    """The composed test split's median ``input_ids`` length, and where it came from; ``DEFAULT_TOKENS``
    when the study's data is not built."""
    try:
        test = load_study_data(profile).features["test"]
    except FileNotFoundError:
        return DEFAULT_TOKENS, f"stated default ({DEFAULT_TOKENS}): the study's data is not built"
    lengths = [len(ids) for ids in test["input_ids"]]
    return int(np.median(lengths)), f"median input_ids length of the composed test split ({len(lengths)} examples)"


def random_batch(shape: Shape, batch_size: int, n_tokens: int, seed: int) -> dict:
    """``<s> random tokens </s>``, no padding; every inner token starts a word (the CRF decodes
    ``n_tokens - 2`` words per row: at most the real work, the same for every variant)."""
    if not 3 <= n_tokens <= shape.max_positions - 2:  # XLM-R counts positions from pad + 1
        raise ValueError(f"n_tokens must lie in 3..{shape.max_positions - 2}, got {n_tokens}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape.vocab_size, (batch_size, n_tokens), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    word_mask = torch.zeros(batch_size, n_tokens, dtype=torch.bool)
    word_mask[:, 1:-1] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "word_mask": word_mask}


@dataclass
class Inputs:
    n_tokens: int
    tokens_source: str
    batch32: dict
    singles: list[dict]
    calibration: list[dict]


def make_inputs(settings: Settings, n_tokens: int, tokens_source: str) -> Inputs:
    """The timed batch of ``batch_size``, the batch-1 examples and the calibration batches
    (each from its own seed, so calibration never sees the timed batches)."""
    shape, seed = settings.shape, settings.seed
    return Inputs(
        n_tokens=n_tokens, tokens_source=tokens_source,
        batch32=random_batch(shape, settings.batch_size, n_tokens, seed + 1),
        singles=[random_batch(shape, 1, n_tokens, seed + 100 + i) for i in range(settings.singles)],
        calibration=[random_batch(shape, 8, n_tokens, seed + 1000 + i) for i in range(settings.calibration_batches)])
