"""``compactnlu.train`` on the smoke profile: caching, determinism, resuming and torchrun (DDP on CPU).

Everything is written under one temporary artifacts folder for the module; the smoke
data is built there once. Training runs single-threaded: the machine has two cores and
other work, and two contending threads make each step many times slower.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import compactnlu.train as train
from compactnlu.config import load_profile
from compactnlu.features import build_study_data
from compactnlu.metrics import predict, task_metrics
from compactnlu.model import MultiTaskNLU
from compactnlu.train import StudyTrainer, collator_for, model_dir, nlu_config, train_model

SMOKE = {"epochs": 1}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "artifacts"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPACTNLU_ARTIFACTS", str(folder))
        torch.set_num_threads(1)
        yield folder
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def profile(artifacts):
    p = load_profile("smoke", SMOKE)
    assert p.artifacts_dir == artifacts and p.data_dir.is_relative_to(artifacts)
    return p


@pytest.fixture(scope="module")
def data(profile):
    return build_study_data(profile)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def dev_metrics(trained, data) -> tuple[dict, float]:
    df = predict(trained.model, data.features["dev"], collator_for(data), data.labels)
    return task_metrics(df, data.labels), df.attrs["eval_loss"]


class NoTraining(StudyTrainer):
    def __init__(self, *a, **k):
        raise RuntimeError("Trainer built: the cache was not used")


def counting_trainer():
    """A Trainer that counts its optimisation steps and keeps the last instance."""
    class Counting(StudyTrainer):
        steps = 0
        last = None

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            type(self).last = self

        stop_after = None  # raise after this many steps, as a killed run would stop

        def training_step(self, *a, **k):
            if self.stop_after is not None and self.state.global_step >= self.stop_after:
                raise KeyboardInterrupt("interrupted by the test")
            type(self).steps += 1
            return super().training_step(*a, **k)
    return Counting


# ---------------------------------------------------------------- (a) train, save, cache

def test_train_saves_and_then_returns_the_cached_model(profile, data, artifacts, monkeypatch):
    trained = train_model(profile, data, "cache")

    assert trained.path.parent == artifacts / "models"
    assert trained.path.name.startswith("cache-")
    assert trained.path == model_dir(profile, "cache", nlu_config(profile, data))
    assert sorted(p.name for p in trained.path.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert not any(p.name.startswith(".") for p in (artifacts / "models").iterdir())  # no temporary left
    assert not trained.model.training
    assert same_weights(load_file(trained.path / "model.safetensors"), trained.model.state_dict())

    info = json.loads((trained.path / "training.json").read_text())
    assert info["world_size"] == 1
    assert info["train_seconds"] == pytest.approx(trained.train_seconds) and trained.train_seconds > 0
    assert info["history"] == json.loads(json.dumps(trained.history))
    assert any("eval_loss" in h for h in trained.history)
    assert info["best_checkpoint"] and info["best_checkpoint"].startswith(str(artifacts / "checkpoints"))
    saved_config = json.loads((trained.path / "config.json").read_text())
    assert saved_config["tasks"] == ["id", "dc", "sf"] and saved_config["tags"] == list(data.labels.tags)

    # Second call, same profile: loaded from artifacts/models, no Trainer is even built.
    monkeypatch.setattr(train, "StudyTrainer", NoTraining)
    cached = train_model(profile, data, "cache")
    assert cached.path == trained.path
    assert same_weights(cached.model.state_dict(), trained.model.state_dict())
    assert cached.history == info["history"] and cached.train_seconds == info["train_seconds"]
    assert not cached.model.training

    # A parameter that shapes the model misses the cache ...
    faster = load_profile("smoke", {**SMOKE, "learning_rate": 5e-3})
    with pytest.raises(RuntimeError, match="cache was not used"):
        train_model(faster, data, "cache")
    monkeypatch.undo()
    # ... and trains into its own folder, beside the first.
    other = train_model(faster, data, "cache")
    assert other.path != trained.path and other.path.name.startswith("cache-")
    assert trained.path.is_dir() and other.path.is_dir()
    assert not same_weights(other.model.state_dict(), trained.model.state_dict())


def test_model_folder_key(profile, data):
    base = model_dir(profile, "m", nlu_config(profile, data))
    assert base.name.startswith("m-")
    assert model_dir(profile, "other", nlu_config(profile, data)).name.endswith(base.name[1:])
    changed = [
        model_dir(load_profile("smoke", {**SMOKE, "learning_rate": 5e-3}), "m", nlu_config(profile, data)),
        model_dir(load_profile("smoke", {**SMOKE, "train_seed": 7}), "m", nlu_config(profile, data)),
        model_dir(load_profile("smoke", {**SMOKE, "hidden_size": 48}), "m", nlu_config(profile, data)),
        model_dir(load_profile("smoke", {**SMOKE, "max_length": 64}), "m", nlu_config(profile, data)),
        model_dir(profile, "m", nlu_config(profile, data, tasks=("id", "dc"))),
        model_dir(profile, "m", nlu_config(profile, data, loss_weights={"id": 2.0, "dc": 1.0, "sf": 1.0})),
        model_dir(load_profile("smoke", {**SMOKE, "loss_weights": (1.0, 1.0, 1.0)}), "m", nlu_config(profile, data)),
        model_dir(profile, "m", nlu_config(profile, data), {"num_train_epochs": 3}),
        model_dir(profile, "m", nlu_config(profile, data), artifact="teacher"),
    ]
    assert len({base, *changed}) == len(changed) + 1
    # Fields that do not shape the model leave the key alone: a teacher's or the student's budget,
    # the PTQ and benchmark settings, the number of replicates.
    for unrelated in ({"verify_checksums": True}, {"teacher_epochs": 3.0}, {"kd_epochs": 3.0},
                      {"pcptq_steps": 7}, {"bench_repeats": 9}, {"train_seeds": 4}):
        assert model_dir(load_profile("smoke", {**SMOKE, **unrelated}), "m", nlu_config(profile, data)) == base
    teacher = model_dir(profile, "m", nlu_config(profile, data), artifact="teacher")
    assert model_dir(load_profile("smoke", {**SMOKE, "epochs": 3.0}), "m", nlu_config(profile, data),
                     artifact="teacher") == teacher


# ---------------------------------------------------------------- (b) determinism

def test_training_is_deterministic(profile, data):
    first = train_model(profile, data, "det", retrain=True)
    weights, (metrics, loss) = state(first.model), dev_metrics(first, data)
    second = train_model(profile, data, "det", retrain=True)

    assert second.path == first.path
    assert same_weights(state(second.model), weights)
    metrics2, loss2 = dev_metrics(second, data)
    assert metrics2 == metrics
    assert loss2 == loss and math.isfinite(loss)
    assert same_weights(load_file(second.path / "model.safetensors"), weights)

    # Not trivially so: another seed gives another model.
    reseeded = train_model(load_profile("smoke", {**SMOKE, "train_seed": 7}), data, "det", retrain=True)
    assert reseeded.path != first.path
    assert not same_weights(state(reseeded.model), weights)


def test_task_pair_teacher_trains_and_predicts(profile, data):
    trained = train_model(profile, data, "pair", tasks=("id", "sf"))
    assert trained.model.tasks == ("id", "sf") and not hasattr(trained.model, "dc_head")
    loaded = MultiTaskNLU.load(trained.path)
    assert loaded.tasks == ("id", "sf")
    metrics, loss = dev_metrics(trained, data)
    assert math.isnan(metrics["dc_acc"]) and math.isnan(metrics["dc_f1"])
    assert 0 <= metrics["id_acc"] <= 1 and 0 <= metrics["sf_acc"] <= 1 and math.isfinite(loss)


def test_saved_model_is_the_best_dev_checkpoint(data, artifacts):
    """A learning rate high enough that dev loss goes up and down: the best eval, not the last, is kept."""
    bumpy = load_profile("smoke", {**SMOKE, "learning_rate": 0.05})
    trained = train_model(bumpy, data, "best", max_steps=9, save_strategy="steps", save_steps=3,
                          eval_strategy="steps", eval_steps=3)
    info = json.loads((trained.path / "training.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in trained.history if "eval_loss" in h}
    assert sorted(evals) == [3, 6, 9]
    best_step = min(evals, key=evals.get)
    assert info["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    final = load_file(trained.path / "model.safetensors")
    assert same_weights(load_file(os.path.join(info["best_checkpoint"], "model.safetensors")), final)
    assert same_weights(trained.model.state_dict(), final)
    last = artifacts / "checkpoints" / trained.path.name / "checkpoint-9"
    if best_step != 9:  # with this seed and these versions, step 3 is the best
        assert not same_weights(load_file(last / "model.safetensors"), final)


# ---------------------------------------------------------------- (c) checkpoints and resuming

STEPS = dict(save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)


def test_interrupted_training_resumes_from_the_last_checkpoint(profile, data, artifacts, monkeypatch, caplog):
    counting = counting_trainer()
    monkeypatch.setattr(train, "StudyTrainer", counting)
    counting.stop_after = 4  # the run dies after its 4th step, before the final model is saved
    with pytest.raises(KeyboardInterrupt):
        train_model(profile, data, "resume", max_steps=6, **STEPS)
    assert counting.steps == 4
    checkpoints = next((artifacts / "checkpoints").glob("resume-*"))
    assert (checkpoints / "checkpoint-2").is_dir() and (checkpoints / "checkpoint-4").is_dir()
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()
    assert not list((artifacts / "models").glob("resume-*"))

    # The same call again resumes from the last checkpoint.
    counting.stop_after = None
    counting.steps = 0
    caplog.set_level(logging.INFO, logger="compactnlu.train")
    resumed = train_model(profile, data, "resume", max_steps=6, **STEPS)

    assert "resuming resume from" in caplog.text and "checkpoint-4" in caplog.text
    assert counting.steps == 2  # steps 5 and 6 only
    assert counting.last.state.global_step == 6
    steps = [h["step"] for h in resumed.history]
    assert 2 in steps and 4 in steps and max(steps) == 6  # the earlier log carries on
    assert (resumed.path / "model.safetensors").is_file()
    assert (checkpoints / "checkpoint-6").is_dir()


def test_retrain_ignores_existing_checkpoints(profile, data, artifacts, monkeypatch, caplog):
    counting = counting_trainer()
    monkeypatch.setattr(train, "StudyTrainer", counting)
    train_model(profile, data, "fresh", max_steps=2, **STEPS)
    caplog.set_level(logging.INFO, logger="compactnlu.train")
    counting.steps = 0
    again = train_model(profile, data, "fresh", retrain=True, max_steps=4, **STEPS)
    assert "resuming" not in caplog.text
    assert counting.steps == 4
    assert (again.path / "model.safetensors").is_file()


# ---------------------------------------------------------------- (d) torchrun, two CPU processes

def test_torchrun_two_processes(profile, data, artifacts):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(COMPACTNLU_ARTIFACTS=str(artifacts), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "compactnlu.train", "--profile", "smoke", "--name", "ddp_test", "--set", "epochs=1"]
    done = subprocess.run(command, env=env, cwd=artifacts.parent, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]

    folders = sorted((artifacts / "models").glob("ddp_test-*"))
    assert len(folders) == 1, folders
    folder = folders[0]
    assert folder == model_dir(profile, "ddp_test", nlu_config(profile, data))
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "training.json").read_text())["world_size"] == 2
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports (and saves)
    assert MultiTaskNLU.load(folder).tasks == ("id", "dc", "sf")
