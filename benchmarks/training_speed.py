"""Time one training epoch of the default baseline as the study trained it before and after.

Before: the settings of the previous default profile: dropout 0.1, transformers' Trainer as it
comes (``adamw_torch``; its length-grouped sampler reads the lengths column one Arrow lookup at a
time). After: the default profile now: dropout 0 (measured on dev: README, "A fair test"),
``compactnlu.train.StudyTrainer`` with ``adamw_torch_fused``. Same data, seed and batches. An epoch's time is measured as its two
parts: the sampler's set-up (once per epoch) plus steps per epoch × the mean time of ``--steps``
optimizer steps. Also splits one step (batch 32) into data, forward, backward and optimizer.

    MASSIVE_DIR=../shared/massive python benchmarks/training_speed.py [--steps 300]

Needs the default profile's features (notebook 01). Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Trainer, set_seed

from compactnlu import cpu
from compactnlu.config import load_profile
from compactnlu.features import load_study_data
from compactnlu.model import MultiTaskNLU
from compactnlu.train import StudyTrainer, collator_for, nlu_config, training_arguments


def build(trainer_class, optim: str, profile, data, steps: int):
    set_seed(profile.train_seed)
    args = training_arguments(profile, "/tmp/compactnlu-training-speed", max_steps=steps, optim=optim,
                              eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                              disable_tqdm=True, logging_steps=10**6)
    return trainer_class(model=MultiTaskNLU(nlu_config(profile, data)), args=args,
                         train_dataset=data.features["train"], data_collator=collator_for(data))


def epoch_seconds(trainer_class, optim: str, profile, data, steps: int) -> dict:
    trainer = build(trainer_class, optim, profile, data, steps)
    start = time.perf_counter()
    list(iter(trainer._get_train_sampler()))
    sampler = time.perf_counter() - start
    start = time.perf_counter()
    trainer.train()  # builds its own sampler once more: subtracted below
    total = time.perf_counter() - start - sampler
    per_epoch = -(-len(data.features["train"]) // profile.batch_size)
    step = total / steps
    return {"sampler_s": sampler, "step_ms": step * 1000, "steps_per_epoch": per_epoch,
            "epoch_s": sampler + per_epoch * step}


def step_split(profile, data, n: int = 50) -> dict:
    """Milliseconds per part of one plain training step, mean of ``n`` (after 5 warm-up steps)."""
    set_seed(profile.train_seed)
    model = MultiTaskNLU(nlu_config(profile, data)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=profile.learning_rate, fused=True)
    train, collate = data.features["train"], collator_for(data)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i in range(n + 5):
        t0 = time.perf_counter()
        batch = collate([train[j] for j in order[i * profile.batch_size:(i + 1) * profile.batch_size]])
        t1 = time.perf_counter()
        loss = model(**batch)["loss"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t4 = time.perf_counter()
        if i >= 5:
            for name, (a, b) in zip(parts, [(t0, t1), (t1, t2), (t2, t3), (t3, t4)]):
                parts[name] += (b - a) * 1000 / n
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    profile = load_profile("default")
    data = load_study_data(profile)
    print(f"CPU: {cpu.cpu_model()} | {' '.join(cpu.isa_flags())} | torch threads {torch.get_num_threads()}")
    previous = load_profile("default", {"dropout": 0.1})
    for name, p in (("before", previous), ("after", profile)):
        print(f"{name}: one step (batch 32, random order), ms:",
              {k: round(v, 1) for k, v in step_split(p, data).items()})
    before = epoch_seconds(Trainer, "adamw_torch", previous, data, args.steps)
    after = epoch_seconds(StudyTrainer, "adamw_torch_fused", profile, data, args.steps)
    for name, r in (("before", before), ("after", after)):
        print(f"{name:6s}: sampler {r['sampler_s']:5.1f} s + {r['steps_per_epoch']} steps x {r['step_ms']:.1f} ms"
              f" = {r['epoch_s'] / 60:.2f} min per epoch")
    print(f"speed-up per epoch: {before['epoch_s'] / after['epoch_s']:.2f}x")


if __name__ == "__main__":
    main()
