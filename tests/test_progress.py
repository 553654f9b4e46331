"""Long steps show a tqdm bar (with time left) on stderr, named by its ``desc``, and the bar
changes nothing that is computed or timed."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from compactnlu import bench, classic, progress
from compactnlu.classic import ClassicNLU, ClassicSettings
from compactnlu.interface import NLUOutput
from compactnlu.quant.static import calibrate, prepare_static
from quant_helpers import make_batches, make_model


@pytest.fixture(autouse=True)
def loud(monkeypatch):
    monkeypatch.delenv("COMPACTNLU_QUIET", raising=False)
    monkeypatch.delenv("PAPERMILL_EXECUTION", raising=False)


class Echo(torch.nn.Module):
    tasks = ("id",)

    def forward(self, input_ids, attention_mask):
        return NLUOutput(intent_logits=torch.zeros(len(input_ids), 3))


def test_bar_writes_desc_and_counts_to_stderr(capsys):
    assert list(progress.bar(range(4), desc="counting")) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "counting" in err and "0/4" in err


def test_quiet_turns_bars_off(capsys, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_QUIET", "1")
    assert list(progress.bar(range(3), desc="hidden")) == [0, 1, 2]
    assert "hidden" not in capsys.readouterr().err


def test_papermill_gets_a_plain_text_bar(capsys, monkeypatch):
    monkeypatch.setenv("PAPERMILL_EXECUTION", "1")
    with progress.bar(desc="plain", total=2) as b:
        assert type(b).__module__ == "tqdm.std"
        b.update(2)
    assert "plain" in capsys.readouterr().err


def test_calibration_shows_a_bar_and_uses_the_same_batches(capsys):
    prepared = prepare_static(make_model())
    assert calibrate(prepared, iter(make_batches(5)), n_batches=3) == 3
    err = capsys.readouterr().err
    assert "calibrate" in err and "0/3" in err


def test_bench_loops_show_bars(capsys):
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    models = {"a": Echo(), "b": Echo()}
    passes = bench.time_passes(models, [batch], repeats=2, warmup=0)
    latencies = bench.latency(models, [batch] * 3, warmup=0)
    assert len(passes) == 4 and len(latencies) == 6
    err = capsys.readouterr().err
    assert "timed passes" in err and "0/4" in err
    assert "latency" in err and "0/3" in err


def test_the_classic_fit_shows_its_stages(capsys, monkeypatch):
    bars = []
    monkeypatch.setattr(classic, "bar", lambda *a, **k: bars.append(progress.bar(*a, **k)) or bars[-1])
    words = [["play", "some", "jazz"], ["wake", "me", "up"], ["play", "rock", "music"], ["set", "an", "alarm"]] * 3
    tags = [["O", "O", "B-genre"], ["O", "O", "O"], ["O", "B-genre", "O"], ["O", "O", "O"]] * 3
    data = datasets.Dataset.from_dict({
        "words": words, "tags": tags, "locale": ["en-US"] * len(words),
        "intents": [["play"], ["alarm"], ["play"], ["alarm"]] * 3,
        "scenarios": [["music"], ["alarm"], ["music"], ["alarm"]] * 3})
    labels = SimpleNamespace(intents=["alarm", "play"], scenarios=["alarm", "music"], tags=["B-genre", "I-genre", "O"])
    ClassicNLU(ClassicSettings(crf_epochs=3, crf_minfreq=1, min_df=1)).fit(data, labels)
    err = capsys.readouterr().err
    for desc in ("classic fit: TF-IDF, ID, DC", "classic fit: SF features", "classic fit: SF (CRF) iterations"):
        assert desc in err
    assert "0/3" in err and "0/12" in err
    assert [(b.n, b.total) for b in bars] == [(3, 3), (12, 12), (3, 3)]  # each ran to its end, CRF iterations too
