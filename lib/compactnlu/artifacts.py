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
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_table(df: pd.DataFrame, path: Path | str, float_format: str = "%.4f") -> Path:
    """Write a result table as CSV and, beside it, as Markdown for reading on the web."""
    path = Path(path)
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format=float_format))
    md = df.to_markdown(index=False, floatfmt=float_format.lstrip("%"))
    atomic_write(path.with_suffix(".md"), lambda tmp: tmp.write_text(md + "\n", encoding="utf-8"))
    return path


# The study's variants in the order its tables list them.
VARIANT_ORDER = ["baseline", "teacher_idsf", "teacher_iddc", "teacher_dcsf", "kd", "baseline_static",
                 "baseline_dynamic", "kd_static", "kd_dynamic", "kd_pcptq", "baseline_pcptq", "kd_pcptq_fast", "kd_onnx_int8"]


def upsert_rows(path: Path | str, rows: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """Replace the rows of ``path`` that share ``key`` with ``rows``; append the new ones.

    Lets each notebook add its variants to a shared table (``massive_single_test.csv``)
    and be rerun without duplicating them. Rows are kept in the study's variant order.
    """
    path = Path(path)
    if path.exists():
        old = pd.read_csv(path)
        keep = ~old.set_index(key).index.isin(rows.set_index(key).index)
        rows = pd.concat([old[keep], rows], ignore_index=True)
    if "variant" in rows:
        rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
        rows = rows.iloc[rows["variant"].map(lambda v: rank.get(v, len(rank))).argsort(kind="stable")]
        rows = rows.reset_index(drop=True)
    write_table(rows, path)
    return rows


def keyed_path(profile, kind: str, name: str, details: dict) -> Path:
    """``artifacts/<kind>/<name>-<key>``, keyed by the profile's results and ``details``."""
    blob = json.dumps({"profile": profile.result_key, **details}, sort_keys=True, default=str)
    return profile.artifacts_dir / kind / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
