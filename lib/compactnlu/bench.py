"""Measurements made the same way for every variant of the study."""

from __future__ import annotations

from pathlib import Path


# What a deployment loads: weights (embeddings included), scales, configs; not training logs.
DEPLOYED = ("model.*", "config.json", "quantization.json")


def artifact_size_mb(folder: Path | str) -> float:
    """Bytes on disk of a saved model artifact, in MB (10^6 bytes)."""
    folder = Path(folder)
    files = {p for pattern in DEPLOYED for p in folder.glob(pattern) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"no saved model in {folder}")
    return sum(p.stat().st_size for p in files) / 1e6
