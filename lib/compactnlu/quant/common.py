"""What static and dynamic PTQ share: the x86 engine, quiet deprecation warnings, save and load.

``torch.ao.quantization`` is deprecated in torch 2.13 (its successor is torchao's PT2E
flow, ``torchao.quantization.pt2e``), but it is still the eager-mode API the paper used.
Its warnings are caught here, once, so notebooks stay readable.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..artifacts import (atomic_dir, read_json, read_safetensors, verify_checksums, with_checksums,
                         write_json)
from ..cachekeys import artifact_dir
from ..model import MultiTaskNLU, NLUConfig, assert_finite

ENGINE = "x86"  # fbgemm kernels with x86 dispatch; the machine is x86-64
WEIGHT_FILES = {"static": "model.pt", "dynamic": "model.pt", "precision": "model.safetensors"}


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


def float_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a (quantized) state dict as float, for ``assert_finite``: torch-quantized
    tensors dequantized (a NaN or inf scale shows there), packed ``(weight, bias)`` pairs split."""
    out = {}
    for name, value in state.items():
        parts = zip((".weight", ".bias"), value) if isinstance(value, tuple) else [("", value)]
        for suffix, tensor in parts:
            if isinstance(tensor, torch.Tensor):
                out[name + suffix] = tensor.dequantize() if tensor.is_quantized else tensor
    return out


def save_quantized(model: MultiTaskNLU, folder: Path | str, method: str, details: dict | None = None) -> Path:
    """``config.json`` + ``quantization.json`` (the method, ``details`` and the weights' SHA-256) + the weights.

    ``static`` and ``dynamic`` models hold torch quantized tensors, which safetensors cannot
    store: they go to ``model.pt``, read back with ``torch.load(weights_only=True)`` (no
    pickled code runs). ``precision`` models hold plain integer and float tensors:
    ``model.safetensors``; ``details`` must then carry ``policy``, ``per_channel``,
    ``per_layer`` and ``embedding`` so the structure can be rebuilt.
    """
    if method not in WEIGHT_FILES:
        raise ValueError(f"method must be one of {sorted(WEIGHT_FILES)}, got {method!r}")
    state = model.state_dict()
    assert_finite(float_tensors(state), f"saving the {method} model to {folder}")
    weights = WEIGHT_FILES[method]
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(model.config.to_json())
        if method == "precision":
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / weights)
        else:
            with quiet_quantization():
                torch.save(state, tmp / weights)
        write_json(tmp / "quantization.json", with_checksums({"method": method, **(details or {})}, tmp, [weights]))
    return Path(folder)


def _precision_structure(model: MultiTaskNLU, details: dict, source: Path) -> MultiTaskNLU:
    from .precision import apply_policy, precision_groups

    try:
        groups = precision_groups(model, per_layer=details["per_layer"], embedding=details["embedding"])
        return apply_policy(model, details["policy"], groups, per_channel=details["per_channel"])
    except (KeyError, TypeError, ValueError) as error:  # a missing field, an unknown group, bad bits
        raise ValueError(f"{source}: cannot rebuild the precision structure: {error!r}") from None


def _read_torch_weights(path: Path) -> dict:
    try:
        with quiet_quantization():
            return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a readable torch weights file ({error})") from None


def load_quantized(folder: Path | str, labels=None) -> MultiTaskNLU:
    """Rebuild the quantized structure from the float config, then load the saved weights.

    The weights are checked against the SHA-256 that ``quantization.json`` records, for NaN and
    inf (scales included) and, for ``precision``, against the bits each layer is recorded with.
    ``labels``, the data's ``LabelSpace``, makes a model for other labels an error.
    """
    from .dynamic import dynamic_structure
    from .precision import check_stored_integers
    from .static import static_structure

    folder = Path(folder)
    config_file, details_file = folder / "config.json", folder / "quantization.json"
    config = NLUConfig.read(config_file)
    if labels is not None:
        config.check_labels(labels, config_file)
    config.pretrained = None
    details = read_json(details_file)
    method = details.get("method") if isinstance(details, dict) else None
    if method not in WEIGHT_FILES:
        raise ValueError(f"{details_file}: method must be one of {sorted(WEIGHT_FILES)}, got {method!r}")
    weights = folder / WEIGHT_FILES[method]
    verify_checksums(details_file, [weights.name])
    state = read_safetensors(weights) if method == "precision" else _read_torch_weights(weights)
    assert_finite(float_tensors(state), str(weights))
    skeleton = MultiTaskNLU(config).eval()
    if method == "precision":
        model = _precision_structure(skeleton, details, details_file)
        check_stored_integers(model, state, str(weights))
    else:
        with quiet_quantization():
            model = {"static": static_structure, "dynamic": dynamic_structure}[method](skeleton)
    try:
        with quiet_quantization():
            model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not fit {config_file} and {details_file.name}: {error}") from None
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
    return artifact_dir(profile, "ptq", variant, details)
