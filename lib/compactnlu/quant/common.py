"""What the eager-mode methods share (the x86 engine, quiet deprecation warnings, saving and
loading ``model.pt``), calibration batches, and where quantized artifacts go.

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

import numpy as np
import torch
from torch import nn

from ..cachekeys import artifact_dir
from ..model import MultiTaskNLU, NLUConfig, assert_finite
from .method import CONFIG_FILE, DETAILS_FILE, QuantizationMethod, skeleton, write_config

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


def read_torch_weights(path: Path) -> dict:
    try:
        with quiet_quantization():
            return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a readable torch weights file ({error})") from None


def load_state(model: nn.Module, state: dict, weights: Path) -> nn.Module:
    """``model`` (the rebuilt structure) holding ``state``, in eval mode; a misfit names the files."""
    try:
        with quiet_quantization():
            model.load_state_dict(state)
    except (RuntimeError, KeyError) as error:  # torch's quantized modules raise KeyError for missing qparams
        raise ValueError(f"{weights} does not fit {weights.parent / CONFIG_FILE} and {DETAILS_FILE}: {error}") from None
    return model.eval()


class TorchModelMethod(QuantizationMethod):
    """A method whose artifact is a ``MultiTaskNLU`` with quantized layers, its state in one file
    (``weights``): refused before saving if any tensor (scales included) is NaN or inf."""

    weights = ""

    def check(self, model: MultiTaskNLU, folder: Path, details: dict) -> None:
        assert_finite(float_tensors(model.state_dict()), f"saving the {self.name} model to {folder}")

    def weight_files(self, config: NLUConfig) -> list[str]:
        return [self.weights]

    def read_state(self, weights: Path) -> dict:
        raise NotImplementedError

    def checked_state(self, folder: Path) -> tuple[dict, Path]:
        """The saved state (its checksum already verified) and its path; NaN or inf is refused by name."""
        weights = folder / self.weights
        state = self.read_state(weights)
        assert_finite(float_tensors(state), str(weights))
        return state, weights


class EagerMethod(TorchModelMethod):
    """A torch.ao eager-mode method (static, dynamic): its models hold torch quantized tensors,
    which safetensors cannot store, so they go to ``model.pt``, read back with
    ``torch.load(weights_only=True)`` (no pickled code runs). Loading rebuilds the converted
    structure from the float config (``structure``), then loads the weights."""

    weights = "model.pt"

    def structure(self, model: MultiTaskNLU) -> MultiTaskNLU:
        """The converted structure of the float ``model``, without calibration."""
        raise NotImplementedError

    def write(self, model: MultiTaskNLU, tmp: Path, details: dict) -> dict:
        write_config(model, tmp)
        with quiet_quantization():
            torch.save(model.state_dict(), tmp / self.weights)
        return details

    def read_state(self, weights: Path) -> dict:
        return read_torch_weights(weights)

    def load(self, folder: Path, config: NLUConfig, details: dict) -> MultiTaskNLU:
        state, weights = self.checked_state(folder)
        with quiet_quantization():
            model = self.structure(skeleton(config))
        return load_state(model, state, weights)


def calibration_batches(data, collator, batch_size: int, seed: int):
    """Batches of the training split in a seeded random order (never dev or test)."""
    train = data.features["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    for start in range(0, len(order), batch_size):
        yield collator([train[int(i)] for i in order[start:start + batch_size]])


def quantized_dir(profile, variant: str, source: Path | str, details: dict | None = None,
                  artifact: str = "ptq") -> Path:
    """``artifacts/quantized/<variant>-<key>``: keyed by the profile fields that shape ``artifact``,
    the fp32 model's folder ``source`` (its name carries that model's own key) and the method's
    settings ``details``."""
    return artifact_dir(profile, artifact, variant, {**(details or {}), "source": Path(source).name})
