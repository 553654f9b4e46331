"""What every runnable variant of the study offers, what it returns, and the one decision rule.

A variant (the float model, its quantized and fast copies, the ONNX Runtime session) is an
:class:`NLUModel`: called on ``input_ids`` and ``attention_mask`` it returns an
:class:`NLUOutput`, and ``decode_slots`` runs the CRF's Viterbi on its slot logits.
:func:`decide` turns an output into the study's decisions (``quant.fast.agreement`` compares
two variants by it), and :func:`infer` a batch into its output and decisions: scoring
(``metrics.predict``), timing (``bench``) and ``inference.predict`` all answer through
:func:`infer`, so what is timed is what is scored.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers.utils import ModelOutput

THRESHOLD = 0.5  # ID and DC: every label whose sigmoid is at least this
# The slot label of every subword but a word's first (and of padding): torch's default ignore
# index. ``features.IGNORE``, which writes it, holds the same value (a test checks): features is a
# lower layer, so it cannot import it from here, and importing it from features would load the
# data stack (datasets, sentencepiece) with every model.
IGNORE = -100


@dataclass
class NLUOutput(ModelOutput):
    """A forward pass's results; a field a model does not compute is None (and absent from
    the mapping view, so ``"loss" in out`` and ``out["intent_logits"]`` work as on a dict).

    ``hidden`` (``[B, S, H]``) and ``pooled`` (``[B, H]``) are the encoder's states that
    distillation reads; an ONNX Runtime session returns only the logits. ``losses`` holds
    each task's loss, ``loss`` their weighted sum (what the Trainer minimises)."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    intent_logits: torch.Tensor | None = None  # [B, n_intents]
    domain_logits: torch.Tensor | None = None  # [B, n_domains]
    slot_logits: torch.Tensor | None = None  # [B, S, n_tags], one row per subword
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


@runtime_checkable
class NLUModel(Protocol):
    """What the study's callers use of a variant (``isinstance`` checks the names only)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """The heads it has, in ``model.TASKS`` order ("id", "dc", "sf")."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **labels) -> NLUOutput:
        """Logits of its tasks (and losses, for a trainable model given labels)."""

    def decode_slots(self, slot_logits: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        """Viterbi tag ids of each example's words (``word_mask``: first subword of each word)."""

    def eval(self) -> "NLUModel":
        """Inference mode (dropout off); returns the model."""


@dataclass
class Decisions:
    """What a variant answers for a batch: ``intents`` and ``domains`` as boolean ``[B, L]``
    indicators of the chosen labels, ``slots`` the tag ids of each example's words; None for a
    task the model lacks."""

    intents: torch.Tensor | None = None
    domains: torch.Tensor | None = None
    slots: list[list[int]] | None = None

    def named(self, intents, domains, tags, n_words: list[int]) -> list[dict]:
        """Each example's decisions as label names: ``intents``, ``domains`` and ``tags``, one tag
        for each of its ``n_words`` words (a word cut off by truncation has none: "O"); a task the
        model lacks is absent."""
        rows: list[dict] = [{} for _ in n_words]
        for key, chosen, names in (("intents", self.intents, intents), ("domains", self.domains, domains)):
            if chosen is not None:
                for row, chosen_ids in zip(rows, label_sets(chosen)):
                    row[key] = [names[k] for k in chosen_ids]
        if self.slots is not None:
            for row, path, n in zip(rows, self.slots, n_words):
                row["tags"] = [tags[t] for t in path] + ["O"] * (n - len(path))
        return rows


def check_threshold(threshold) -> float:
    """``threshold`` as a float; anything but a finite number in (0, 1) is a ValueError: at 0 or
    below every label is chosen, at 1 or above none is, and NaN chooses none silently."""
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
            or not math.isfinite(threshold) or not 0 < threshold < 1):
        raise ValueError(f"threshold={threshold!r} is out of range; allowed: a finite number "
                         f"with 0 < threshold < 1")
    return float(threshold)


def choose_labels(probs: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """The multi-label rule: every label with probability at least ``threshold``, and the most
    probable one (the first, on a tie) where none is. Boolean ``[B, L]``; ``probs`` is left as is."""
    threshold = check_threshold(threshold)
    chosen = probs >= threshold
    chosen[torch.arange(len(probs)), probs.argmax(1)] |= ~chosen.any(1)
    return chosen


def label_sets(chosen: torch.Tensor) -> list[list[int]]:
    """Boolean ``[B, L]`` indicators as each row's label indices, ascending."""
    return [np.flatnonzero(row).tolist() for row in chosen.numpy()]


def decide_sets(probs: np.ndarray, threshold: float = THRESHOLD) -> list[list[int]]:
    """:func:`choose_labels` on probabilities from elsewhere (the classic reference's), as index lists."""
    return label_sets(choose_labels(torch.as_tensor(probs), threshold))


def decide(output: NLUOutput, word_mask: torch.Tensor | None, model: NLUModel,
           threshold: float = THRESHOLD) -> Decisions:
    """The study's decisions from one batch's ``output`` of ``model``: ID and DC label sets by
    :func:`choose_labels` on the sigmoids, SF by ``model.decode_slots`` over ``word_mask``."""
    threshold = check_threshold(threshold)  # also for a model without ID and DC heads
    return Decisions(
        intents=None if output.intent_logits is None else choose_labels(torch.sigmoid(output.intent_logits), threshold),
        domains=None if output.domain_logits is None else choose_labels(torch.sigmoid(output.domain_logits), threshold),
        slots=None if output.slot_logits is None else model.decode_slots(output.slot_logits, word_mask))


@torch.no_grad()
def infer(model: NLUModel, batch: dict, threshold: float = THRESHOLD, **labels) -> tuple[NLUOutput, Decisions]:
    """The study's one way to answer a batch: the forward pass on its ``input_ids`` and
    ``attention_mask``, then :func:`decide` over its ``word_mask`` (the first subword of each
    word; a model without SF needs none). ``labels`` go to the forward pass, for a loss when
    scoring; the benchmark passes none, so a timed pass is the forward and the decisions only."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **labels)
    return output, decide(output, batch.get("word_mask"), model, threshold)
