"""The teachers' outputs on a split, computed once and cached for distillation and the PTQ search.

Each teacher runs once over a split; its ID/DC logits, its SF emissions and its hidden states at
the first subword of every word are saved (float16, safetensors) under
``artifacts/teacher_cache/<split>-<key>``, keyed by the features and every teacher's weights
(a retrained teacher invalidates it; every training seed's student shares it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .artifacts import atomic_dir, sha256_file
from .cachekeys import artifact_dir
from .config import Profile
from .features import IGNORE
from .model import MultiTaskNLU


@torch.no_grad()
def teacher_outputs(model: MultiTaskNLU, dataset, collator, batch_size: int = 128, desc: str = "teacher"):
    """Per-example logits and per-word emissions and hidden states of one teacher (float16)."""
    model.eval()
    n = len(dataset)
    words = np.asarray([sum(1 for x in row if x != IGNORE) for row in dataset["slot_labels"][:]])
    offsets = np.concatenate([[0], np.cumsum(words)])
    out: dict[str, torch.Tensor] = {}
    for idx in tqdm(by_length(dataset, batch_size), desc=desc, leave=False):
        batch = collator([dataset[i] for i in idx])
        result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        word_mask = batch["slot_labels"] != IGNORE
        for name, key in (("intent_logits", "id"), ("domain_logits", "dc")):
            if name in result:
                out.setdefault(key, torch.empty(n, result[name].shape[1], dtype=torch.float16))[idx] = \
                    result[name].half()
        if "slot_logits" in result:
            rows = torch.from_numpy(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]))
            emissions = result["slot_logits"][word_mask]
            hidden = result["hidden"][word_mask]
            out.setdefault("sf", torch.empty(offsets[-1], emissions.shape[1], dtype=torch.float16))[rows] = \
                emissions.half()
            out.setdefault("hidden", torch.empty(offsets[-1], hidden.shape[1], dtype=torch.float16))[rows] = \
                hidden.half()
    out["word_offsets"] = torch.from_numpy(offsets)
    return out


def by_length(dataset, batch_size: int) -> list[list[int]]:
    """Batches of example indices of similar length (fewer padded positions than dataset order:
    a batch of 128 in dataset order pads to its longest example, about twice the median)."""
    order = np.argsort(np.asarray(dataset["n_subwords"][:]), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def teacher_outputs_dir(profile: Profile, teachers: dict, split: str, n_examples: int) -> Path:
    """``artifacts/teacher_cache/<split>-<key>``; ``teachers`` maps a name to an object with ``.path``."""
    weights = {name: sha256_file(Path(t.path) / "model.safetensors") for name, t in sorted(teachers.items())}
    return artifact_dir(profile, "teacher_outputs", split, {"teachers": weights, "split": split, "n": n_examples})


def cached_teacher_outputs(profile: Profile, teachers: dict, data, split: str, collator) -> dict[str, dict]:
    """Teacher outputs on ``split``, from the cache when there, else computed and saved.

    ``teachers`` maps a name to an object with ``.model`` and ``.path`` (a TrainedModel).
    """
    dataset = data.features[split]
    folder = teacher_outputs_dir(profile, teachers, split, len(dataset))
    if not folder.exists():
        with atomic_dir(folder) as tmp:
            for name, teacher in teachers.items():
                save_file({k: v.contiguous() for k, v in
                           teacher_outputs(teacher.model, dataset, collator, desc=f"{name} on {split}").items()},
                          tmp / f"{name}.safetensors")
    return {name: load_file(folder / f"{name}.safetensors") for name in teachers}
