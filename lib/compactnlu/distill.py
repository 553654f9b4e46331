"""Multi-teacher distillation: the student, its loss and its training (the loss's pieces: ``kd_losses``).

The student learns from the three task-pair teachers with

    L = α·w_ID(CE_ID + KD_ID) + β·w_DC(CE_DC + KD_DC) + γ·w_SF(CE_SF + KD_SF + MSE_SF + CRD_SF)

where α, β, γ are the paper's and ``w`` the profile's ``loss_weights``, the same per-task
scales the baseline and the teachers train with (ID and DC losses are means over 60 and 18
labels, SF's a mean over words; see ``Profile.loss_weights``).

* **Offline teachers.** Each teacher runs once over a split; its ID/DC logits, its SF
  emissions and its hidden states at the first subword of every word are cached
  (``compactnlu.teacher_cache``) and reused.
* **Fusion.** Each task is known by two teachers. Their outputs are combined with weights
  ``softmax_j(v · tanh(W_s h + W_t o_j))`` computed per example (per word for SF) from the
  student's representation ``h`` and each teacher's output ``o_j``, trained with the
  student; ``fusion="mean"`` averages the two instead. The fusion is trained to make the
  *fused teacher* right (its own BCE/CE against the gold labels), and the distillation
  terms see its weights as constants: trained on the KD loss itself, the attention would
  learn to point at whichever teacher the student finds easiest to copy.
* **Adaptive temperature.** ``T_i = T · (0.5 + c_i)`` where ``c_i ∈ [0, 1]`` is the fused
  teacher's confidence on example (or word) ``i``: ``mean |2σ(z) − 1|`` over labels for the
  multi-label tasks, the top tag probability for SF. Confident targets are softened more
  (their non-argmax mass is what carries the teacher's knowledge), unsure ones less.
  T = 4 for ID and DC (utterance level), 8 for SF (token level), as in the paper.
* **KD for ID and DC is multi-label**: binary cross-entropy of the student's softened
  sigmoids against the fused teacher's softened sigmoids, scaled by T²; KD for SF is the
  KL divergence between softened tag distributions, scaled by T².
* **MSE_SF** pulls the student's word representations (through a learned projection to
  the teachers' width) to the fused teacher representation; **CRD_SF** is InfoNCE: each
  student word should pick its own fused teacher representation out of all words in the
  batch (cosine similarity / τ).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import set_seed

from . import train
from .artifacts import read_json, read_safetensors, verify_checksums, with_checksums, write_json
from .cachekeys import artifact_dir
from .features import IGNORE
from .interface import NLUOutput
from .model import MultiTaskNLU
from .pretrain import prepare_encoder
from .kd_losses import (TeacherFusion, adaptive_temperature, contrastive_loss, fuse, multilabel_confidence,
                        multilabel_kd, representation_mse, token_kd)
from .teacher_cache import by_length, cached_teacher_outputs
from .train import collator_for, model_details, nlu_config, result_overrides
from .trainer import fit_and_save, training_arguments

log = logging.getLogger(__name__)

# The fusion and projection heads, beside the student, with the record of their SHA-256.
HEADS = "distill_heads.safetensors"
HEADS_RECORD = "distill_heads.json"

# Which teachers know each task.
TASK_TEACHERS = {"id": ("teacher_idsf", "teacher_iddc"), "dc": ("teacher_iddc", "teacher_dcsf"),
                 "sf": ("teacher_idsf", "teacher_dcsf")}


@dataclass
class DistillOutput(NLUOutput):
    """The student's outputs plus what distillation adds: each loss term (``terms``) and the
    fusion's weight of each teacher per task (``fusion_weights``, for notebook 04's figure)."""

    terms: dict[str, torch.Tensor] | None = None
    fusion_weights: dict[str, torch.Tensor] | None = None


@dataclass
class DistillConfig:
    alpha: float = 0.6  # ID
    beta: float = 0.8  # DC
    gamma: float = 0.5  # SF
    temperature_utterance: float = 4.0
    temperature_token: float = 8.0
    adaptive_temperature: bool = True
    fusion: str = "attention"  # or "mean"
    use_kd: bool = True
    use_mse: bool = True
    use_crd: bool = True
    crd_tau: float = 0.1
    crd_max_words: int = 512  # words per batch in the contrastive loss (bounds its cost)
    fusion_hidden: int = 64


# ---------------------------------------------------------------- the student under distillation

class Distiller(nn.Module):
    """The student plus what distillation trains with it (fusion, projection); only the student is kept."""

    def __init__(self, student: MultiTaskNLU, config: DistillConfig, teacher_hidden: int):
        super().__init__()
        self.student, self.config = student, config
        width = student.encoder.config.hidden_size
        nc = student.config
        self.fusion = nn.ModuleDict({
            "id": TeacherFusion(width, nc.n_intents, config.fusion_hidden, config.fusion),
            "dc": TeacherFusion(width, nc.n_domains, config.fusion_hidden, config.fusion),
            "sf": TeacherFusion(width, len(nc.tags) + teacher_hidden, config.fusion_hidden, config.fusion),
        })
        self.projection = nn.Linear(width, teacher_hidden)

    @property
    def tasks(self):
        return self.student.tasks

    def forward(self, input_ids, attention_mask, intent_labels=None, domain_labels=None, slot_labels=None,
                teacher_id=None, teacher_dc=None, teacher_sf=None, teacher_hidden=None, **_):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, intent_labels=intent_labels,
                           domain_labels=domain_labels, slot_labels=slot_labels)
        if teacher_id is None:  # plain evaluation
            return out
        c = self.config
        ce = out["losses"]
        pooled = out["pooled"]
        word_mask = slot_labels != IGNORE
        student_words = out["hidden"][word_mask]  # [Nw, H]
        student_emissions = out["slot_logits"][word_mask]  # [Nw, T]
        terms = {"ce_id": ce["id"], "ce_dc": ce["dc"], "ce_sf": ce["sf"]}
        weights = {}
        if c.use_kd or c.use_mse or c.use_crd:
            trained = {
                "id": self.fusion["id"].weights(pooled.detach(), teacher_id),
                "dc": self.fusion["dc"].weights(pooled.detach(), teacher_dc),
                "sf": self.fusion["sf"].weights(student_words.detach(), torch.cat([teacher_sf, teacher_hidden], -1)),
            }
            if c.fusion == "attention":
                gold_tags = slot_labels[word_mask]
                terms["fusion"] = (
                    F.binary_cross_entropy_with_logits(fuse(trained["id"], teacher_id), intent_labels)
                    + F.binary_cross_entropy_with_logits(fuse(trained["dc"], teacher_dc), domain_labels)
                    + F.cross_entropy(fuse(trained["sf"], teacher_sf), gold_tags))
            weights = {task: w.detach() for task, w in trained.items()}
        if c.use_kd:
            fused_id, fused_dc = fuse(weights["id"], teacher_id), fuse(weights["dc"], teacher_dc)
            fused_sf = fuse(weights["sf"], teacher_sf)
            t_id = adaptive_temperature(c.temperature_utterance, multilabel_confidence(fused_id), c.adaptive_temperature)
            t_dc = adaptive_temperature(c.temperature_utterance, multilabel_confidence(fused_dc), c.adaptive_temperature)
            t_sf = adaptive_temperature(c.temperature_token, fused_sf.softmax(-1).max(-1).values,
                                        c.adaptive_temperature)
            terms["kd_id"] = multilabel_kd(out["intent_logits"], fused_id, t_id.detach())
            terms["kd_dc"] = multilabel_kd(out["domain_logits"], fused_dc, t_dc.detach())
            terms["kd_sf"] = token_kd(student_emissions, fused_sf, t_sf.detach())
        if c.use_mse or c.use_crd:
            fused_hidden = fuse(weights["sf"], teacher_hidden)
            projected = self.projection(student_words)
            if c.use_mse:
                terms["mse_sf"] = representation_mse(projected, fused_hidden)
            if c.use_crd:
                keep = torch.randperm(len(projected), device=projected.device)[:c.crd_max_words]
                terms["crd_sf"] = contrastive_loss(projected[keep], fused_hidden[keep], c.crd_tau)
        w = {t: self.student.config.loss_weights.get(t, 1.0) for t in ("id", "dc", "sf")}  # as every model of the study
        total = (c.alpha * w["id"] * (terms["ce_id"] + terms.get("kd_id", 0))
                 + c.beta * w["dc"] * (terms["ce_dc"] + terms.get("kd_dc", 0))
                 + c.gamma * w["sf"] * (terms["ce_sf"] + terms.get("kd_sf", 0) + terms.get("mse_sf", 0)
                                        + terms.get("crd_sf", 0))
                 + terms.get("fusion", 0))  # touches only the fusion's parameters
        result = DistillOutput()
        for key, value in out.items():  # the student's outputs, in the order the Trainer reads them
            result[key] = value
        result["loss"], result["terms"], result["fusion_weights"] = total, terms, weights
        return result


# ---------------------------------------------------------------- batches and training

class DistillCollator:
    """The study's collator plus the cached teacher outputs of the batch's rows.

    Rows carry their index into the cache (column ``row``); rows without it (dev, test)
    get no teacher tensors, so the same collator serves evaluation.
    """

    def __init__(self, base, cache: dict[str, dict]):
        self.base, self.cache = base, cache
        self.offsets = {name: c["word_offsets"].numpy() for name, c in cache.items() if "word_offsets" in c}

    def _words(self, name: str, key: str, rows) -> torch.Tensor:
        offsets = self.offsets[name]
        index = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
        return self.cache[name][key][torch.from_numpy(index)].float()

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        if "row" not in examples[0]:
            return batch
        rows = [e["row"] for e in examples]
        index = torch.tensor(rows)
        batch["teacher_id"] = torch.stack([self.cache[t]["id"][index].float() for t in TASK_TEACHERS["id"]], 1)
        batch["teacher_dc"] = torch.stack([self.cache[t]["dc"][index].float() for t in TASK_TEACHERS["dc"]], 1)
        batch["teacher_sf"] = torch.stack([self._words(t, "sf", rows) for t in TASK_TEACHERS["sf"]], 1)
        batch["teacher_hidden"] = torch.stack([self._words(t, "hidden", rows) for t in TASK_TEACHERS["sf"]], 1)
        return batch


def teacher_hidden_size(cache: dict[str, dict]) -> int:
    return cache[TASK_TEACHERS["sf"][0]]["hidden"].shape[1]


def attach_rows(dataset):
    return dataset.add_column("row", list(range(len(dataset))))


@torch.no_grad()
def fusion_weights(distiller: "Distiller", data, cache: dict[str, dict], collator, split: str = "test",
                   batch_size: int = 128):
    """Average attention weight of each teacher, per task and locale, on ``split``."""
    distiller.eval()
    dataset = attach_rows(data.features[split])
    collate = DistillCollator(collator, cache)
    locales = np.asarray(dataset["locale"][:])
    records = []
    for idx in tqdm(by_length(dataset, batch_size), desc="fusion weights", leave=False):
        batch = collate([dataset[i] for i in idx])
        out = distiller(**batch)
        word_locale = np.repeat(locales[idx], (batch["slot_labels"] != IGNORE).sum(1).numpy())
        for task, w in out["fusion_weights"].items():
            loc = locales[idx] if task != "sf" else word_locale
            for j, teacher in enumerate(TASK_TEACHERS[task]):
                records.append(pd.DataFrame({"task": task, "teacher": teacher, "locale": loc,
                                             "weight": w[:, j].numpy()}))
    if not records:  # no distillation term uses the teachers, so there is no fusion
        return pd.DataFrame(columns=["task", "teacher", "locale", "weight"])
    frame = pd.concat(records)
    return frame.groupby(["task", "teacher", "locale"], as_index=False)["weight"].mean()


@dataclass
class DistilledModel:
    model: MultiTaskNLU  # the student, all that is deployed
    distiller: Distiller  # the student with its fusion and projection, for analysis
    path: Path
    history: list[dict]
    train_seconds: float


def distill_student(profile, data, teachers: dict, config: DistillConfig | None = None, name: str = "kd",
                    student_overrides: dict | None = None, retrain: bool = False,
                    **argument_overrides) -> DistilledModel:
    """Train (or load) the student from the cached outputs of the three teachers.

    ``student_overrides``: profile fields that size the student (default: the baseline's
    architecture, as in the paper). Epochs and learning rate are the profile's
    ``kd_epochs`` and ``kd_learning_rate``. An interrupted run resumes from its last checkpoint
    that reads back whole, as ``train_model`` does; ``retrain`` starts again from step 0.
    """
    config = config or DistillConfig()
    student_profile = dataclasses.replace(profile, **(student_overrides or {}))
    student_config = nlu_config(student_profile, data)
    overrides = {"num_train_epochs": profile.kd_epochs, "learning_rate": profile.kd_learning_rate,
                 **argument_overrides}
    teacher_folders = sorted(Path(t.path).name for t in teachers.values())
    details = {**model_details(student_config, result_overrides(overrides)), "distill": asdict(config),
               "teachers": teacher_folders}
    final = artifact_dir(student_profile, "student", name, details)

    collator = collator_for(data)
    cache = cached_teacher_outputs(profile, teachers, data, "train", collator)
    if final.exists() and not retrain:
        student = MultiTaskNLU.load(final, labels=data.labels)
        distiller = Distiller(student, config, teacher_hidden_size(cache))
        verify_checksums(final / HEADS_RECORD, [HEADS])
        distiller.load_state_dict(read_safetensors(final / HEADS), strict=False)
        info = read_json(final / "training.json")
        return DistilledModel(student, distiller.eval(), final, info["history"], info["train_seconds"])

    prepare_encoder(student_profile, data)
    set_seed(profile.train_seed)
    student = MultiTaskNLU(student_config)
    distiller = Distiller(student, config, teacher_hidden_size(cache))
    checkpoints = profile.artifacts_dir / "checkpoints" / final.name
    trainer = train.StudyTrainer(model=distiller,
                      args=training_arguments(student_profile, checkpoints, **overrides),
                      train_dataset=attach_rows(data.features["train"]), eval_dataset=data.features["dev"],
                      data_collator=DistillCollator(collator, cache))
    def save(folder: Path) -> None:
        student.save(folder)
        heads = {k: v.detach().contiguous() for k, v in distiller.state_dict().items() if not k.startswith("student.")}
        save_file(heads, folder / HEADS)
        write_json(folder / HEADS_RECORD, with_checksums({"distill_config": asdict(config)}, folder, [HEADS]))

    # The Trainer's model is the whole Distiller, so its checkpoints hold the fusion and projection
    # heads too, beside the optimizer, scheduler and RNG states: a resumed run ends where an
    # uninterrupted one would.
    if retrain:  # an older run's checkpoints would outrank the new ones in the Trainer's rotation
        shutil.rmtree(checkpoints, ignore_errors=True)
    resume = train.last_good_checkpoint(checkpoints) if checkpoints.exists() else None
    if resume:
        log.info("resuming %s from %s", name, resume)
    history, seconds = fit_and_save(trainer, final, save, resume, info={"distill_config": asdict(config)})
    student.eval()
    return DistilledModel(student, distiller.eval(), final, history, seconds)


ABLATION_MEANING = {
    "mean_fusion": "a plain average of the teachers instead of attention fusion",
    "no_mse_crd": "no representation terms (MSE and CRD)",
    "ce_only": "no teachers at all (cross-entropy only)",
}


def describe_ablation(table, reference: str = "full", threshold: float = 0.005) -> str:
    """Plain sentences, from the numbers, on what each removed part of the loss did.

    ``table``: rows ``config`` with the six metrics; a change smaller than ``threshold``
    (half a point) counts as no change.
    """
    base = table.set_index("config").loc[reference]
    lines = []
    for config, row in table.set_index("config").drop(index=reference).iterrows():
        delta = row - base
        better = [f"{m} +{d * 100:.1f}" for m, d in delta.items() if d >= threshold]
        worse = [f"{m} {d * 100:.1f}" for m, d in delta.items() if d <= -threshold]
        what = ABLATION_MEANING.get(config, config)
        if not better and not worse:
            lines.append(f"- **{config}** ({what}): no metric moves by half a point or more.")
            continue
        parts = []
        if worse:
            parts.append("the full loss was better on " + ", ".join(worse).replace(" -", " by ") + " points")
        if better:
            parts.append("the variant was better on " + ", ".join(better).replace(" +", " by ") + " points")
        lines.append(f"- **{config}** ({what}): " + "; ".join(parts) + ".")
    return "\n".join(lines)
