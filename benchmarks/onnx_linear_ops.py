"""Which ONNX Runtime op should carry a precision-controlled layer's stored integers, on this CPU.

``quant.onnx_nbits`` exports 4- and 8-bit layers as ``com.microsoft.MatMulNBits``. ORT's own
dynamic int8 graph uses ``DynamicQuantizeLinear`` + ``MatMulInteger`` instead (uint8 inputs,
int8 weights: "u8s8"), and on a CPU with VNNI that is the faster op. This script measures,
for one linear layer at the study's and at XLM-R-base's shapes, one graph per op:

- ``float``: ``MatMul`` on float weights;
- ``nbits4`` / ``nbits8``: ``MatMulNBits`` at 4 and 8 bits, ``accuracy_level`` 4 (int8 compute);
- ``u8s8``: ``MatMulInteger`` on int8 weights (what ORT's dynamic int8 graph runs);
- ``u8u8``: ``MatMulInteger`` on the same integers shifted to uint8 (zero point 128);
- ``s8s8``: ``MatMulInteger`` on int8 inputs and weights (the paper's symmetric arithmetic).

It also probes whether u8s8 saturates here: uint8 inputs of 255 against int8 weights of 127,
so each adjacent pair sums to 64,770, past the int16 that ``vpmaddubsw`` (AVX2 without VNNI)
accumulates pairs in. A stored 8-bit layer uses the full int8 range, so where the probe
saturates a u8s8 graph of it would compute other numbers than the stored model (ORT's own
int8 avoids that with ``reduce_range``: 7-bit weights, which the stored integers are not).

    python benchmarks/onnx_linear_ops.py [--repeats 30]

Timings: median of interleaved runs, 2 intra-op threads; the CPU is printed first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from compactnlu import cpu  # noqa: E402  (the library, without installing it)

SHAPES = ((128, 512), (512, 128), (768, 3072), (3072, 768))  # (K, N): study MLP, XLM-R-base MLP
ROWS = (24, 704)  # one utterance, 32 of them (22 tokens: the composed test's median)
BLOCK = 128  # a MatMulNBits block that divides every K above
OPS = ("float", "nbits4", "nbits8", "u8s8", "u8u8", "s8s8")


def _session(nodes, initializers, k: int, n: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              initializer=[numpy_helper.from_array(v, name) for name, v in initializers.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.log_severity_level = 3  # the unused zero-point initializer of s8s8 is not news
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _integer_graph(op: str, weights: np.ndarray) -> tuple[list, dict]:
    """``y = (x_q - x_zero) @ (w_q - w_zero) * x_scale * w_scale`` with x quantized by ``op``'s rule."""
    scale = np.float32(0.01)
    if op == "s8s8":  # the paper's rule: symmetric, to int8, no zero points
        nodes = [helper.make_node("Abs", ["x"], ["x_abs"]),
                 helper.make_node("ReduceMax", ["x_abs"], ["x_max"], keepdims=0),
                 helper.make_node("Div", ["x_max", "q_max"], ["x_scale"]),
                 helper.make_node("Div", ["x", "x_scale"], ["x_div"]),
                 helper.make_node("Round", ["x_div"], ["x_round"]),
                 helper.make_node("Cast", ["x_round"], ["x_q"], to=TensorProto.INT8),
                 helper.make_node("MatMulInteger", ["x_q", "w"], ["y_int"])]
        initializers = {"w": weights.astype(np.int8), "q_max": np.float32(127)}
    else:
        unsigned = op == "u8u8"
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zero"]),
                 helper.make_node("MatMulInteger", ["x_q", "w", "x_zero", "w_zero"], ["y_int"])]
        initializers = {"w": (weights + 128).astype(np.uint8) if unsigned else weights.astype(np.int8),
                        "w_zero": np.array(128 if unsigned else 0, np.uint8 if unsigned else np.int8)}
    nodes += [helper.make_node("Cast", ["y_int"], ["y_float"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["x_scale", "w_scale"], ["scale"]),
              helper.make_node("Mul", ["y_float", "scale"], ["y"])]
    return nodes, {**initializers, "w_scale": scale}


def build(op: str, k: int, n: int, rng: np.random.Generator) -> ort.InferenceSession:
    if op == "float":
        return _session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                        {"w": rng.standard_normal((k, n), dtype=np.float32)}, k, n)
    if op.startswith("nbits"):
        bits = int(op[len("nbits"):])
        codes = rng.integers(0, 2 ** bits, size=(n, k // BLOCK, BLOCK), dtype=np.uint8)
        if bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                                bits=bits, block_size=BLOCK, accuracy_level=4)
        return _session([node], {"b": codes, "scales": np.full(n * (k // BLOCK), 0.01, np.float32)}, k, n)
    nodes, initializers = _integer_graph(op, rng.integers(-127, 128, size=(k, n)))
    return _session(nodes, initializers, k, n)


def u8s8_saturates() -> bool:
    """Whether u8s8 ``MatMulInteger`` loses pair sums past int16 on this CPU (exact: 255·127·k)."""
    k = 64
    nodes = [helper.make_node("MatMulInteger", ["a", "w"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
                              initializer=[numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"a": np.full((1, k), 255, np.uint8)})
    return int(y[0, 0]) != 255 * 127 * k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu.cpu_model()}; ISA: {' '.join(cpu.isa_flags())}; onnxruntime {ort.__version__}, 2 threads")
    print(f"u8s8 MatMulInteger saturates full-range int8 weights here: {u8s8_saturates()}")
    print(f"{'K->N':>10} {'rows':>5} " + " ".join(f"{op:>9}" for op in OPS) + "   (ms; median)")
    for k, n in SHAPES:
        sessions = {op: build(op, k, n, rng) for op in OPS}
        for rows in ROWS:
            feed = {"x": rng.standard_normal((rows, k), dtype=np.float32)}
            for session in sessions.values():  # first runs pay for packing and allocation
                for _ in range(3):
                    session.run(None, feed)
            samples: dict[str, list[float]] = {op: [] for op in OPS}
            for _ in range(args.repeats):
                for op, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feed)
                    samples[op].append(time.perf_counter() - start)
            print(f"{k:>4}->{n:<5} {rows:>5} " + " ".join(f"{statistics.median(samples[op]) * 1e3:9.3f}" for op in OPS))


if __name__ == "__main__":
    main()
