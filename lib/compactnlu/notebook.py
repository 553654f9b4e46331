"""What every notebook does first: load the profile, quiet the noise, say where things go."""

from __future__ import annotations

import logging
import os

import datasets
import transformers

from .config import Profile, load_profile


def start(profile: str, overrides: dict | None = None) -> Profile:
    """Load the profile and set up logging; print what this run will read and write."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    transformers.logging.set_verbosity_error()
    # Progress bars of dataset maps flood papermill's logs; notebooks show their own tqdm bars.
    if os.environ.get("PAPERMILL_EXECUTION") or not os.isatty(1):
        datasets.disable_progress_bars()
    p = load_profile(profile, overrides)
    changed = {k: v for k, v in (overrides or {}).items()}
    print(f"profile: {p.name}" + (f" with overrides {changed}" if changed else ""))
    print(f"MASSIVE: {p.data_dir}" + (" (synthetic stand-in corpus)" if p.synthetic_data else ""))
    print(f"figures and tables: {p.figures_dir}")
    print(f"cached artifacts: {p.artifacts_dir}")
    return p
