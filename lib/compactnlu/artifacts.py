"""Atomic writes for cached artifacts and result tables.

A reader never sees half a file or half a folder: everything is written beside its
final name and moved into place in one ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd


@contextmanager
def atomic_dir(final: Path | str):
    """Yield a temporary folder that becomes ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path | str, obj) -> Path:
    return atomic_write(Path(path), lambda tmp: tmp.write_text(
        json.dumps(obj, indent=1, ensure_ascii=False, default=str), encoding="utf-8"))


def read_json(path: Path | str):
    """The JSON value in ``path``; a file that does not parse is a ValueError naming it and the line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


# ---------------------------------------------------------------- checksums of saved weights
# A saved model records the SHA-256 of its weight files in the JSON beside them (``config.json``
# or ``quantization.json``, under this key), and every load checks them first: a flipped byte
# or a truncated copy is refused by name instead of loading into silently wrong outputs.
CHECKSUMS = "checksums"
RERUN = "delete the folder and re-run the notebook that made it"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def with_checksums(record: dict, folder: Path | str, names: list[str]) -> dict:
    """``record`` plus the SHA-256 of each of ``folder``'s files ``names`` under ``"checksums"``."""
    return {**record, CHECKSUMS: {name: sha256_file(Path(folder) / name) for name in names}}


def verify_checksums(manifest: Path | str, names: list[str]) -> None:
    """Check the files ``names`` beside ``manifest`` against the SHA-256 it records.

    A folder saved before checksums were recorded is refused too (not loaded with a
    warning): saved models are keyed caches, so re-running the notebook that made one
    costs little, and a warning would let a corrupt old file through unnoticed.
    """
    manifest = Path(manifest)
    record = read_json(manifest)
    recorded = record.get(CHECKSUMS) if isinstance(record, dict) else None
    for name in names:
        path = manifest.parent / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; {RERUN}")
        expected = recorded.get(name) if isinstance(recorded, dict) else None
        if expected is None:
            raise ValueError(f"{manifest} records no SHA-256 for {name} (saved before checksums were "
                             f"recorded); {RERUN}")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(f"{path} is corrupt or truncated: its SHA-256 {actual[:12]}... differs from the "
                             f"{expected[:12]}... that {manifest.name} records; {RERUN}")


def read_safetensors(path: Path | str) -> dict:
    """``safetensors.torch.load_file``, with an unreadable (e.g. truncated) file named in the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def write_table(df: pd.DataFrame, path: Path | str, float_format: str = "%.4f") -> Path:
    """Write a result table as CSV and, beside it, as Markdown for reading on the web."""
    path = Path(path)
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format=float_format))
    md = df.to_markdown(index=False, floatfmt=float_format.lstrip("%"))
    atomic_write(path.with_suffix(".md"), lambda tmp: tmp.write_text(md + "\n", encoding="utf-8"))
    return path


def upsert_rows(path: Path | str, rows: pd.DataFrame, key: list[str], order: list[str] = ()) -> pd.DataFrame:
    """Replace the rows of ``path`` that share ``key`` with ``rows``; append the new ones.

    Lets each notebook add its variants to a shared table (``massive_single_test.csv``)
    and be rerun without duplicating them. Rows are kept in ``order`` of their ``variant``
    (names outside it last; ``compactnlu.variants.upsert_rows`` passes the variant table's).
    """
    path = Path(path)
    if path.exists():
        old = pd.read_csv(path)
        keep = ~old.set_index(key).index.isin(rows.set_index(key).index)
        rows = pd.concat([old[keep], rows], ignore_index=True)
    if "variant" in rows and order:
        rank = {v: i for i, v in enumerate(order)}
        rows = rows.iloc[rows["variant"].map(lambda v: rank.get(v, len(rank))).argsort(kind="stable")]
        rows = rows.reset_index(drop=True)
    write_table(rows, path)
    return rows

