"""Training through the transformers ``Trainer``, cached by the parameters that shape a model.

``train_model`` returns the finished model from ``artifacts/models/<name>-<key>/`` when
it exists; otherwise it trains (resuming, after an interruption, from the last checkpoint
in ``artifacts/checkpoints/`` that reads back whole), keeps the checkpoint with the best
dev loss, and saves that one. The same code runs under ``torchrun`` or
``accelerate launch`` on several processes (CPU with gloo, or GPUs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from .artifacts import atomic_dir, read_json, read_safetensors, write_json
from .config import FEATURE_FIELDS, Profile
from .features import MultiTaskCollator, StudyData
from .model import TASKS, MultiTaskNLU, NLUConfig
from .pretrain import MLM_FIELDS, encoder_config, pretrain_encoder, pretrained_encoder_dir

log = logging.getLogger(__name__)

# The paper's three task-pair teachers (its Table 1), named by the tasks they learn.
TEACHERS = {"teacher_idsf": ("id", "sf"), "teacher_iddc": ("id", "dc"), "teacher_dcsf": ("dc", "sf")}
MODEL_FIELDS = ("model_name", "hidden_size", "num_layers", "num_heads", "intermediate_size", "dropout", "pooling")
TRAIN_FIELDS = ("epochs", "learning_rate", "batch_size", "warmup_ratio", "weight_decay", "train_seed")


def uses_mlm(profile: Profile) -> bool:
    return profile.mlm_epochs > 0 and not profile.model_name


def nlu_config(profile: Profile, data: StudyData, tasks=TASKS, loss_weights: dict | None = None) -> NLUConfig:
    """The model's config; its encoder comes from ``model_name``, the MLM phase, or nothing."""
    pretrained = profile.model_name or (str(pretrained_encoder_dir(profile)) if uses_mlm(profile) else None)
    return NLUConfig(
        n_intents=len(data.labels.intents), n_domains=len(data.labels.scenarios), tags=data.labels.tags,
        tasks=tuple(tasks), loss_weights=dict(loss_weights or zip(TASKS, profile.loss_weights)),
        pooling=profile.pooling, encoder=encoder_config(profile, data).to_diff_dict(), pretrained=pretrained)


def collator_for(data: StudyData) -> MultiTaskCollator:
    return MultiTaskCollator(data.tokenizer.pad_token_id, len(data.labels.intents), len(data.labels.scenarios))


def model_dir(profile: Profile, name: str, config: NLUConfig, argument_overrides: dict | None = None) -> Path:
    key = profile.key(*FEATURE_FIELDS, *MODEL_FIELDS, *TRAIN_FIELDS, *(MLM_FIELDS if uses_mlm(profile) else ()))
    extra = json.dumps({"tasks": config.tasks, "loss_weights": config.loss_weights,
                        "trainer": argument_overrides or {}}, sort_keys=True, default=str)
    key = hashlib.sha256((key + extra).encode()).hexdigest()[:12]
    return profile.artifacts_dir / "models" / f"{name}-{key}"


class StudyTrainer(Trainer):
    """transformers' Trainer, its length-grouped samplers given their lengths as a list.

    With datasets 5 ``dataset["n_subwords"]`` is a lazy ``Column``, and the sampler's sort reads it
    one Arrow lookup per example: 11 s at the start of every epoch of the default training split,
    a tenth of the epoch (``benchmarks/training_speed.py``).
    """

    def _get_train_sampler(self, train_dataset=None):
        return _with_listed_lengths(super()._get_train_sampler(train_dataset))

    def _get_eval_sampler(self, eval_dataset):
        return _with_listed_lengths(super()._get_eval_sampler(eval_dataset))


def _with_listed_lengths(sampler):
    if isinstance(sampler, LengthGroupedSampler) and not isinstance(sampler.lengths, list):
        sampler.lengths = sampler.lengths[:]  # one read of the whole column
    return sampler


@dataclass
class TrainedModel:
    model: MultiTaskNLU
    path: Path
    history: list[dict]  # the Trainer's log: training loss per logging step, eval loss per epoch
    train_seconds: float


def result_overrides(overrides: dict) -> dict:
    """Trainer arguments that change the model (not logging or progress display)."""
    cosmetic = {"disable_tqdm", "logging_steps", "logging_strategy", "report_to"}
    return {k: v for k, v in overrides.items() if k not in cosmetic}


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def training_arguments(profile: Profile, output_dir: Path, **overrides) -> TrainingArguments:
    args = dict(
        output_dir=str(output_dir),
        num_train_epochs=profile.epochs,
        learning_rate=profile.learning_rate,
        per_device_train_batch_size=profile.batch_size,
        per_device_eval_batch_size=128,
        warmup_steps=profile.warmup_ratio,
        weight_decay=profile.weight_decay,
        # torch's fused AdamW: one kernel over all parameters, 3 ms a step less on the default encoder
        optim="adamw_torch_fused",
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=200,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=2,
        prediction_loss_only=True,
        remove_unused_columns=False,  # the collator picks its columns; metadata stays for evaluation
        train_sampling_strategy="group_by_length",
        length_column_name="n_subwords",
        seed=profile.train_seed,
        data_seed=profile.train_seed,
        report_to="none",
        dataloader_num_workers=0,
        # several CPU processes (torchrun) talk over gloo; GPUs keep the default nccl
        ddp_backend="gloo" if _distributed() and not torch.cuda.is_available() else None,
        use_cpu=not torch.cuda.is_available(),
    )
    args.update(overrides)
    return TrainingArguments(**args)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why the Trainer checkpoint ``checkpoint`` cannot be resumed from, or ``None`` if it can.

    A run killed while saving, or a copy cut short, leaves a missing or truncated file.
    ``trainer_state.json`` is written last, so it must be there; the weights must load;
    the torch files (optimizer, scheduler, RNG state) are zip archives whose CRCs must match.
    """
    for name in ("model.safetensors", "trainer_state.json"):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        read_safetensors(checkpoint / "model.safetensors")
        read_json(checkpoint / "trainer_state.json")
    except (ValueError, OSError) as error:
        return str(error)
    for archive in sorted(checkpoint.glob("*.pt*")):
        try:
            with zipfile.ZipFile(archive) as contents:
                if contents.testzip() is not None:
                    return f"{archive.name} is corrupt"
        except (zipfile.BadZipFile, OSError) as error:
            return f"{archive.name}: {error}"
    return None


def last_good_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint under ``folder`` that can be resumed from; broken ones are skipped
    with a warning naming them (the Trainer overwrites them when it gets that far again)."""
    steps = {p: int(m.group(1)) for p in folder.glob("checkpoint-*")
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    for checkpoint in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        warnings.warn(f"skipping the broken checkpoint {checkpoint} ({problem}); resuming from an earlier one",
                      stacklevel=2)
    return None


def fit_and_save(trainer: Trainer, final: Path, save, resume: str | None = None,
                 info: dict | None = None) -> tuple[list[dict], float]:
    """Train, then on the main process write ``final`` atomically: ``save(folder)`` plus
    ``training.json`` (the Trainer's log, its run time, the best checkpoint, world size)."""
    result = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    seconds = float(result.metrics.get("train_runtime", 0.0))
    if trainer.is_world_process_zero():
        with atomic_dir(final) as tmp:
            save(tmp)
            write_json(tmp / "training.json", {"history": history, "train_seconds": seconds,
                                               "best_checkpoint": trainer.state.best_model_checkpoint,
                                               "world_size": trainer.args.world_size, **(info or {})})
    return history, seconds


def train_model(profile: Profile, data: StudyData, name: str, tasks=TASKS, loss_weights: dict | None = None,
                retrain: bool = False, **argument_overrides) -> TrainedModel:
    """Train (or load) one multitask model on the composed training split."""
    config = nlu_config(profile, data, tasks, loss_weights)
    final = model_dir(profile, name, config, result_overrides(argument_overrides))
    if final.exists() and not retrain:
        info = read_json(final / "training.json")
        return TrainedModel(MultiTaskNLU.load(final, labels=data.labels), final, info["history"],
                            info["train_seconds"])

    checkpoints = profile.artifacts_dir / "checkpoints" / final.name
    if uses_mlm(profile):
        pretrain_encoder(profile, data)  # cached: run once, shared by every model of the profile
    set_seed(profile.train_seed)
    model = MultiTaskNLU(config)
    trainer = StudyTrainer(
        model=model,
        args=training_arguments(profile, checkpoints, **argument_overrides),
        train_dataset=data.features["train"],
        eval_dataset=data.features["dev"],
        data_collator=collator_for(data),
    )
    resume = last_good_checkpoint(checkpoints) if checkpoints.exists() and not retrain else None
    if resume:
        log.info("resuming %s from %s", name, resume)
    history, seconds = fit_and_save(trainer, final, model.save, resume)
    model.eval()
    return TrainedModel(model, final, history, seconds)


def budget_row(model: str, trained) -> dict:
    """What training ``trained`` cost: epochs, optimizer steps and wall-clock minutes (the Trainer's log)."""
    history = trained.history
    return {"model": model, "epochs": max((h.get("epoch", 0.0) for h in history), default=0.0),
            "steps": max((h.get("step", 0) for h in history), default=0),
            "minutes": trained.train_seconds / 60}


def train_teacher(profile: Profile, data: StudyData, name: str, retrain: bool = False) -> TrainedModel:
    """One of the paper's task-pair teachers, trained for the profile's ``teacher_epochs``."""
    return train_model(profile, data, name, tasks=TEACHERS[name], retrain=retrain,
                       num_train_epochs=profile.teacher_epochs)


def main(argv: list[str] | None = None) -> int:
    """Train one model from the command line, e.g. under torchrun:

    torchrun --nproc_per_node 2 -m compactnlu.train --profile smoke --name baseline
    """
    import argparse

    from .config import load_profile, parse_override
    from .features import load_study_data

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--name", default="baseline")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    args = parser.parse_args(argv)
    overrides = dict(parse_override(item) for item in args.set)
    profile = load_profile(args.profile, overrides)
    data = load_study_data(profile)  # built once beforehand (notebook 01), never by several processes at once
    trained = train_model(profile, data, args.name, tasks=args.tasks)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved {trained.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
