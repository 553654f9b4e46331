"""The ONNX Runtime int8 reference as a quantization method: an fp32 ONNX export
(``onnx_runtime.export_onnx``) quantized with onnxruntime's dynamic quantization, what a
practitioner would deploy on CPU. Loads back as an ``onnx_runtime.OnnxNLU``.

Nothing here unpickles anything: ONNX protobuf, safetensors and JSON only.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cpu import assumed_no_vnni, cpu_model, has_vnni, isa_flags
from ..model import assert_finite
from ..onnx_runtime import ONNX_FILE, copy_sidecars
from .method import MethodConfig, save_artifact
from .onnx_method import OnnxMethod

# The quantization settings, stated once (and written to quantization.json).
#  - QInt8 weights (symmetric, signed): ORT's default and what its docs recommend for
#    dynamic quantization on x86 CPUs (activations are then uint8, the u8s8 kernels).
#  - per_channel off: measured on the test student (tests/test_onnx_runtime.py, 2 layers,
#    width 32), per-channel scales did not lower the worst logit error (intent 0.011 vs
#    0.008, slot 0.024 both) and made the file 3% larger; per-tensor is quantize_dynamic's
#    default and what a practitioner would get.
#  - reduce_range (7-bit weights, [-64, 64]) chosen per CPU by reduce_range_for_cpu(), and
#    written to quantization.json with the CPU it was based on. Without VNNI, ORT's u8s8
#    kernels (vpmaddubsw) add pairs of u8 x s8 products in 16 bits, which saturate for full
#    8-bit weights (255 * 127 * 2 > 32767) and not for 7-bit ones (255 * 64 * 2 < 32767);
#    ORT's docs prescribe reduce_range for such CPUs ("When to use reduce-range"). On an
#    AVX2-only AMD EPYC, full-range weights gave logit errors of 0.33 on the test student.
#    With VNNI, products accumulate exactly in 32 bits and 7 bits only cost resolution;
#    measured on an AVX-512 VNNI EPYC, full 8 bits -> 7 bits: test student
#    (tests/test_onnx_runtime.py), max logit error intent 0.008 -> 0.010, slot 0.024 ->
#    0.030, decisions on 200 examples the same as torch's for 97-100% -> 98.5-99.5%; trained
#    smoke student (8 epochs, 180 test examples), intent 0.049 -> 0.088, slot 0.087 ->
#    0.094, tag paths 98.9% -> 96.7% the same. So 7 bits only where they are needed.
#  - Every op type ORT quantizes dynamically (op_types_to_quantize left at None): MatMul
#    with a constant weight (every Linear; the quantizer rewrites the heads' Gemm as MatMul
#    first) and Gather (the embedding tables, so they shrink as in the torch variants).
#    Attention's activation x activation MatMuls stay fp32 (MatMulConstBOnly).
QUANTIZATION = {"weight_type": "QInt8", "per_channel": False, "pre_process": True}


def reduce_range_for_cpu() -> bool:
    """7-bit weights where ORT's int8 kernels would saturate (no VNNI), full 8 bits elsewhere."""
    return not has_vnni()


@dataclass(frozen=True)
class OnnxInt8Config(MethodConfig):
    reduce_range: bool  # 7-bit weights (reduce_range_for_cpu says where they are needed)

    def __post_init__(self):
        if not isinstance(self.reduce_range, bool):
            raise ValueError(f"reduce_range must be true or false, got {self.reduce_range!r}")

    @classmethod
    def for_this_cpu(cls) -> "OnnxInt8Config":
        return cls(reduce_range_for_cpu())


def _float_initializers(path: Path) -> dict[str, torch.Tensor]:
    """The graph's floating-point initializers (its weights), by name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return {name: torch.from_numpy(np.array(a)) for name, a in arrays.items() if a.dtype.kind == "f"}


def _quantized_ops(path: Path) -> dict[str, int]:
    """Counts of the integer ops in a quantized graph (what quantization actually touched)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "ConvInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_onnx_dynamic(src_folder: Path | str, dst_folder: Path | str,
                          reduce_range: bool | None = None) -> Path:
    """int8 dynamic quantization of ``src_folder/model.onnx`` into ``dst_folder``; return it.

    ORT's pre-processing (``quant_pre_process``: symbolic shape inference, ORT's basic graph
    optimisation, ONNX shape inference) runs first, as ORT's quantization docs recommend:
    the quantizer needs tensor shapes, and folding is better done before than during
    quantization. Settings: ``QUANTIZATION`` above; ``reduce_range`` None chooses 7-bit
    weights from this CPU (``reduce_range_for_cpu``). Config and CRF are copied unchanged.
    A NaN or inf initializer is refused (ValueError naming it) before anything is written.
    """
    src = Path(src_folder)
    if not (src / ONNX_FILE).is_file():
        raise FileNotFoundError(f"no {ONNX_FILE} in {src}; run export_onnx first")
    config = OnnxInt8Config.for_this_cpu() if reduce_range is None else OnnxInt8Config(bool(reduce_range))
    return save_artifact(ORT_INT8, src, dst_folder, config)


class OnnxInt8(OnnxMethod):
    """ORT's dynamic int8 quantization of an fp32 ONNX folder (settings: ``OnnxInt8Config``)."""

    name = "onnxruntime_dynamic"
    config = OnnxInt8Config

    def check(self, src: Path, folder: Path, details: dict) -> None:
        assert_finite(_float_initializers(src / ONNX_FILE), str(src / ONNX_FILE))

    def write(self, src: Path, tmp: Path, details: dict) -> dict:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        reduce_range = details["reduce_range"]
        with tempfile.TemporaryDirectory(prefix="ort-pre-") as scratch:
            prepared = Path(scratch) / ONNX_FILE
            quant_pre_process(str(src / ONNX_FILE), str(prepared))
            quantize_dynamic(prepared, tmp / ONNX_FILE, weight_type=QuantType.QInt8,
                             per_channel=QUANTIZATION["per_channel"], reduce_range=reduce_range)
        copy_sidecars(src, tmp)
        return {**QUANTIZATION, "reduce_range": reduce_range, "onnxruntime": onnxruntime.__version__,
                "quantized_ops": _quantized_ops(tmp / ONNX_FILE),
                # what reduce_range was chosen for: the CPU that quantized
                "quantized_on": {"cpu": cpu_model(), "isa": isa_flags(), "vnni": has_vnni(),
                                 "assume_no_vnni": assumed_no_vnni()}}


ORT_INT8 = OnnxInt8()
