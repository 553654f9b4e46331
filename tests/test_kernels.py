"""The fast path's kernels: each agrees with the paper's ``PrecisionLinear`` within a bound
derived from its quantization steps, and the kernel a layer runs on is chosen by measurement.

No test depends on how fast anything is here: the chooser is fed injected timings (a fake
``time_call``), so the choice logic is exercised alike on AVX2-only and AVX-512/VNNI CPUs,
including the case this machine cannot imitate, a ``_int_mm`` tens of times slower than float.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch import nn

from compactnlu.artifacts import read_json
from compactnlu.quant import kernels
from compactnlu.quant import fast
from compactnlu.quant.fast import (ByRowsLinear, DequantizedLinear, FbgemmLinear, IntMatmulLinear, UnpackedEmbedding,
                                   choose_kernels, kernel_summary, quantize_input, to_fast)
from compactnlu.quant.kernels import fastest, kernel_works, measure
from compactnlu.quant.quantizer import fake_quantize
from compactnlu.quant.stored import PrecisionEmbedding, PrecisionLinear

ROWS = 64
needs = {kernel: pytest.mark.skipif(not kernel_works(kernel), reason=f"{kernel} does not run on this torch/CPU")
         for kernel in ("int_mm", "fbgemm", "int4pack")}


def fake_time_call(per_row: dict[str, float], calls: list | None = None, cold: dict[str, float] | None = None):
    """A ``TimeCall`` whose kernels cost ``per_row[kernel]`` seconds per row; ``cold`` adds
    that many seconds to a kernel's first call. ``calls`` records (kernel, rows)."""
    cold = dict(cold or {})

    def time_call(kernel: str, rows: int) -> float:
        if calls is not None:
            calls.append((kernel, rows))
        return per_row[kernel] * rows + cold.pop(kernel, 0.0)
    return time_call


def fake_time_layers(per_row: dict[str, float], calls: list):
    """A stand-in for ``kernels.time_layers`` with the timings of ``fake_time_call``."""
    return lambda layers, x: fake_time_call(per_row, calls)


def tiny_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(PrecisionLinear.from_linear(torch.nn.Linear(32, 64), 8), torch.nn.ReLU(),
                               PrecisionLinear.from_linear(torch.nn.Linear(64, 32), 4), torch.nn.ReLU(),
                               PrecisionLinear.from_linear(torch.nn.Linear(32, 32), 4),
                               PrecisionLinear.from_linear(torch.nn.Linear(32, 16), 16))


# ---------------------------------------------------------------- capability check

def test_capability_check_falls_back_when_the_op_raises(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no int8 matmul here")

    monkeypatch.setattr(torch, "_int_mm", broken)
    assert not kernel_works("int_mm") and kernel_works("dequant")
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="int_mm does not work"):
        forced = to_fast(model, "int_mm")
    assert kernel_summary(forced) == {"dequant": 4}
    # "auto" never measures or picks it, however fast the timings would say it is
    calls = []
    monkeypatch.setattr(kernels, "time_layers", fake_time_layers({"dequant": 1.0, "int_mm": 0.1, "fbgemm": 2.0},
                                                                 calls))
    auto = to_fast(model, rows=ROWS, cache=tmp_path / "kernels.json")
    assert "int_mm" not in kernel_summary(auto) and all(kernel != "int_mm" for kernel, _ in calls)
    monkeypatch.delattr(torch, "_int_mm")  # a torch without the op at all
    assert not kernel_works("int_mm")


@pytest.mark.parametrize("kernel,op", [("fbgemm", "quantize_per_channel"), ("int4pack", "_weight_int4pack_mm_for_cpu")])
def test_every_kernel_sits_behind_the_capability_check(monkeypatch, kernel, op):
    def broken(*args, **kwargs):
        raise RuntimeError("not on this build")

    monkeypatch.setattr(torch, op, broken)
    assert not kernel_works(kernel)


def test_the_floor_always_works_and_unknown_kernels_do_not():
    assert kernel_works("dequant")
    assert not kernel_works("no-such-kernel")


# ---------------------------------------------------------------- the chooser

def test_chooser_picks_the_fastest_of_the_injected_timings():
    order = ("dequant", "int_mm", "fbgemm")
    seconds = measure(fake_time_call({"dequant": 1.0, "int_mm": 0.5, "fbgemm": 0.3}), order, 768)
    assert fastest(seconds) == "fbgemm" and seconds["fbgemm"] == pytest.approx(0.3 * 768)
    assert fastest(measure(fake_time_call({"dequant": 1.0, "int_mm": 0.5, "fbgemm": 0.9}), order, 768)) == "int_mm"
    assert fastest(measure(fake_time_call({"dequant": 1.0, "int_mm": 1.5, "fbgemm": 1.2}), order, 768)) == "dequant"
    assert fastest({"dequant": 1.0, "int_mm": 1.0, "fbgemm": None}) == "dequant"  # ties go to the floor
    with pytest.raises(ValueError):
        fastest({"int_mm": 1.0})


def test_chooser_never_picks_a_kernel_slower_than_the_floor():
    rng = random.Random(0)
    for _ in range(200):
        per_row = {kernel: rng.choice([1e-6, 1e-3, 1.0]) * rng.uniform(0.1, 60) for kernel in
                   ("dequant", "int_mm", "fbgemm")}
        seconds = measure(fake_time_call(per_row), ("dequant", "int_mm", "fbgemm"), 768)
        chosen = fastest(seconds)
        assert per_row[chosen] <= per_row["dequant"]
        assert chosen == min(per_row, key=lambda k: (per_row[k], k != "dequant"))


@pytest.mark.parametrize("slowdown", [40.0, 5.0])
def test_a_pathological_kernel_is_refused_without_a_full_call(slowdown):
    # torch's naive _int_mm without VNNI: 30-50x a float matrix multiply. Over 32x is refused
    # on 1/32 of the rows, over 4x on 1/4: it never runs on all of them.
    calls = []
    per_row = {"dequant": 1e-6, "int_mm": slowdown * 1e-6, "fbgemm": 0.5e-6}
    seconds = measure(fake_time_call(per_row, calls), ("dequant", "int_mm", "fbgemm"), 768)
    assert seconds["int_mm"] is None and fastest(seconds) == "fbgemm"
    int_mm_rows = [rows for kernel, rows in calls if kernel == "int_mm"]
    assert int_mm_rows and max(int_mm_rows) <= 768 // 4
    assert sum(int_mm_rows) * per_row["int_mm"] <= 3 * 768 * per_row["dequant"]  # a few floor calls' worth


def test_a_slow_first_call_is_looked_at_again():
    per_row = {"dequant": 1e-6, "int_mm": 0.2e-6}
    seconds = measure(fake_time_call(per_row, cold={"int_mm": 1.0}), ("dequant", "int_mm"), 768)
    assert fastest(seconds) == "int_mm"


def test_a_kernel_that_raises_is_not_a_candidate():
    def time_call(kernel, rows):
        if kernel == "fbgemm":
            raise RuntimeError("unsupported shape")
        return 1e-6 * rows

    with pytest.warns(RuntimeWarning, match="fbgemm failed"):
        seconds = measure(time_call, ("dequant", "fbgemm"), 768)
    assert seconds == {"dequant": pytest.approx(768e-6), "fbgemm": None}


# ---------------------------------------------------------------- the cache

def test_choices_are_cached_reused_and_keyed_by_machine(monkeypatch, tmp_path):
    cache = tmp_path / "kernels.json"
    model = tiny_model()
    calls = []
    available = [k for k in ("dequant", "int_mm", "fbgemm") if kernel_works(k)]
    winner = available[-1]
    per_row = {k: (0.1 if k == winner else 1.0) for k in ("dequant", "int_mm", "fbgemm")}
    monkeypatch.setattr(kernels, "time_layers", fake_time_layers(per_row, calls))

    first = to_fast(model, rows=ROWS, cache=cache)
    assert calls and cache.exists()
    entries = read_json(cache)[kernels.machine_key()]
    assert set(entries) == {"64x32->64 8-bit", "64x64->32 4-bit", "64x32->32 4-bit"}  # 16-bit layers: no choice
    assert all(entry["kernel"] == winner for entry in entries.values())
    expected = {winner: 3, "dequant": 1} if winner != "dequant" else {"dequant": 4}
    assert kernel_summary(first) == expected

    # the same machine: read back, nothing measured, even if timings would now say otherwise
    calls.clear()
    per_row.update({k: 1.0 for k in per_row}, dequant=0.01)
    assert kernel_summary(to_fast(model, rows=ROWS, cache=cache)) == expected and not calls

    # another thread count, another CPU: measured again, and kept beside the first
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert kernel_summary(to_fast(model, rows=ROWS, cache=cache)) == {"dequant": 4} and calls
    calls.clear()
    monkeypatch.setattr(kernels, "cpu_model", lambda: "Another CPU")
    to_fast(model, rows=ROWS, cache=cache)
    assert calls and len(read_json(cache)) == 3
    # the same name with other ISA flags (a VM names an AVX2-only and an AVX-512 EPYC alike)
    calls.clear()
    monkeypatch.setattr(kernels, "isa_flags", lambda: ["avx2"])
    to_fast(model, rows=ROWS, cache=cache)
    assert calls and len(read_json(cache)) == 4 and "[avx2]" in kernels.machine_key()
    # a setting that limits torch's instruction set (it changes which kernel is fast) too
    calls.clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    to_fast(model, rows=ROWS, cache=cache)
    assert calls and len(read_json(cache)) == 5 and "ONEDNN_MAX_CPU_ISA=SSE41" in kernels.machine_key()
    # another number of rows is another key
    calls.clear()
    to_fast(model, rows=2 * ROWS, cache=cache)
    assert calls


def test_a_cached_choice_that_no_longer_works_is_measured_again(monkeypatch, tmp_path):
    cache = tmp_path / "kernels.json"
    calls = []
    monkeypatch.setattr(kernels, "time_layers", fake_time_layers({"dequant": 1.0, "int_mm": 1.0, "fbgemm": 1.0},
                                                                 calls))
    layer = tiny_model()[0]
    kernels.save_choices(cache, {kernels.shape_key(32, 64, 8, ROWS): {"kernel": "retired-kernel", "seconds": {}}})
    assert choose_kernels([layer], ROWS, cache) == {"64x32->64 8-bit": "dequant"} and calls


def test_a_damaged_cache_is_measured_again_and_rewritten(monkeypatch, tmp_path):
    cache = tmp_path / "kernels.json"
    cache.write_text("{not json", encoding="utf-8")
    calls = []
    monkeypatch.setattr(kernels, "time_layers", fake_time_layers({"dequant": 1.0, "int_mm": 2.0, "fbgemm": 2.0},
                                                                 calls))
    with pytest.warns(RuntimeWarning, match="ignoring the kernel cache"):
        choose_kernels([tiny_model()[0]], ROWS, cache)
    assert calls and kernels.machine_key() in read_json(cache)


def test_the_default_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "time_layers", fake_time_layers({"dequant": 1.0, "int_mm": 2.0, "fbgemm": 2.0}, []))
    to_fast(tiny_model(), rows=ROWS)
    assert kernels.machine_key() in read_json(tmp_path / "compactnlu" / "kernels.json")


def test_a_cache_that_cannot_be_written_only_warns(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setattr(kernels, "time_layers", fake_time_layers({"dequant": 1.0, "int_mm": 2.0, "fbgemm": 2.0}, []))
    with pytest.warns(RuntimeWarning, match="not cached"):
        fast = to_fast(tiny_model(), rows=ROWS, cache=blocker / "kernels.json")
    assert kernel_summary(fast) == {"dequant": 4}


def test_auto_with_real_timings_chooses_a_measured_kernel(tmp_path):
    # Which kernel wins depends on the CPU; only that the choice is recorded and used is checked.
    cache = tmp_path / "kernels.json"
    fast = to_fast(tiny_model(), rows=ROWS, cache=cache)
    entries = read_json(cache)[kernels.machine_key()]
    assert all(entry["seconds"]["dequant"] > 0 and entry["kernel"] in entry["seconds"] for entry in entries.values())
    assert sum(kernel_summary(fast).values()) == 4 and "paper" not in kernel_summary(fast)


# ---------------------------------------------------------------- each kernel against the paper's layer

def paper_layer(bits: int, per_channel: bool = True, in_features: int = 96, out_features: int = 40):
    torch.manual_seed(bits)
    return PrecisionLinear.from_linear(torch.nn.Linear(in_features, out_features), bits, per_channel)


def layer_input(in_features: int = 96) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 11, in_features) * 2 + 0.7  # off-centre, so fbgemm's zero point is not trivial


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_input_rounding_is_the_paper_paths_exactly(bits):
    x = layer_input()
    q, step = quantize_input(x, bits)
    assert torch.equal(q * step, fake_quantize(x, bits))
    assert q.abs().max() <= 2 ** (bits - 1) and torch.equal(q, q.round())
    zeros = torch.zeros(4, 8)
    assert torch.equal(quantize_input(zeros, bits)[0] * quantize_input(zeros, bits)[1], fake_quantize(zeros, bits))


@needs["int_mm"]
@pytest.mark.parametrize("bits", [4, 8])
def test_int_mm_computes_the_paper_layer_up_to_float_rounding(bits):
    layer, x = paper_layer(bits), layer_input()
    expected, got = layer(x), IntMatmulLinear(layer)(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_the_floor_is_the_paper_layer(bits):
    # the same weight, the same rounded input, the same F.linear: equal up to summation order
    layer, x = paper_layer(bits), layer_input()
    expected, got = layer(x), DequantizedLinear(layer)(x)
    tolerance = 1e-6 if bits < 16 else 1e-4  # 16 bits: the input is not rounded (under 2e-5 of its range)
    assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@needs["fbgemm"]
@pytest.mark.parametrize("bits,per_channel", [(4, True), (8, True), (8, False)])
def test_fbgemm_is_within_the_activation_steps_of_the_paper_layer(bits, per_channel):
    # Both paths multiply the same weight w by a rounded input: the paper's by x rounded to
    # its symmetric step s_p = max|x|/qmax (error ≤ s_p/2), fbgemm's by x rounded to its own
    # asymmetric 7-bit step s_f = range/127 (error ≤ s_f, the integer zero point included).
    # So each output differs by at most (s_p/2 + s_f) · ||w_row||_1.
    layer, x = paper_layer(bits, per_channel), layer_input()
    expected, got = layer(x), FbgemmLinear(layer)(x)
    assert got.shape == expected.shape
    s_p = x.abs().max() / (2 ** (bits - 1) - 1)
    s_f = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    bound = (s_p / 2 + s_f) * layer.dequantized_weight().abs().sum(1) + 1e-5 * float(expected.abs().max())
    assert ((got - expected).abs() <= bound).all()
    assert (got - expected).abs().max() > 0  # not the paper's arithmetic: the bound is doing the work


def extreme_layer_and_input(bits: int):
    """Every weight at ±qmax and inputs at the top of their range with one negative: the pairs
    of uint8 × int8 products that saturate a 16-bit sum without VNNI unless reduce_range."""
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight.copy_(torch.where(torch.arange(64 * 8).reshape(8, 64) % 3 == 0, -1.0, 1.0))
    x = torch.ones(5, 64)
    x[:, -1] = -1.0
    return PrecisionLinear.from_linear(linear, bits), x


@needs["fbgemm"]
@pytest.mark.parametrize("bits", [4, 8])
def test_fbgemm_does_not_saturate_on_extreme_values(bits):
    # Run under `make unit-avx2` (FBGEMM_ENABLE_INSTRUCTIONS=AVX2), this is the CPU without VNNI:
    # with reduce_range=False the outputs here are off by whole units.
    layer, x = extreme_layer_and_input(bits)
    expected, got = layer(x), FbgemmLinear(layer)(x)
    s_f = 2.0 / 127
    bound = s_f * layer.dequantized_weight().abs().sum(1) + 1e-5 * float(expected.abs().max())
    assert ((got - expected).abs() <= bound).all()


@needs["fbgemm"]
def test_fbgemm_holds_the_stored_integers():
    layer = paper_layer(4)
    fast = FbgemmLinear(layer)
    unpacked = torch.ops.quantized.linear_unpack(fast.packed)[0]
    assert torch.equal(unpacked.int_repr(), layer.integers().to(torch.int8))
    assert torch.allclose(unpacked.q_per_channel_scales().float(), layer.scale.reshape(-1))


# ---------------------------------------------------------------- to_fast and its summary

def test_to_fast_on_a_tiny_model_gives_a_kernel_summary(tmp_path):
    model = tiny_model()
    assert kernel_summary(model) == {"paper": 4}
    x = torch.randn(5, 32)
    floor = to_fast(model, "dequant")
    assert kernel_summary(floor) == {"dequant": 4}
    assert torch.allclose(floor(x), model(x), rtol=1e-5, atol=1e-5)
    for kernel in ("int_mm", "fbgemm"):
        if kernel_works(kernel):
            assert kernel_summary(to_fast(model, kernel)) == {kernel: 3, "dequant": 1}
    if kernel_works("int4pack"):  # 4-bit layers with whole 32-column groups; the 8-bit one int_mm if it works
        expected = Counter(int4pack=2, dequant=1) + Counter(["int_mm" if kernel_works("int_mm") else "dequant"])
        assert kernel_summary(to_fast(model, "int4pack")) == dict(expected)
    with pytest.raises(ValueError):
        to_fast(model, "int3")
    assert kernel_summary(model) == {"paper": 4}  # the original is left as it is


@needs["fbgemm"]
def test_a_call_runs_the_kernel_measured_for_the_nearest_rows():
    layer = PrecisionLinear.from_linear(nn.Linear(32, 8), 8)
    by_rows = ByRowsLinear(layer, {24: "dequant", 3072: "fbgemm"})  # the bound: sqrt(24 * 3072) = 271.5
    assert [by_rows.kernel_for(r) for r in (1, 24, 271, 272, 3072, 10**6)] == ["dequant"] * 3 + ["fbgemm"] * 3
    for rows, kernel in ((5, "dequant"), (400, "fbgemm")):
        x = torch.randn(rows, 32)
        assert torch.equal(by_rows(x), by_rows.paths[kernel](x))
    assert kernel_summary(nn.Sequential(by_rows)) == {"dequant | fbgemm from 272 rows": 1}
    merged = ByRowsLinear(layer, {24: "dequant", 768: "fbgemm", 3072: "fbgemm"})  # a change at one bound only
    assert merged.kernels == ["dequant", "fbgemm"] and merged.kernel == "dequant | fbgemm from 136 rows"


def test_to_fast_splits_a_layer_by_rows_only_where_the_choices_differ(monkeypatch):
    def choices(layers, rows, cache):  # as if measured: dequant wins on few rows, fbgemm on many
        return {fast._shape_key(layer, rows): "dequant" if rows < 100 or layer.bits == 4 else "fbgemm"
                for layer in layers}

    monkeypatch.setattr(fast, "choose_kernels", choices)
    monkeypatch.setattr(fast.kernels, "kernel_works", lambda kernel: True)
    model = to_fast(tiny_model(), rows=(24, 768))
    assert isinstance(model[0], ByRowsLinear) and model[0].kernels == ["dequant", "fbgemm"]  # the 8-bit layer
    assert kernel_summary(model) == {"dequant": 3, "dequant | fbgemm from 136 rows": 1}
    assert kernel_summary(to_fast(tiny_model(), rows=768)) == {"dequant": 3, "fbgemm": 1}


@pytest.mark.parametrize("bits,per_channel", [(4, True), (4, False), (8, True), (16, True)])
def test_to_fast_unpacks_a_stored_embedding_to_the_same_numbers(bits, per_channel):
    torch.manual_seed(3)
    table = PrecisionEmbedding.from_embedding(nn.Embedding(13, 7, padding_idx=1), bits, per_channel)
    fast = to_fast(nn.Sequential(table), "dequant")[0]
    assert isinstance(fast, UnpackedEmbedding) and fast.table.dtype != torch.float32
    ids = torch.tensor([[0, 12, 1, 5], [7, 7, 3, 2]])
    assert torch.equal(fast(ids), table(ids))
