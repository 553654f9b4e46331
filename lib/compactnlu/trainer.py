"""The study's Trainer set-up, shared by the MLM phase (``pretrain``) and task training (``train``):
its arguments and the atomic save of a finished run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from .artifacts import atomic_dir, write_json
from .config import Profile, ProfileError

# Fewer optimizer steps than this and a run learns next to nothing (a batch larger than the
# training set gave the smoke profile one step an epoch, 8 in all, and a bad model); the smoke
# profile's smallest run, its MLM phase on two processes, takes 10.
MIN_STEPS = 10


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
        # the bar with time left; its default follows the log level, and notebooks log at ERROR
        disable_tqdm=False,
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


def optimizer_steps(args: TrainingArguments, n_train: int) -> int:
    """How many optimizer steps ``args`` take over ``n_train`` examples (as the Trainer counts them)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(n_train / (args.per_device_train_batch_size * args.world_size))
    return math.ceil(args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps))


def check_steps(args: TrainingArguments, n_train: int) -> None:
    """Refuse a batch size that leaves fewer than MIN_STEPS optimizer steps; an explicit
    ``max_steps`` is the caller's choice and passes."""
    steps = optimizer_steps(args, n_train)
    if args.max_steps <= 0 and steps < MIN_STEPS:
        batch = args.per_device_train_batch_size
        per_step = batch * args.world_size * args.gradient_accumulation_steps
        raise ProfileError(
            f"field batch_size={batch!r} is out of range for {n_train} training examples: "
            f"{args.num_train_epochs:g} epochs in steps of {per_step} examples give {steps} optimizer steps; "
            f"allowed: at least {MIN_STEPS} steps (a smaller batch_size, or mlm_batch_size in the MLM "
            f"phase, or more epochs)")


def fit_and_save(trainer: Trainer, final: Path, save, resume: str | None = None,
                 info: dict | None = None) -> tuple[list[dict], float]:
    """Train, then on the main process write ``final`` atomically: ``save(folder)`` plus
    ``training.json`` (the Trainer's log, its run time, the best checkpoint, world size).
    A batch size that leaves fewer than MIN_STEPS optimizer steps is refused before training."""
    if hasattr(trainer.train_dataset, "__len__"):
        check_steps(trainer.args, len(trainer.train_dataset))
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
