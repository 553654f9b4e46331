"""``distill_student`` resumes an interrupted student from its last checkpoint, to the same weights.

Every run trains the smoke student for a few steps with a checkpoint every two, under its own
name (so its own checkpoints and model folder) in test_distill's artifacts folder, where the
data, the pretrained encoder and the teachers already are. The reference is one uninterrupted run;
an interrupted one is stopped in this process (an exception after some step) or killed with
SIGKILL in a subprocess, then called again, and must end with bit-identical student and heads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compactnlu.train as train
from compactnlu.distill import distill_student
from test_distill import SMOKE, artifacts, data, profile, teachers  # noqa: F401 (fixtures)
from test_train import counting_trainer

# Eval and save steps must match: the best checkpoint is kept (load_best_model_at_end).
ARGS = dict(max_steps=8, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    return {**load_file(path / "model.safetensors"),
            **{"heads." + k: v for k, v in load_file(path / "distill_heads.safetensors").items()}}


def assert_same_weights(path: Path, reference: Path) -> None:
    mine, theirs = saved_weights(path), saved_weights(reference)
    assert set(mine) == set(theirs) and any(k.startswith("heads.fusion.") for k in mine)
    different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not different, different


@pytest.fixture(scope="module")
def reference(profile, data, teachers):
    return distill_student(profile, data, teachers, name="reference", **ARGS)


def test_stopped_student_resumes_to_the_uninterrupted_weights(profile, data, teachers, reference, artifacts,
                                                              monkeypatch, caplog):
    counting = counting_trainer()
    monkeypatch.setattr(train, "StudyTrainer", counting)
    counting.stop_after = 3  # between checkpoints: step 3 is done again after resuming
    with pytest.raises(KeyboardInterrupt):
        distill_student(profile, data, teachers, name="stopped", **ARGS)
    checkpoints = next((artifacts / "checkpoints").glob("stopped-*"))
    assert (checkpoints / "checkpoint-2").is_dir() and not (checkpoints / "checkpoint-4").exists()

    counting.stop_after, counting.steps = None, 0
    caplog.set_level(logging.INFO, logger="compactnlu.distill")
    resumed = distill_student(profile, data, teachers, name="stopped", **ARGS)
    assert f"resuming stopped from {checkpoints / 'checkpoint-2'}" in caplog.text
    assert counting.steps == 6 and counting.last.state.global_step == 8
    assert_same_weights(resumed.path, reference.path)
    state = resumed.distiller.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.distiller.state_dict().items())

    # retrain=True starts again from step 0, whatever checkpoints there are
    caplog.clear()
    counting.steps = 0
    again = distill_student(profile, data, teachers, name="stopped", retrain=True, **ARGS)
    assert "resuming" not in caplog.text and counting.steps == 8
    assert_same_weights(again.path, reference.path)


KILLED_RUN = """
import json, os, sys, time
import torch
torch.set_num_threads(1)  # as the tests run: another thread count gives other float sums
import compactnlu.train as train
from compactnlu.config import load_profile
from compactnlu.distill import distill_student
from compactnlu.features import build_study_data

smoke, args, block_at = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
profile = load_profile("smoke", smoke)
data = build_study_data(profile)
teachers = {name: train.train_model(profile, data, name, tasks=tasks) for name, tasks in train.TEACHERS.items()}

class Blocking(train.StudyTrainer):
    def training_step(self, *a, **k):
        if self.state.global_step == block_at:
            time.sleep(600)  # still training when the test kills it
        return super().training_step(*a, **k)

train.StudyTrainer = Blocking
distill_student(profile, data, teachers, name="killed", **args)
"""


def test_student_killed_by_sigkill_resumes_to_the_uninterrupted_weights(profile, data, teachers, reference,
                                                                        artifacts, caplog):
    env = dict(os.environ, COMPACTNLU_ARTIFACTS=str(artifacts), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(SMOKE), json.dumps(ARGS), "5"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = artifacts / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        # trainer_state.json is the last file of a checkpoint the Trainer writes
        while not any(checkpoints.glob("killed-*/checkpoint-4/trainer_state.json")):
            assert process.poll() is None, process.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint-4 in time"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    folder = next(checkpoints.glob("killed-*"))
    assert not list((artifacts / "models").glob("killed-*"))

    caplog.set_level(logging.INFO, logger="compactnlu.distill")
    resumed = distill_student(profile, data, teachers, name="killed", **ARGS)
    assert f"resuming killed from {folder / 'checkpoint-4'}" in caplog.text
    assert max(h["step"] for h in resumed.history) == 8
    assert_same_weights(resumed.path, reference.path)
