"""The quantization registry: every method saves a versioned ``quantization.json``, loading
dispatches on the recorded method (never on which files a folder holds), an unknown method
or another format version is refused by name, a new method is one class and one registration,
and ``quant/`` stays clear of the training stack."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compactnlu
from compactnlu import variants
from compactnlu.artifacts import CHECKSUMS, RECORD_DIGEST, record_digest
from compactnlu.config import load_profile
from compactnlu.model import MultiTaskNLU
from compactnlu.quant import (DETAILS_FILE, FORMAT_VERSION, METHODS, QuantizationMethod, apply_policy,
                              load_quantized, precision_groups, quantize_dynamic, quantize_static, read_details,
                              save_quantized)
from compactnlu.quant import registry
from compactnlu.quant.method import skeleton, write_config
from compactnlu.quant.stored import PrecisionLinear
from quant_helpers import make_batches, make_model

QUANT_DIR = Path(compactnlu.__file__).parent / "quant"


def saved(method: str, folder: Path) -> Path:
    model = make_model(seed=3)
    if method == "static":
        return save_quantized(quantize_static(model, make_batches(2), 2)[0], folder, method, {"n_batches": 2})
    if method == "dynamic":
        return save_quantized(quantize_dynamic(model), folder, method)
    groups = precision_groups(model, per_layer=True, embedding=True)
    policy = {g: 8 for g in groups}
    details = {"policy": policy, "per_channel": True, "per_layer": True, "embedding": True}
    return save_quantized(apply_policy(model, policy, groups), folder, method, details)


def logits(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {k: out[k] for k in ("intent_logits", "domain_logits", "slot_logits")}


def edit_record(folder: Path, change) -> None:
    """Change the record and seal it again, as a handler that wrote it so would have."""
    path = folder / DETAILS_FILE
    record = json.loads(path.read_text())
    change(record)
    record[RECORD_DIGEST] = record_digest(record)
    path.write_text(json.dumps(record))


def test_the_four_methods_are_registered():
    assert set(METHODS) == {"static", "dynamic", "precision", "onnxruntime_dynamic", "onnx_matmulnbits"}
    assert all(isinstance(m, QuantizationMethod) and m.name == name for name, m in METHODS.items())


@pytest.mark.parametrize("method", ["static", "dynamic", "precision"])
def test_saving_records_version_method_and_checksums_and_loads_back_exactly(method, tmp_path):
    folder = saved(method, tmp_path / method)
    record = read_details(folder)
    assert record["format_version"] == FORMAT_VERSION and record["method"] == method
    weights = "model.safetensors" if method == "precision" else "model.pt"
    assert list(record[CHECKSUMS]) == ["config.json", weights]
    batch = make_batches(1, seed=7)[0]
    first, again = load_quantized(folder), load_quantized(folder)
    for key, value in logits(first, batch).items():
        assert torch.equal(value, logits(again, batch)[key]), key


@pytest.mark.parametrize("version", [None, 0, FORMAT_VERSION + 1])
def test_a_missing_or_other_format_version_is_refused_by_name(tmp_path, version):
    folder = saved("dynamic", tmp_path / "q")
    edit_record(folder, lambda r: r.pop("format_version") if version is None else r.update(format_version=version))
    with pytest.raises(ValueError, match=r"quantization\.json .*format_version.*re-run the notebook"):
        load_quantized(folder)


def test_an_unknown_method_is_refused_by_name(tmp_path):
    folder = saved("dynamic", tmp_path / "q")
    edit_record(folder, lambda r: r.update(method="pt2e"))
    with pytest.raises(ValueError, match=r"quantization\.json: method must be one of .* got 'pt2e'.*registered"):
        load_quantized(folder)
    with pytest.raises(ValueError, match="method must be one of"):
        save_quantized(make_model(), tmp_path / "other", "pt2e")


def test_load_follows_the_recorded_method_not_the_files(tmp_path):
    """A dynamic model recorded as static is loaded by the static handler (and does not fit
    it), although its files are exactly a dynamic model's."""
    folder = saved("dynamic", tmp_path / "q")
    assert isinstance(load_quantized(folder).id_head, torch.ao.nn.quantized.dynamic.Linear)
    edit_record(folder, lambda r: r.update(method="static"))
    with pytest.raises(ValueError, match=r"model\.pt does not fit"):
        load_quantized(folder)


class Float16(QuantizationMethod):
    """The recipe's example: weights stored in float16, loaded back as a float32 model."""

    name = "fp16"

    def write(self, model, tmp, details):
        write_config(model, tmp)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        return details

    def weight_files(self, config):
        return ["model.safetensors"]

    def load(self, folder, config, details):
        model = skeleton(config)
        model.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return model.eval()


def test_a_new_method_is_one_class_and_one_registration(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "fp16", Float16())
    model = make_model(seed=4)
    folder = save_quantized(model, tmp_path / "half", "fp16", {"note": "example"})
    assert read_details(folder)["note"] == "example"
    loaded = load_quantized(folder)
    batch = make_batches(1)[0]
    for key, value in logits(loaded, batch).items():
        assert torch.allclose(value, logits(model, batch)[key], atol=1e-2), key
    assert not torch.equal(loaded.id_head.weight, model.id_head.weight)  # it went through float16


def test_variants_load_dispatches_through_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "artifacts"))
    profile = load_profile("smoke")
    fp32 = make_model(seed=5)
    fp32.save(tmp_path / "fp32")
    variants.register(profile, "baseline", tmp_path / "fp32")
    variants.register(profile, "kd_pcptq", saved("precision", tmp_path / "kd_pcptq"))
    variants.register(profile, "kd_pcptq_fast", tmp_path / "kd_pcptq")
    assert type(variants.load(profile, "baseline")) is MultiTaskNLU
    assert isinstance(variants.load(profile, "kd_pcptq").id_head, PrecisionLinear)
    assert hasattr(variants.load(profile, "kd_pcptq_fast").id_head, "kernel")  # a fast-kernel layer


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for each import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = "compactnlu.quant"
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append((name, id(node) in top))
            out.extend((f"{name}.{a.name}", id(node) in top) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, id(node) in top) for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted(QUANT_DIR.glob("*.py")), ids=lambda p: p.name)
def test_quant_imports_no_training_code_and_no_private_names(path):
    for name, top_level in imports_of(path):
        parts = name.split(".")
        assert not ({"train", "distill", "pretrain", "Trainer"} & set(parts)), (path.name, name)
        if name.startswith("compactnlu."):
            assert top_level, f"{path.name}: function-level import of {name}"
            assert not parts[-1].startswith("_") or parts[-1] == "__future__", (path.name, name)
