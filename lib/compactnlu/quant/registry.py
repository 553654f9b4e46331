"""Every quantization method by the name ``quantization.json`` records, and the two calls that
use them: ``save_quantized`` and ``load_quantized``.

Adding a method: a module with its settings (a ``MethodConfig`` dataclass) and a
``QuantizationMethod`` subclass naming them (``method.py`` says what it defines), one entry in
``METHODS`` below, one test file. Loading reads the recorded method and its ``format_version``
and dispatches to the handler; it never guesses a format from which files a folder holds.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import verify_checksums
from ..model import NLUConfig
from .dynamic import DynamicPTQ
from .method import (CONFIG_FILE, DETAILS_FILE, MethodConfig, QuantizationMethod, read_record, save_artifact,
                     sealed_files)
from .onnx_int8 import ORT_INT8
from .onnx_nbits import ONNX_NBITS
from .precision import PrecisionPTQ
from .static import StaticPTQ

METHODS: dict[str, QuantizationMethod] = {m.name: m for m in (
    StaticPTQ(), DynamicPTQ(), PrecisionPTQ(), ORT_INT8, ONNX_NBITS,
)}


def method_of(config: MethodConfig) -> QuantizationMethod:
    """The registered method whose settings ``config`` is."""
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise ValueError(f"no registered method takes a {type(config).__name__}; methods: {sorted(METHODS)}")


def save_quantized(source, folder: Path | str, method: str | MethodConfig, details: dict | None = None) -> Path:
    """``source`` saved by the method's handler in ``folder``, with a ``quantization.json``
    recording the format version, the method, its settings, ``details`` and the files' SHA-256.

    ``method`` is the method's settings (``StaticConfig(n_batches=100)``, ...: the method is the
    one registered with them, ``details`` what else to record), or a registered method's name
    with ``details`` recorded as they are (records made by hand, in tests). ``source`` is what the
    method saves: the quantized model for ``static``, ``dynamic`` and ``precision``, the fp32 ONNX
    folder for ``onnxruntime_dynamic``, the precision model for ``onnx_matmulnbits``.
    """
    if isinstance(method, MethodConfig):
        return save_artifact(method_of(method), source, folder, method, details)
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    return save_artifact(METHODS[method], source, folder, details)


def read_details(folder: Path | str) -> dict:
    """The record of a quantized artifact, its method registered and its format version this one's."""
    return read_record(Path(folder) / DETAILS_FILE, METHODS)


def read_config(folder: Path | str) -> MethodConfig:
    """The settings a quantized artifact was made with, as its method's ``MethodConfig``."""
    record = read_details(folder)
    return METHODS[record["method"]].config.from_record(record)


def load_quantized(folder: Path | str, labels=None):
    """What runs, as the recorded method's handler loads it: ``quantization.json`` checked against
    its own recorded SHA-256, ``config.json`` and the weight files against theirs, then for NaN and
    inf and what the method checks besides (for ``precision``, the bits each layer is recorded with).
    ``labels``, the data's ``LabelSpace``, makes a model for other labels an error."""
    folder = Path(folder)
    details = read_details(folder)  # its seal checked
    method = METHODS[details["method"]]
    # config.json before it is read (it names the weight files), then the weight files
    verify_checksums(folder / DETAILS_FILE, [CONFIG_FILE])
    config = NLUConfig.read(folder / CONFIG_FILE)
    verify_checksums(folder / DETAILS_FILE, [f for f in sealed_files(method, config) if f != CONFIG_FILE])
    if labels is not None:
        config.check_labels(labels, folder / CONFIG_FILE)
    return method.load(folder, config, details)
