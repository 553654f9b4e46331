"""What the CPU can do, read from ``/proc/cpuinfo``: the model name and the instruction-set
flags that decide how integer kernels behave (torch's oneDNN/fbgemm, ONNX Runtime's MLAS).

Without VNNI (``avx512_vnni``, ``avx_vnni``) or AMX, x86 int8 kernels multiply uint8 by
int8 with ``vpmaddubsw``, whose 16-bit pair sums saturate (ORT's quantization docs,
"When to use reduce-range"); with them, products accumulate exactly in 32 bits.

``COMPACTNLU_ASSUME_NO_VNNI=1`` makes :func:`has_vnni` answer False on any machine, so
tests exercise the no-VNNI choices on a VNNI machine too (torch can be made to imitate
AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``; ONNX Runtime cannot).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# The flags a benchmark reports: what selects the int8 and bf16 kernels.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")
ASSUME_NO_VNNI = "COMPACTNLU_ASSUME_NO_VNNI"


def _first_field(cpuinfo: Path, names: tuple[str, ...]) -> str | None:
    """The value of the first ``name : value`` line whose name is in ``names``; None if absent."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() in names:
                    return value.strip()
    except OSError:  # not Linux, or /proc not mounted
        return None
    return None


def cpu_features(cpuinfo: Path | str = CPUINFO) -> set[str]:
    """The first processor's flags (``flags`` on x86, ``Features`` on ARM); empty if unknown."""
    value = _first_field(Path(cpuinfo), ("flags", "Features"))
    return set(value.split()) if value else set()


def cpu_model(cpuinfo: Path | str = CPUINFO) -> str:
    """The CPU's marketing name, or the architecture when /proc/cpuinfo does not say."""
    return _first_field(Path(cpuinfo), ("model name",)) or platform.processor() or platform.machine()


def assumed_no_vnni() -> bool:
    """Whether ``COMPACTNLU_ASSUME_NO_VNNI=1`` tells this process to act as on a CPU without VNNI."""
    value = os.environ.get(ASSUME_NO_VNNI, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ASSUME_NO_VNNI} must be 1 (assume no VNNI), 0 or unset, not {value!r}")
    return value == "1"


def has_vnni(features: set[str] | None = None) -> bool:
    """Whether int8 products accumulate exactly in 32 bits (VNNI or AMX); False when
    ``COMPACTNLU_ASSUME_NO_VNNI=1``."""
    if assumed_no_vnni():
        return False
    return bool(VNNI_FLAGS & (cpu_features() if features is None else features))


def isa_flags(features: set[str] | None = None) -> list[str]:
    """The benchmark-relevant flags this CPU has, in ``ISA_FLAGS`` order."""
    features = cpu_features() if features is None else features
    return [flag for flag in ISA_FLAGS if flag in features]
