"""How the stored integers of a precision-controlled model become ONNX Runtime's n-bit ops:
``com.microsoft.MatMulNBits`` for linear layers, ``GatherBlockQuantized`` for the word
embedding (the mapping and its sources: ``onnx_nbits``'s docstring), and the rewrite that
swaps them into the dynamo exporter's float graph.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .stored import PrecisionEmbedding, PrecisionLinear, StoredWeight

MS_DOMAIN = "com.microsoft"
NBITS = (4, 8)  # stored widths that become MatMulNBits / GatherBlockQuantized; 16 stays float
MIN_BLOCK = 16  # the ops' smallest block
MAX_BLOCK = 256  # MLAS's largest QNBitGemm block; larger ones fall back to dequantize-then-sgemm


# ---------------------------------------------------------------- stored layer -> op inputs

def block_size_for(k: int) -> int:
    """The largest power of two dividing ``k`` in [16, 256]; 16 when there is none (the
    last block is then padded)."""
    block = MIN_BLOCK
    while block * 2 <= min(k, MAX_BLOCK) and k % (block * 2) == 0:
        block *= 2
    return block


def unsigned_blocks(layer: StoredWeight, block: int) -> np.ndarray:
    """The stored integers as unsigned codes ``q + 2^(bits-1)`` (so the ops' default zero
    point decodes them), rows padded with the zero point to whole blocks and packed low
    nibble first for 4 bits: uint8 ``[rows, k_blocks, block * bits / 8]``."""
    q = layer.integers().to(torch.int16)  # [rows, cols], exactly what is stored
    k_blocks = -(-layer.cols // block)
    padded = torch.zeros(layer.rows, k_blocks * block, dtype=torch.int16)
    padded[:, :layer.cols] = q
    codes = (padded + 2 ** (layer.bits - 1)).to(torch.uint8).numpy()
    if layer.bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return np.ascontiguousarray(codes.reshape(layer.rows, k_blocks, block * layer.bits // 8))


def block_scales(layer: StoredWeight, block: int) -> np.ndarray:
    """float32 ``[rows, k_blocks]``: each row's stored scale repeated over its blocks."""
    k_blocks = -(-layer.cols // block)
    scale = layer.scale.detach().float().reshape(-1, 1).expand(layer.rows, k_blocks)
    return np.ascontiguousarray(scale.numpy())


def matmul_nbits_inputs(layer: PrecisionLinear) -> tuple[np.ndarray, np.ndarray, int]:
    """``(B, scales, block_size)`` of MatMulNBits for a 4- or 8-bit layer."""
    if layer.bits not in NBITS:
        raise ValueError(f"MatMulNBits takes {NBITS}-bit layers here, got {layer.bits}")
    block = block_size_for(layer.in_features)
    return unsigned_blocks(layer, block), block_scales(layer, block), block


def dequantize_nbits(b: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' weight ``[N, K]`` as its spec defines it, ``(u - 2^(bits-1)) * scale``
    per block; for checking the packing against ``dequantized_weight``."""
    n, k_blocks, blob = b.shape
    if bits == 4:
        codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, k_blocks, blob * 2)
    else:
        codes = b
    values = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales[:, :, None]
    return values.reshape(n, -1)[:, :k]


# ---------------------------------------------------------------- graph rewrite

def _key(array: np.ndarray) -> tuple:
    """A float array's identity: its shape and a digest of its values (a digest, not the
    bytes, so a 250k-row embedding table is not held twice)."""
    return array.shape, hashlib.blake2b(np.ascontiguousarray(array, dtype=np.float32).tobytes()).digest()


def weight_index(layers: dict[str, StoredWeight]) -> tuple[dict[tuple, tuple[str, bool]], dict[str, str]]:
    """Float weight (as the exporter writes it) -> (module name, transposed?).

    The dynamo exporter does not keep module names on Linear weights: it folds ``W^T``
    into an anonymous initializer (``val_81``) for a 3-D input's MatMul and keeps ``W``
    with ``transB=1`` for a 2-D input's Gemm (the pooled heads). So weights are matched by
    value, both ways. Two different stored layers with the same float weights could not
    be told apart: refused; two with the same stored integers and scales are one weight to
    the exporter (it shares equal initializers), returned as ``aliases`` (name -> the name
    indexed).
    """
    index: dict[tuple, tuple[str, bool]] = {}
    aliases: dict[str, str] = {}
    for name, layer in layers.items():
        weight = layer.dequantized_weight().detach().float().numpy()
        forms = [(weight, False)] if isinstance(layer, PrecisionEmbedding) else [(weight, False), (weight.T, True)]
        for array, transposed in forms:
            key = _key(array)
            if key in index and index[key][0] != name:
                other = layers[index[key][0]]
                if not (other.bits == layer.bits and torch.equal(other.qweight, layer.qweight)
                        and torch.equal(other.scale, layer.scale)):
                    raise ValueError(f"{index[key][0]} and {name} have the same float weights but different "
                                     "stored integers; their graph nodes cannot be told apart")
                aliases[name] = index[key][0]
            index.setdefault(key, (name, transposed))
    return index, aliases


def _attribute(node, name, default=None):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def rewrite_graph(graph, layers: dict[str, StoredWeight], accuracy_level: int) -> dict[str, dict]:
    """Replace the float MatMul/Gemm/Gather of every 4/8-bit stored layer in ``graph`` by
    MatMulNBits / GatherBlockQuantized on its stored integers; drop the float weights they
    used. Returns, per module name, the op and block size it got."""
    import onnx
    from onnx import helper, numpy_helper

    quantized = {name: layer for name, layer in layers.items() if layer.bits in NBITS}
    index, aliases = weight_index(quantized)
    initializers = {init.name: init for init in graph.initializer}
    matched: dict[str, dict] = {}
    new_initializers = {}

    def weights_of(name: str) -> tuple[str, str, int]:
        """Names of the op inputs of stored layer ``name`` (created once)."""
        layer = quantized[name]
        if name not in new_initializers:
            if isinstance(layer, PrecisionLinear):
                data, scales, block = matmul_nbits_inputs(layer)
            else:
                block = block_size_for(layer.cols)
                data = unsigned_blocks(layer, block).reshape(layer.rows, -1)
                scales = block_scales(layer, block)
            new_initializers[name] = (numpy_helper.from_array(data, f"{name}.nbits_weight"),
                                      numpy_helper.from_array(scales, f"{name}.nbits_scales"), block)
        data, scales, block = new_initializers[name]
        return data.name, scales.name, block

    nodes = []
    for node in graph.node:
        weight_input = {"MatMul": 1, "Gemm": 1, "Gather": 0}.get(node.op_type)
        source = initializers.get(node.input[weight_input]) if weight_input is not None else None
        is_float = source is not None and source.data_type == onnx.TensorProto.FLOAT
        hit = index.get(_key(numpy_helper.to_array(source))) if is_float else None
        if hit is None:  # not a stored layer's float weight
            nodes.append(node)
            continue
        name, transposed = hit
        layer = quantized[name]
        data, scales, block = weights_of(name)
        if node.op_type == "Gather":
            if not isinstance(layer, PrecisionEmbedding) or transposed or _attribute(node, "axis", 0) != 0:
                raise ValueError(f"unexpected Gather of {name}'s weight in the exported graph")
            new = helper.make_node("GatherBlockQuantized", [data, node.input[1], scales], list(node.output),
                                   name=f"{name}/GatherBlockQuantized", domain=MS_DOMAIN, bits=layer.bits,
                                   block_size=block, gather_axis=0, quantize_axis=1)
            matched[name] = {"op": "GatherBlockQuantized", "bits": layer.bits, "block_size": block}
        else:
            bias = ""
            if node.op_type == "Gemm":
                if (_attribute(node, "transA", 0), _attribute(node, "alpha", 1.0), _attribute(node, "beta", 1.0)) \
                        != (0, 1.0, 1.0) or bool(_attribute(node, "transB", 0)) == transposed:
                    raise ValueError(f"unexpected Gemm form for {name} in the exported graph")
                bias = node.input[2] if len(node.input) > 2 else ""
            elif not transposed:
                raise ValueError(f"MatMul with {name}'s untransposed weight in the exported graph")
            inputs = [node.input[0], data, scales] + (["", "", bias] if bias else [])
            new = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{name}/MatMulNBits",
                                   domain=MS_DOMAIN, K=layer.cols, N=layer.rows, bits=layer.bits,
                                   block_size=block, accuracy_level=accuracy_level)
            matched[name] = {"op": "MatMulNBits", "bits": layer.bits, "block_size": block}
        nodes.append(new)

    for name, same in aliases.items():
        if same in matched:
            matched[name] = matched[same]
    missing = sorted(set(quantized) - set(matched))
    if missing:
        raise ValueError(f"no node of the exported graph uses the float weights of {missing}; the exporter's "
                         "pattern changed")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for data, scales, _ in new_initializers.values():
        graph.initializer.extend([data, scales])
    return matched


def set_ms_opset(model) -> None:
    from onnx import helper

    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
