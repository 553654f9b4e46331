"""Shared helpers: tiny MASSIVE-format records written inline, and the synthetic corpus."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from compactnlu.massive import load_massive
from compactnlu.synthetic import write_corpus

# Locales the compose/feature tests load: two danda scripts and one full-stop script.
TEST_LOCALES = ("hi-IN", "bn-BD", "ta-IN")


def record(id="1", locale="hi-IN", partition="train", scenario="alarm", intent="alarm_set",
           utt="wake me at five am", annot_utt="wake me at [time : five am]", **extra) -> dict:
    """One raw MASSIVE json record (a good one unless the caller breaks it)."""
    rec = {"id": id, "locale": locale, "partition": partition, "scenario": scenario,
           "intent": intent, "utt": utt, "annot_utt": annot_utt}
    rec.update(extra)
    return rec


def jsonl_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


def write_jsonl(path: Path, lines: list) -> Path:
    """Write ``lines`` (dicts are dumped as JSON, strings written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((jsonl_line(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def good_lines(locale: str = "hi-IN", n: int = 2) -> list[dict]:
    return [record(id=str(i), locale=locale) for i in range(1, n + 1)]


def locale_bytes(locale: str, n: int = 3) -> bytes:
    """A small valid ``<locale>.jsonl`` as bytes."""
    lines = [jsonl_line(record(id=str(i), locale=locale, partition=("train", "dev", "test")[i % 3]))
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A gzipped tarball holding ``files`` (archive name -> content) as regular files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """The synthetic corpus, written once per session (tests only read it)."""
    return write_corpus(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def records(synthetic_dir):
    """Parsed synthetic records of ``TEST_LOCALES``."""
    return load_massive(synthetic_dir, TEST_LOCALES, verify=False, allow_download=False)


@pytest.fixture
def artifacts_dir(tmp_path, monkeypatch) -> Path:
    """Point Profile.artifacts_dir at a fresh temporary folder."""
    folder = tmp_path / "artifacts"
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(folder))
    return folder


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one thread is faster, and leaves the other core to whatever else runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def refuse_pickle(monkeypatch):
    """Make any unpickling fail the test: loading an artifact must read no pickle."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def labelled_positions(ids: list[int], word_ids: list, bare_space_id: int) -> dict[int, int]:
    """Word index -> the token that carries its slot label: its first subword, or the next one
    when the first is a bare "▁" and the word goes on (the rule ``encode_words`` documents)."""
    positions: dict[int, int] = {}
    for pos, wid in enumerate(word_ids):
        if wid is None or wid in positions:
            continue
        goes_on = pos + 1 < len(ids) and word_ids[pos + 1] == wid
        positions[wid] = pos + 1 if ids[pos] == bare_space_id and goes_on else pos
    return positions
