"""Which kernel runs a stored low-bit layer: chosen by measuring on the CPU at hand.

The same stored integers can run on several kernels, and which one is fastest depends on
the CPU far more than on the arithmetic: on a CPU with AVX-512 VNNI ``torch._int_mm`` is the
fastest int8 matrix multiply torch has, while without VNNI torch falls back to a naive loop
30-50× slower than a float matrix multiply of the same shape. No CPU flag predicts that
reliably (torch's own dispatch decides), so the choice is a short measurement:

- ``kernel_works``: the one capability check in front of torch's private ops. It runs a
  kernel on a tiny input and answers False on any error, so a torch build without the op,
  or where it misbehaves, only loses a candidate.
- ``measure``: a few interleaved timed calls per kernel on one layer shape, median. The
  floor (the dequantized float path) is timed first; another kernel is refused without
  waiting for a full call if a call on 1/32, then 1/4 of the rows already takes longer than
  the floor on all of them, so a pathological kernel costs a few floor calls, not seconds.
- ``fastest``: the kernel with the smallest median; the floor wins ties and is always a
  candidate, so a chosen kernel is never slower than it (as measured).
- A JSON cache (``default_cache_path``), keyed by CPU model, torch version, quantized engine,
  thread count and ISA-limiting settings, then by layer shape, bits and rows: a model loads
  without measuring again.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..artifacts import read_json, write_json
from ..cpu import cpu_model, isa_flags

FLOOR = "dequant"
CANDIDATES = (FLOOR, "int_mm", "fbgemm")  # what a measured choice picks from, the floor first
# Settings that change which kernels torch dispatches to, so they key the cache like the CPU does.
# DNNL_MAX_CPU_ISA is oneDNN's older name for ONEDNN_MAX_CPU_ISA, still honoured.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS",
           "MKL_ENABLE_INSTRUCTIONS")
# A representative batch: 32 utterances of ~24 tokens (MASSIVE's median length in subwords).
DEFAULT_ROWS = 768
# The study's batches: one utterance, 32 and 128 of them (the benchmark's pass).
STUDY_ROWS = (24, DEFAULT_ROWS, 128 * 24)
PROBE_SHARES = (32, 4)  # before its first full call, a kernel runs on 1/32, then 1/4 of the rows
REPEATS = 5
BUDGET_S = 0.25  # after three rounds, a shape whose rounds took this long stops measuring

TimeCall = Callable[[str, int], float]  # (kernel, rows) -> seconds of one call


# ---------------------------------------------------------------- capability check

def _extremes(rows: int, cols: int) -> torch.Tensor:
    """int8 rows of -128 and 127 in runs: adjacent products of ±127·128 are where an int8 kernel
    built on 16-bit pair sums (``vpmaddubsw``, no VNNI) saturates."""
    pattern = torch.tensor([127, 127, -128, -128, 127, -128, -128, 127], dtype=torch.int8)
    return torch.stack([pattern.roll(i).repeat(cols // 8) for i in range(rows)])


def _probe_int_mm() -> bool:
    # Exact int32 results on extreme values: oneDNN limited to AVX2 on a CPU that torch
    # believes has VNNI (ONEDNN_MAX_CPU_ISA=AVX2 here) returns saturated sums.
    a, b = _extremes(4, 16), _extremes(3, 16).t()
    return torch.equal(torch._int_mm(a, b), a.int() @ b.int())


def _probe_fbgemm() -> bool:
    # Extreme weights and inputs at both ends of their range: a saturating kernel would be off
    # by whole units, while 7-bit input rounding moves each output by at most 16 · 2/127 · 1.
    weight = _extremes(4, 16).float().clamp(min=-127) / 127
    scales = torch.full((4,), 1 / 127, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated; the probe says if they go
        qweight = torch.quantize_per_channel(weight, scales, torch.zeros(4, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qweight, None)
    x = _extremes(3, 16).float().clamp(min=-127) / 127
    y = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True)
    return y.shape == (3, 4) and bool(torch.allclose(y, x @ weight.t(), atol=0.3))


def _probe_int4pack() -> bool:
    integers = (torch.arange(16 * 32, dtype=torch.int32).reshape(16, 32) % 16)  # values 0..15 = int4 + 8
    packed = torch._convert_weight_to_int4pack_for_cpu(integers, 1)
    scales_and_zeros = torch.stack([torch.ones(16), torch.zeros(16)], -1).unsqueeze(0).to(torch.bfloat16)
    x = torch.ones(1, 32, dtype=torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    return torch.equal(y.float(), (integers - 8).sum(1).float().unsqueeze(0))


PROBES: dict[str, Callable[[], bool]] = {"int_mm": _probe_int_mm, "fbgemm": _probe_fbgemm,
                                          "int4pack": _probe_int4pack, FLOOR: lambda: True}


def kernel_works(kernel: str) -> bool:
    """Whether ``kernel`` runs and gives the right answer on a tiny input here; False on any error."""
    try:
        return bool(PROBES[kernel]())
    except Exception:  # a missing op, an unsupported CPU or engine: all just mean "not here"
        return False


# ---------------------------------------------------------------- measuring and choosing

def time_layers(layers: Mapping[str, torch.nn.Module], x: torch.Tensor) -> TimeCall:
    """A ``TimeCall`` that runs ``layers[kernel]`` on the first ``rows`` rows of ``x``."""
    def time_call(kernel: str, rows: int) -> float:
        part = x[:rows]
        start = time.perf_counter()
        layers[kernel](part)
        return time.perf_counter() - start
    return time_call


def _too_slow(time_call: TimeCall, kernel: str, rows: int, floor_s: float) -> bool:
    """Whether ``kernel`` is refused before a full call: a call on ``rows / share`` rows,
    for each share of ``PROBE_SHARES`` in turn, takes longer than the floor on all rows."""
    for step, share in enumerate(PROBE_SHARES):
        part = max(1, rows // share)
        seconds = time_call(kernel, part)
        if seconds > floor_s and step == 0:  # a kernel's first call may pay for set-up: once more
            seconds = time_call(kernel, part)
        if seconds > floor_s:
            return True
    return False


def measure(time_call: TimeCall, kernels: Sequence[str], rows: int, repeats: int = REPEATS,
            budget_s: float = BUDGET_S) -> dict[str, float | None]:
    """Median seconds of one call on ``rows`` rows per kernel; None for a refused kernel.

    ``kernels[0]`` is the floor: timed first, never refused. Another kernel is refused if it
    raises or if ``_too_slow`` says so: on 1/32 of the rows it must beat the floor on all rows
    (else it is over 32 times slower per row), then on 1/4 (else over 4 times). So a
    pathological kernel costs at most about ten floor calls (three for one 50 times slower),
    never a full call of its own (seconds for torch's naive ``_int_mm`` on a large layer).
    The rest are timed in turn, round after round, so a burst of load on a busy machine hits
    every kernel alike; a shape whose rounds take over ``budget_s`` stops after three.
    """
    floor, *others = kernels
    time_call(floor, rows)  # the first call of any kernel pays for allocations
    floor_s = time_call(floor, rows)
    racing = [floor]
    for kernel in others:
        try:
            if _too_slow(time_call, kernel, rows, floor_s):
                continue
            time_call(kernel, rows)  # warm-up at full size
        except Exception as error:  # a shape the kernel does not take: it is just not a candidate
            warnings.warn(f"kernel {kernel} failed on {rows} rows, not used: {error}", RuntimeWarning)
            continue
        racing.append(kernel)
    samples: dict[str, list[float]] = {kernel: [] for kernel in racing}
    spent = 0.0
    for round_ in range(repeats):
        for kernel in racing:
            seconds = time_call(kernel, rows)
            samples[kernel].append(seconds)
            spent += seconds
        if round_ >= 2 and spent > budget_s:
            break
    return {kernel: statistics.median(samples[kernel]) if kernel in samples else None for kernel in kernels}


def fastest(seconds: Mapping[str, float | None]) -> str:
    """The kernel with the smallest time (None: refused); the floor wins ties."""
    timed = {kernel: s for kernel, s in seconds.items() if s is not None}
    if FLOOR not in timed:
        raise ValueError(f"the floor kernel {FLOOR!r} must be measured, got {dict(seconds)}")
    return min(timed, key=lambda kernel: (timed[kernel], kernel != FLOOR))


# ---------------------------------------------------------------- the cache

def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/compactnlu/kernels.json`` (``~/.cache`` when unset): per machine, like the choice."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "compactnlu" / "kernels.json"


def machine_key() -> str:
    """What the timings depend on besides the shape: the CPU (its name AND its ISA flags: in a
    VM an AVX2-only EPYC and an AVX-512 VNNI one both say "AMD EPYC", and ``torch._int_mm`` is
    fast on one, a naive loop on the other), torch's kernels (its version, the vector ISA it
    dispatches, its quantized engine, ``ISA_ENV`` where set), the threads."""
    limits = "".join(f" | {name}={os.environ[name]}" for name in ISA_ENV if os.environ.get(name))
    return (f"{cpu_model()} [{' '.join(isa_flags())}] | torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}) | {torch.backends.quantized.engine} | "
            f"{torch.get_num_threads()} threads{limits}")


def shape_key(in_features: int, out_features: int, bits: int, rows: int) -> str:
    return f"{rows}x{in_features}->{out_features} {bits}-bit"


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        cache = read_json(path)
    except (ValueError, OSError) as error:  # a damaged or unreadable cache only costs a new measurement
        warnings.warn(f"ignoring the kernel cache: {error}", RuntimeWarning)
        return {}
    return cache if isinstance(cache, dict) else {}


def cached_choices(path: Path | str) -> dict[str, dict]:
    """This machine's entries of the cache at ``path``: shape key -> ``{"kernel", "seconds"}``."""
    entries = _read_cache(Path(path)).get(machine_key(), {})
    return entries if isinstance(entries, dict) else {}


def save_choices(path: Path | str, entries: Mapping[str, dict]) -> None:
    """Add ``entries`` to this machine's part of the cache. The file is read again just before
    the atomic write, so another process's new entries are kept unless both wrote at once
    (then the loser's entries are measured again next time: a cost, never a wrong answer).
    A cache that cannot be written (a read-only home) is a warning: the choice still holds."""
    path = Path(path)
    cache = _read_cache(path)
    mine = cache.get(machine_key())
    cache[machine_key()] = {**(mine if isinstance(mine, dict) else {}), **entries}
    try:
        write_json(path, cache)
    except OSError as error:
        warnings.warn(f"kernel choices not cached: {error}", RuntimeWarning)
