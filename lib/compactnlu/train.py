"""Training through the transformers ``Trainer``, cached by the parameters that shape a model.

``train_model`` returns the finished model from ``artifacts/models/<name>-<key>/`` when
it exists; otherwise it trains (resuming, after an interruption, from the last checkpoint
in ``artifacts/checkpoints/`` that reads back whole), keeps the checkpoint with the best
dev loss, and saves that one. The same code runs under ``torchrun`` or
``accelerate launch`` on several processes (CPU with gloo, or GPUs).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from .artifacts import read_json, read_safetensors
from .cachekeys import artifact_dir
from .config import Profile, load_profile, parse_override, uses_e5, uses_mlm
from .features import MultiTaskCollator, StudyData, load_study_data
from .model import TASKS, MultiTaskNLU, NLUConfig
from .pretrain import e5_encoder_dir, encoder_config, prepare_encoder, pretrained_encoder_dir
from .trainer import fit_and_save, training_arguments

log = logging.getLogger(__name__)

# The paper's three task-pair teachers (its Table 1), named by the tasks they learn.
TEACHERS = {"teacher_idsf": ("id", "sf"), "teacher_iddc": ("id", "dc"), "teacher_dcsf": ("dc", "sf")}

def nlu_config(profile: Profile, data: StudyData, tasks=TASKS, loss_weights: dict | None = None,
               layers: int | None = None) -> NLUConfig:
    """The model's config; its encoder comes from ``model_name`` (e5: its first ``layers`` or
    ``num_layers`` layers, ``pretrain.e5_encoder``), the MLM phase, or nothing."""
    pretrained = str(e5_encoder_dir(profile)) if uses_e5(profile) else \
        profile.model_name or (str(pretrained_encoder_dir(profile)) if uses_mlm(profile) else None)
    return NLUConfig(
        n_intents=len(data.labels.intents), n_domains=len(data.labels.scenarios), tags=data.labels.tags,
        tasks=tuple(tasks), loss_weights=dict(loss_weights or zip(TASKS, profile.loss_weights)),
        pooling=profile.pooling, encoder=encoder_config(profile, data, layers).to_diff_dict(), pretrained=pretrained,
        intents=data.labels.intents, domains=data.labels.scenarios)


def collator_for(data: StudyData) -> MultiTaskCollator:
    return MultiTaskCollator(data.tokenizer.pad_token_id, len(data.labels.intents), len(data.labels.scenarios))


def model_details(config: NLUConfig, argument_overrides: dict | None = None) -> dict:
    """What keys a task model beyond the profile: its tasks and loss weights (which a caller may
    override) and the Trainer arguments that change it."""
    return {"tasks": list(config.tasks), "loss_weights": config.loss_weights, "trainer": argument_overrides or {}}


def model_dir(profile: Profile, name: str, config: NLUConfig, argument_overrides: dict | None = None,
              artifact: str = "baseline") -> Path:
    """``artifacts/models/<name>-<key>``; ``artifact``: "baseline" or "teacher" (cachekeys.ARTIFACTS)."""
    return artifact_dir(profile, artifact, name, model_details(config, argument_overrides))


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


def train_model(profile: Profile, data: StudyData, name: str, tasks=TASKS, loss_weights: dict | None = None,
                retrain: bool = False, artifact: str = "baseline", layers: int | None = None,
                **argument_overrides) -> TrainedModel:
    """Train (or load) one multitask model on the composed training split; ``artifact``: which
    kind of task model it is, for its cache key ("baseline" or "teacher"); ``layers``: the
    encoder's (None: the profile's num_layers)."""
    config = nlu_config(profile, data, tasks, loss_weights, layers)
    final = model_dir(profile, name, config, result_overrides(argument_overrides), artifact)
    if final.exists() and not retrain:
        info = read_json(final / "training.json")
        return TrainedModel(MultiTaskNLU.load(final, labels=data.labels), final, info["history"],
                            info["train_seconds"])

    checkpoints = profile.artifacts_dir / "checkpoints" / final.name
    prepare_encoder(profile, data)  # the MLM phase or e5's, cached: made once, shared by every model
    set_seed(profile.train_seed)
    model = MultiTaskNLU(config)
    trainer = StudyTrainer(
        model=model,
        args=training_arguments(profile, checkpoints, **argument_overrides),
        train_dataset=data.features["train"],
        eval_dataset=data.features["dev"],
        data_collator=collator_for(data),
    )
    if retrain:  # an older run's checkpoints would outrank the new ones in the Trainer's rotation
        shutil.rmtree(checkpoints, ignore_errors=True)
    resume = last_good_checkpoint(checkpoints) if checkpoints.exists() else None
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
    """One of the paper's task-pair teachers, trained for the profile's ``teacher_epochs``, with
    ``teacher_layers`` layers where the profile sets them."""
    return train_model(profile, data, name, tasks=TEACHERS[name], retrain=retrain, artifact="teacher",
                       layers=profile.teacher_layers, num_train_epochs=profile.teacher_epochs)


def main(argv: list[str] | None = None) -> int:
    """Train one model from the command line, e.g. under torchrun:

    torchrun --nproc_per_node 2 -m compactnlu.train --profile smoke --name baseline
    """
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
