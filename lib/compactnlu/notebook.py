"""What every notebook does first (load the profile, quiet the noise, say where things go) and last
(record its key numbers, which ``tests/test_notebook_results.py`` asserts after the smoke run)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import transformers

from . import provenance
from .artifacts import read_json, write_json
from .config import ROOT, Profile, load_profile


def start(profile: str, overrides: dict | None = None) -> Profile:
    """Load the profile and set up logging; print what this run will read and write."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    transformers.logging.set_verbosity_error()  # no warnings, but the Trainer's progress bar stays
    transformers.logging.enable_progress_bar()
    # Progress bars of dataset maps flood papermill's logs; notebooks show their own tqdm bars.
    if os.environ.get("PAPERMILL_EXECUTION") or not os.isatty(1):
        datasets.disable_progress_bars()
    p = load_profile(profile, overrides)
    provenance.set_run(p)  # every table and figure this notebook writes names its code and profile
    changed = {k: v for k, v in (overrides or {}).items()}
    print(f"profile: {p.name}" + (f" with overrides {changed}" if changed else ""))
    print(f"MASSIVE: {p.data_dir}" + (" (synthetic stand-in corpus)" if p.synthetic_data else ""))
    print(f"figures and tables: {p.figures_dir}")
    print(f"cached artifacts: {p.artifacts_dir}")
    return p


def records_dir(profile: Profile) -> Path:
    """``runs/<profile>/records``: beside the profile's executed notebooks (the default profile's
    figures are the committed ``figures/``, its records are not committed)."""
    figures = profile.figures_dir
    run = figures.parent if figures.parent.parent == ROOT / "runs" else ROOT / "runs" / profile.name
    return run / "records"


def _plain(value):
    """``value`` with numpy scalars as Python numbers, so the record is plain JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def record(profile: Profile, notebook: str, **values) -> Path:
    """Add ``values`` (numbers, booleans, strings, lists and dicts of them) to the notebook's record,
    ``runs/<profile>/records/<notebook>.json``, written atomically."""
    path = records_dir(profile) / f"{notebook}.json"
    recorded = read_json(path) if path.exists() else {}
    return write_json(path, {**recorded, **_plain(values)})
