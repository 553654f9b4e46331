"""The base of the ONNX Runtime methods (ORT int8, MatMulNBits): what they check and what runs."""

from __future__ import annotations

from pathlib import Path

from ..model import NLUConfig
from ..onnx_runtime import CRF_FILE, ONNX_FILE, OnnxNLU
from .method import QuantizationMethod


class OnnxMethod(QuantizationMethod):
    """What the ONNX methods share: the graph and the CRF are the checked files, and an
    ``OnnxNLU`` (an ONNX Runtime session) is what runs."""

    def weight_files(self, config: NLUConfig) -> list[str]:
        return [ONNX_FILE] + ([CRF_FILE] if "sf" in config.tasks else [])

    def load(self, folder: Path, config: NLUConfig, details: dict) -> OnnxNLU:
        return OnnxNLU.load(folder)
