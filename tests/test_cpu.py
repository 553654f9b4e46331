"""``compactnlu.cpu``: CPU model and flags from /proc/cpuinfo, the VNNI answer and its override;
the benchmark's environment table names them and the ONNX Runtime int8 choice; under
``make unit-avx2`` torch really runs as on a CPU with AVX2 only.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from compactnlu import bench
from compactnlu.artifacts import with_checksums
from compactnlu.cpu import ASSUME_NO_VNNI, cpu_features, cpu_model, has_vnni, isa_flags
from compactnlu.quant.method import FORMAT_VERSION

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd asimddp sve
CPU implementer\t: 0x41
"""


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path
    return write


@pytest.fixture
def real_cpu(monkeypatch):
    """Answers about this machine, not what ``make unit-avx2`` tells the process to assume."""
    monkeypatch.delenv(ASSUME_NO_VNNI, raising=False)


def test_features_and_model_from_cpuinfo(cpuinfo, tmp_path):
    x86 = cpuinfo(X86)
    assert cpu_features(x86) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_model(x86) == "AMD EPYC 7B12"
    arm = cpuinfo(ARM)
    assert cpu_features(arm) == {"fp", "asimd", "asimddp", "sve"}
    assert cpu_model(arm)  # no "model name" line: the architecture instead
    assert cpu_features(tmp_path / "missing") == set()


def test_vnni_from_flags(real_cpu):
    assert not has_vnni({"avx2", "fma"})
    assert not has_vnni({"avx2", "avx512f", "avx512bw"})  # AVX-512 without VNNI saturates too
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert has_vnni({"avx2", flag}), flag
    assert has_vnni() == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features())


def test_assume_no_vnni_overrides_the_flags(monkeypatch):
    monkeypatch.setenv(ASSUME_NO_VNNI, "1")
    assert not has_vnni({"avx512_vnni"})
    monkeypatch.setenv(ASSUME_NO_VNNI, "0")
    assert has_vnni({"avx512_vnni"})
    monkeypatch.setenv(ASSUME_NO_VNNI, "yes")
    with pytest.raises(ValueError, match=ASSUME_NO_VNNI):
        has_vnni({"avx512_vnni"})


def test_isa_flags_keep_the_kernel_relevant_ones_in_order():
    assert isa_flags({"fma", "avx512_vnni", "avx2", "amx_int8", "sse2"}) == ["avx2", "avx512_vnni", "amx_int8"]
    assert isa_flags(set()) == []


def test_environment_names_the_cpu_and_its_int8_features(real_cpu):
    env = bench.environment()
    assert env["cpu"] == cpu_model() and env["cpu"]
    assert env["isa"] == " ".join(isa_flags())
    assert env["vnni"] is has_vnni()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def write_quantization(folder, **details):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format_version": FORMAT_VERSION, "method": "onnxruntime_dynamic", **details}
    (folder / "quantization.json").write_text(json.dumps(with_checksums(record, folder, [])))  # sealed, as saved
    return folder


def test_onnx_int8_settings_name_the_choice_and_whether_it_fits(tmp_path, monkeypatch):
    on = {"cpu": "AMD EPYC 7B12", "vnni": False}
    reduced = write_quantization(tmp_path / "reduced", reduce_range=True, quantized_on=on)
    full = write_quantization(tmp_path / "full", reduce_range=False, quantized_on={**on, "vnni": True})
    settings = bench.onnx_int8_settings(reduced)
    assert settings == {"onnx_int8_reduce_range": True, "onnx_int8_quantized_on": "AMD EPYC 7B12",
                        "onnx_int8_quantized_on_vnni": False, "onnx_int8_fits_this_cpu": True}
    monkeypatch.setenv(ASSUME_NO_VNNI, "1")
    assert bench.onnx_int8_settings(full)["onnx_int8_fits_this_cpu"] is False  # full range, no VNNI: saturates
    assert bench.onnx_int8_settings(reduced)["onnx_int8_fits_this_cpu"] is True

    older = write_quantization(tmp_path / "older", reduce_range=False)  # written before the CPU was recorded
    assert bench.onnx_int8_settings(older)["onnx_int8_quantized_on"] is None
    with pytest.raises(FileNotFoundError, match="no quantization.json"):
        bench.onnx_int8_settings(tmp_path / "nowhere")
    broken = write_quantization(tmp_path / "broken", reduce_range="auto")
    with pytest.raises(ValueError, match="reduce_range"):
        bench.onnx_int8_settings(broken)
    nbits = write_quantization(tmp_path / "nbits", method="onnx_matmulnbits", reduce_range=False)
    with pytest.raises(ValueError, match="must be 'onnxruntime_dynamic'"):
        bench.onnx_int8_settings(nbits)
    unversioned = tmp_path / "unversioned"
    unversioned.mkdir()
    (unversioned / "quantization.json").write_text(json.dumps({"method": "onnxruntime_dynamic", "reduce_range": True}))
    with pytest.raises(ValueError, match="format_version"):
        bench.onnx_int8_settings(unversioned)


# ---------------------------------------------------------------- make unit-avx2 really imitates AVX2

@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") != "avx2", reason="only under make unit-avx2")
def test_torch_dispatches_avx2_kernels():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"


@pytest.mark.skipif(os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") != "AVX2", reason="only under make unit-avx2")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # quantized tensors are deprecated
def test_torch_int8_linear_saturates_as_without_vnni():
    """What an AVX2-only CPU does with full-range uint8 x int8: pair sums clamp at 32767.
    Holds on such a CPU and under the imitation; fails if fbgemm ignores the variable."""
    from torch.ao.nn import quantized as nnq

    linear = nnq.Linear(64, 4)
    linear.set_weight_bias(torch.quantize_per_tensor(torch.full((4, 64), 127.0), 1.0, 0, torch.qint8), None)
    linear.scale, linear.zero_point = 16384.0, 0  # output steps coarse enough to hold the exact sum
    x = torch.quantize_per_tensor(torch.full((2, 64), 255.0), 1.0, 0, torch.quint8)
    exact = 64 * 255 * 127
    saturated = 32 * 32767  # 32 pairs, each clamped
    got = float(linear(x).dequantize()[0, 0])
    assert abs(got - saturated) <= 16384 / 2 and abs(got - exact) > 16384, (got, exact, saturated)
