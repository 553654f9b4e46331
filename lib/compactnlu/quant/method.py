"""What a quantization method is here: a handler that says how its artifact is checked,
written and loaded back as something that runs, and the one versioned record every
artifact carries (``quantization.json``).

A handler subclasses ``QuantizationMethod``; ``registry.METHODS`` lists them by ``name``. A
method's settings are a frozen dataclass (a ``MethodConfig``), checked when it is made and written
to the record field by field. Each artifact folder holds the method's files and ``quantization.json``:
``{"format_version": 1, "method": <name>, <the settings>, <what the handler adds>, "checksums":
{file: SHA-256}, "record_sha256": <SHA-256 of the record itself>}``; the checksums cover
``config.json`` too. Loading reads the recorded method and dispatches to its handler
(``registry.load_quantized``); ``MethodConfig.from_record`` reads the settings back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import RERUN, atomic_dir, read_json, verify_checksums, with_checksums, write_json
from ..model import MultiTaskNLU, NLUConfig

FORMAT_VERSION = 1  # raise it when a handler changes what it writes; loaders refuse other versions
DETAILS_FILE = "quantization.json"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class MethodConfig:
    """A method's settings. A subclass is a frozen dataclass that refuses a bad value in
    ``__post_init__`` (a ValueError naming the field); ``quantization.json`` holds its fields."""

    @classmethod
    def from_record(cls, record: Mapping) -> "MethodConfig":
        """The settings a ``quantization.json`` record (or any mapping written from them) holds;
        its other fields (checksums, what the handler measured) are left out."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in record
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__}: the record has no {', '.join(missing)}")
        return cls(**{f.name: record[f.name] for f in fields if f.name in record})


class QuantizationMethod:
    """One quantization method: its settings' dataclass, and what saving and loading need."""

    name: str = ""  # what quantization.json records
    config: type[MethodConfig] = MethodConfig  # its settings

    def check(self, source, folder: Path, details: dict) -> None:
        """Refuse ``source`` or ``details`` before anything is written (NaN or inf weights, bad settings)."""

    def write(self, source, tmp: Path, details: dict) -> dict:
        """Write the method's files (``config.json`` included) into the fresh folder ``tmp``;
        return the details to record."""
        raise NotImplementedError

    def weight_files(self, config: NLUConfig) -> list[str]:
        """The files whose SHA-256 ``quantization.json`` records and every load checks."""
        raise NotImplementedError

    def load(self, folder: Path, config: NLUConfig, details: dict):
        """What runs: a model with ``__call__(**batch)``, ``.tasks``, ``.decode_slots`` and ``.eval()``.
        The checksums are verified before this is called."""
        raise NotImplementedError


def save_artifact(method: QuantizationMethod, source, folder: Path | str, config: MethodConfig | Mapping | None = None,
                  provenance: Mapping | None = None) -> Path:
    """``method``'s files and the versioned ``quantization.json`` in ``folder``, written atomically.
    ``config``: the method's settings (a mapping is recorded as it is: records made by hand, in
    tests); ``provenance``: what else to record (what it was made from, what a search saw)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, method.config):
        raise ValueError(f"the {method.name} method takes a {method.config.__name__}, got {type(config).__name__}")
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    folder, details = Path(folder), {**settings, **(provenance or {})}
    method.check(source, folder, details)
    with atomic_dir(folder) as tmp:
        recorded = method.write(source, tmp, details)
        record = {"format_version": FORMAT_VERSION, "method": method.name, **recorded}
        sealed = sealed_files(method, NLUConfig.read(tmp / CONFIG_FILE))
        write_json(tmp / DETAILS_FILE, with_checksums(record, tmp, sealed))
    return folder


def sealed_files(method: QuantizationMethod, config: NLUConfig) -> list[str]:
    """What ``quantization.json`` records the SHA-256 of: the config the model is rebuilt from
    (its tag order, pooling, activation shape the outputs as much as the weights do) and the
    method's weight files."""
    return [CONFIG_FILE, *method.weight_files(config)]


def read_record(path: Path, methods) -> dict:
    """``quantization.json``'s record, its method one of ``methods`` and its version this one's."""
    record = read_json(path)
    method = record.get("method") if isinstance(record, dict) else None
    if method not in methods:
        raise ValueError(f"{path}: method must be one of {sorted(methods)}, got {method!r}; a method is loaded "
                         "only once it is registered in compactnlu.quant.registry; otherwise " + RERUN)
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        found = "records no format_version (saved before it was recorded)" if version is None else \
            f"has format_version {version!r}"
        raise ValueError(f"{path} {found}; this compactnlu reads format_version {FORMAT_VERSION}: {RERUN}")
    verify_checksums(path, [])  # the record's own seal: a hand-edited setting is refused
    return record


def write_config(model: MultiTaskNLU, tmp: Path) -> None:
    (tmp / CONFIG_FILE).write_text(model.config.to_json())


def skeleton(config: NLUConfig) -> MultiTaskNLU:
    """A float model of ``config``'s shape to load quantized weights into (no pretrained download)."""
    return MultiTaskNLU(dataclasses.replace(config, pretrained=None)).eval()
