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

from . import provenance


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


# ---------------------------------------------------------------- checksums of saved models
# A saved model records the SHA-256 of its weight files in the JSON beside them (``config.json``
# or ``quantization.json``, under "checksums"), and the SHA-256 of that JSON record itself
# (under "record_sha256"), and every load checks both first: a flipped byte, a truncated copy or
# a hand edit of the config (a reordered tag list, another pooling or activation) is refused by
# name instead of loading into silently wrong outputs.
CHECKSUMS = "checksums"
RECORD_DIGEST = "record_sha256"
RERUN = "delete the folder and re-run the notebook that made it"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_digest(record: dict) -> str:
    """SHA-256 of ``record`` (less its own digest) as JSON reads it back: key order and
    indentation do not count, every value does."""
    body = {k: v for k, v in record.items() if k != RECORD_DIGEST}
    canonical = json.loads(json.dumps(body, ensure_ascii=False, default=str))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def with_checksums(record: dict, folder: Path | str, names: list[str]) -> dict:
    """``record`` plus the SHA-256 of each of ``folder``'s files ``names`` under "checksums",
    sealed by the SHA-256 of the whole record under "record_sha256"."""
    sealed = {**record, CHECKSUMS: {name: sha256_file(Path(folder) / name) for name in dict.fromkeys(names)}}
    return {**sealed, RECORD_DIGEST: record_digest(sealed)}


def verify_checksums(manifest: Path | str, names: list[str]) -> dict:
    """Check ``manifest`` against the digest it records and the files ``names`` beside it
    against the SHA-256 it records; return the record.

    A folder saved before checksums were recorded is refused too (not loaded with a
    warning): saved models are keyed caches, so re-running the notebook that made one
    costs little, and a warning would let a corrupt old file through unnoticed.
    """
    manifest = Path(manifest)
    record = read_json(manifest)
    if not isinstance(record, dict):
        raise ValueError(f"{manifest}: a saved model's record is a JSON object, not {type(record).__name__}; {RERUN}")
    sealed = record.get(RECORD_DIGEST)
    if sealed is None:
        raise ValueError(f"{manifest} records no {RECORD_DIGEST} (saved before its own content was checksummed); "
                         f"{RERUN}")
    if sealed != record_digest(record):
        raise ValueError(f"{manifest} was changed after it was saved: its content no longer has the SHA-256 "
                         f"{str(sealed)[:12]}... it records, so the model it describes would be rebuilt wrong; "
                         f"{RERUN}")
    recorded = record.get(CHECKSUMS)
    for name in dict.fromkeys(names):
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
    return record


FOLDER_MANIFEST = "integrity.json"


def seal_folder(folder: Path | str) -> None:
    """Record the SHA-256 of every file below ``folder`` in its ``integrity.json`` (for folders
    with no record of their own, such as a tokenizer's)."""
    folder = Path(folder)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != FOLDER_MANIFEST)
    write_json(folder / FOLDER_MANIFEST, with_checksums({}, folder, names))


def verify_folder(folder: Path | str) -> None:
    """Check every file ``integrity.json`` records below ``folder``, and that it records every file
    there (a tokenizer reads whatever json it finds); a folder without one is refused. Arrow caches
    that ``datasets`` writes beside a saved dataset (``cache-*.arrow``) are not the folder's own."""
    folder = Path(folder)
    manifest = folder / FOLDER_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing (the folder was saved before its files were checksummed, "
                                f"or was copied in part); {RERUN}")
    recorded = verify_checksums(manifest, []).get(CHECKSUMS) or {}
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != FOLDER_MANIFEST
                   and str(p.relative_to(folder)) not in recorded and not p.name.startswith("cache-"))
    if extra:
        raise ValueError(f"{folder} holds {len(extra)} file(s) its {FOLDER_MANIFEST} does not record, e.g. {extra[0]}, "
                         f"which could change what is loaded from it; {RERUN}")
    verify_checksums(manifest, list(recorded))


def without_seal(record: dict) -> dict:
    """A saved record's own fields, less the checksums and digest that :func:`with_checksums` added."""
    return {k: v for k, v in record.items() if k not in (CHECKSUMS, RECORD_DIGEST)}


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
    provenance.note(path)
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


def assert_finite(tensors: dict, where: str) -> None:
    """Raise a ValueError naming ``where`` and the first floating tensor holding NaN or inf.

    Integer, boolean and torch-quantized tensors are skipped (dequantize those first to check
    their scales). A NaN weight would otherwise quantize to zeros or spread NaN to every logit.
    """
    import torch  # here, as read_safetensors does: the config layer loads without torch
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "inf"
            raise ValueError(f"{where}: tensor {name!r} holds {kind} values")
