"""The quantization registry: every method saves a versioned ``quantization.json`` holding its
typed settings (read back into the same config), loading dispatches on the recorded method (never
on which files a folder holds), an unknown method or another format version is refused by name,
a bad setting is refused when the config is made, a new method is one config, one class and one
registration, and ``quant/`` stays clear of the training stack."""

from __future__ import annotations

import ast
import dataclasses
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
from compactnlu.quant import (DETAILS_FILE, FORMAT_VERSION, METHODS, DynamicConfig, MethodConfig, NBitsConfig,
                              OnnxInt8Config, PrecisionConfig, QuantizationMethod, StaticConfig, apply_config,
                              load_quantized, precision_groups, quantize_dynamic, quantize_static, read_config,
                              read_details, save_quantized)
from compactnlu.quant import registry
from compactnlu.quant.method import skeleton, write_config
from compactnlu.quant.stored import PrecisionLinear
from quant_helpers import make_batches, make_model

QUANT_DIR = Path(compactnlu.__file__).parent / "quant"


def config_of(method: str, model) -> MethodConfig:
    if method == "static":
        return StaticConfig(n_batches=2)
    if method == "dynamic":
        return DynamicConfig()
    policy = {g: 8 for g in precision_groups(model, per_layer=True, embedding=True)}
    return PrecisionConfig(policy, per_channel=True, per_layer=True, embedding=True, kind="uniform", bits=8)


def saved(method: str, folder: Path) -> Path:
    model = make_model(seed=3)
    config = config_of(method, model)
    if method == "static":
        quantized = quantize_static(model, make_batches(2), config.n_batches)[0]
    elif method == "dynamic":
        quantized = quantize_dynamic(model)
    else:
        quantized = apply_config(model, config)
    return save_quantized(quantized, folder, config)


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


@pytest.mark.parametrize("method", ["static", "dynamic", "precision"])
def test_the_record_holds_the_config_and_reads_back_into_it(method, tmp_path):
    folder = saved(method, tmp_path / method)
    config = config_of(method, make_model(seed=3))
    record = read_details(folder)
    assert {k: record[k] for k in dataclasses.asdict(config)} == dataclasses.asdict(config)
    assert read_config(folder) == config and type(read_config(folder)) is type(config)


@pytest.mark.parametrize("make, field", [
    (lambda: StaticConfig(n_batches=0), "n_batches"),
    (lambda: StaticConfig(n_batches=None), "n_batches"),
    (lambda: OnnxInt8Config(reduce_range="yes"), "reduce_range"),
    (lambda: NBitsConfig(accuracy_level=2), "accuracy_level"),
    (lambda: PrecisionConfig(None, True, True, True, kind="int3"), "kind"),
    (lambda: PrecisionConfig(None, True, True, True, kind="searched"), "lam"),
    (lambda: PrecisionConfig(None, True, True, True, kind="searched", lam=-1.0), "lam"),
    (lambda: PrecisionConfig(None, True, True, True, kind="uniform"), "bits"),
    (lambda: PrecisionConfig(None, True, True, True, kind="uniform", bits=1), "bit-width"),
    (lambda: PrecisionConfig(None, True, True, True, kind="sensitivity", bits=4), "bits"),
    (lambda: PrecisionConfig(None, True, True, True), "policy"),
    (lambda: PrecisionConfig({"head.id": 17}, True, True, True), "policy"),
    (lambda: PrecisionConfig({"head.id": 8}, 1, True, True), "per_channel"),
    (lambda: PrecisionConfig({"head.id": 8}, True, True, True, kind="uniform", bits=4), "policy"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_a_bad_setting_is_refused_when_the_config_is_made(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_a_precision_config_is_a_choice_until_it_is_made_for_a_model():
    choice = PrecisionConfig(None, True, True, True, kind="searched", lam=0.25)
    assert choice.label == "lambda=0.25" and choice.for_model({"head.id": 8}).policy == {"head.id": 8}
    assert choice.for_model({"head.id": 8}).choice() == choice
    with pytest.raises(ValueError, match="no bits yet"):
        choice.structure()
    assert PrecisionConfig.from_record({**dataclasses.asdict(choice), "checksums": {}}) == choice
    with pytest.raises(ValueError, match="the record has no per_layer"):  # a field missing is never defaulted
        PrecisionConfig.from_record({"policy": {"head.id": 8}, "per_channel": True, "embedding": True})


def test_a_config_is_saved_by_its_own_method_only(tmp_path):
    with pytest.raises(ValueError, match="takes a StaticConfig, got DynamicConfig"):
        registry.save_artifact(METHODS["static"], quantize_dynamic(make_model()), tmp_path / "q", DynamicConfig())
    assert not (tmp_path / "q").exists()


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


@dataclasses.dataclass(frozen=True)
class Float16Config(MethodConfig):
    """The recipe's example: its settings (none to choose: every weight goes to float16)."""


class Float16(QuantizationMethod):
    """The recipe's example: weights stored in float16, loaded back as a float32 model."""

    name = "fp16"
    config = Float16Config

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


def test_a_new_method_is_one_config_one_class_and_one_registration(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "fp16", Float16())
    model = make_model(seed=4)
    folder = save_quantized(model, tmp_path / "half", Float16Config(), {"note": "example"})
    assert read_details(folder)["method"] == "fp16" and read_details(folder)["note"] == "example"
    assert read_config(folder) == Float16Config()
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
