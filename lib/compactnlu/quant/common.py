"""What static and dynamic PTQ share: the x86 engine, quiet deprecation warnings, save and load.

``torch.ao.quantization`` is deprecated in torch 2.13 (its successor is torchao's PT2E
flow, ``torchao.quantization.pt2e``), but it is still the eager-mode API the paper used.
Its warnings are caught here, once, so notebooks stay readable.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import atomic_dir, keyed_path
from ..model import MultiTaskNLU, NLUConfig

ENGINE = "x86"  # fbgemm kernels with x86 dispatch; the machine is x86-64


@contextlib.contextmanager
def quiet_quantization():
    """Silence torch.ao.quantization's deprecation and observer warnings inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        torch.backends.quantized.engine = ENGINE
        yield


def float_copy(model: MultiTaskNLU) -> MultiTaskNLU:
    return copy.deepcopy(model).eval()


def save_quantized(model: MultiTaskNLU, folder: Path | str, method: str, details: dict | None = None) -> Path:
    """``config.json`` + ``quantization.json`` + the weights.

    ``static`` and ``dynamic`` models hold torch quantized tensors, which safetensors cannot
    store: they go to ``model.pt``, read back with ``torch.load(weights_only=True)`` (no
    pickled code runs). ``precision`` models hold plain integer and float tensors:
    ``model.safetensors``; ``details`` must then carry ``policy``, ``per_channel``,
    ``per_layer`` and ``embedding`` so the structure can be rebuilt.
    """
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(model.config.to_json())
        (tmp / "quantization.json").write_text(json.dumps({"method": method, **(details or {})}, indent=1))
        if method == "precision":
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        else:
            with quiet_quantization():
                torch.save(model.state_dict(), tmp / "model.pt")
    return Path(folder)


def _precision_structure(model: MultiTaskNLU, details: dict) -> MultiTaskNLU:
    from .precision import apply_policy, precision_groups

    groups = precision_groups(model, per_layer=details["per_layer"], embedding=details["embedding"])
    return apply_policy(model, details["policy"], groups, per_channel=details["per_channel"])


def load_quantized(folder: Path | str) -> MultiTaskNLU:
    """Rebuild the quantized structure from the float config, then load the saved weights."""
    from .dynamic import dynamic_structure
    from .static import static_structure

    folder = Path(folder)
    config = NLUConfig.from_json((folder / "config.json").read_text())
    config.pretrained = None
    details = json.loads((folder / "quantization.json").read_text())
    skeleton = MultiTaskNLU(config).eval()
    if details["method"] == "precision":
        model = _precision_structure(skeleton, details)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval()
    with quiet_quantization():
        model = {"static": static_structure, "dynamic": dynamic_structure}[details["method"]](skeleton)
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval()


def calibration_batches(data, collator, batch_size: int, seed: int):
    """Batches of the training split in a seeded random order (never dev or test)."""
    import numpy as np

    train = data.features["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    for start in range(0, len(order), batch_size):
        yield collator([train[int(i)] for i in order[start:start + batch_size]])


def quantized_dir(profile, variant: str, details: dict) -> Path:
    """``artifacts/quantized/<variant>-<key>``: keyed by the profile and the method's settings."""
    return keyed_path(profile, "quantized", variant, details)
