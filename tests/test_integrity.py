"""Saved models say what they are and prove it (issue #11).

Every saved model and quantized variant records the SHA-256 of its weights and checks it
on load; configs and quantization records are validated; NaN or inf is refused when
quantizing and when loading; static PTQ needs calibration data; a broken training
checkpoint is skipped for the one before it. Each error names the file (or tensor, layer).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compactnlu.train as train
from compactnlu.artifacts import CHECKSUMS, RECORD_DIGEST, record_digest, with_checksums
from compactnlu.compose import LabelSpace
from compactnlu.model import MultiTaskNLU, assert_finite
from compactnlu.quant import apply_policy, load_quantized, precision_groups, quantize_dynamic, quantize_static
from compactnlu.quant import save_quantized
from compactnlu.quant.quantizer import quantize_symmetric
from compactnlu.train import checkpoint_problem, last_good_checkpoint, train_model
from quant_helpers import make_batches, make_model
from test_train import STEPS, artifacts, counting_trainer, data, profile  # noqa: F401 (fixtures)

# The tiny models' label space: 4 intents, 3 domains, tags O B-a I-a B-b I-b.
LABELS = LabelSpace(intents=("i0", "i1", "i2", "i3"), scenarios=("d0", "d1", "d2"), slot_types=("a", "b"))


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, change) -> None:
    """Change a saved record and seal it again, as if the code had written it so: what the
    checks after the seal make of its content (a hand edit left unsealed is refused by the
    seal first: tests/test_model_files.py)."""
    record = json.loads(path.read_text())
    change(record)
    if RECORD_DIGEST in record:
        record[RECORD_DIGEST] = record_digest(record)
    path.write_text(json.dumps(record))


def rehash(manifest: Path, weights: str) -> None:
    """Record the current SHA-256 of ``weights``, as if the tampered file had been saved so."""
    names = [*json.loads(manifest.read_text()).get(CHECKSUMS, {}), weights]
    edit_json(manifest, lambda r: r.update(with_checksums({}, manifest.parent, names)))


def saved_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    make_model(seed=1).save(folder)
    return folder


def precision_policy(model, bits: int) -> tuple[dict, dict]:
    groups = precision_groups(model, per_layer=True, embedding=True)
    return groups, {g: bits for g in groups}


def saved_precision(tmp_path, bits: int = 8, overrides: dict | None = None) -> Path:
    model = make_model(seed=2)
    groups, policy = precision_policy(model, bits)
    policy.update(overrides or {})
    details = {"policy": policy, "per_channel": True, "per_layer": True, "embedding": True}
    return save_quantized(apply_policy(model, policy, groups), tmp_path / "pc", "precision", details)


def saved_static(tmp_path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized, _ = quantize_static(make_model(seed=3), iter(make_batches(2)), 2)
    return save_quantized(quantized, tmp_path / "static", "static")


# ---------------------------------------------------------------- assert_finite

def test_assert_finite_names_where_and_the_first_bad_tensor():
    good = {"a": torch.ones(2), "ids": torch.tensor([1, 2])}
    assert_finite(good, "here")
    with pytest.raises(ValueError, match=r"here: tensor 'b' holds NaN"):
        assert_finite({**good, "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")])}, "here")
    with pytest.raises(ValueError, match=r"there: tensor 'c' holds inf"):
        assert_finite({"c": torch.tensor([float("-inf")], dtype=torch.float16)}, "there")


# ---------------------------------------------------------------- saved float models

def test_a_saved_model_records_the_sha256_of_its_weights(tmp_path):
    folder = saved_model(tmp_path)
    recorded = json.loads((folder / "config.json").read_text())[CHECKSUMS]
    assert recorded == {"model.safetensors": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()}
    assert MultiTaskNLU.load(folder, labels=LABELS).config.tags == LABELS.tags


def test_truncated_weights_are_named(tmp_path):
    folder = saved_model(tmp_path)
    truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        MultiTaskNLU.load(folder)
    rehash(folder / "config.json", "model.safetensors")  # even with a matching checksum, the file is named
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        MultiTaskNLU.load(folder)


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path):
    folder = saved_model(tmp_path)
    flip_byte(folder / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'model.safetensors'} is corrupt")):
        MultiTaskNLU.load(folder)


def test_missing_weights_are_named(tmp_path):
    folder = saved_model(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        MultiTaskNLU.load(folder)


def test_invalid_config_json_is_named_with_its_line(tmp_path):
    folder = saved_model(tmp_path)
    (folder / "config.json").write_text('{\n "n_intents": 4,\n oops\n}')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 3"):
        MultiTaskNLU.load(folder)


@pytest.mark.parametrize("field, value, message", [
    ("pooling", "bogus", "pooling must be one of"),
    ("tags", ["O", "B-a", "I-b"], "unpaired slot types"),
    ("tags", ["B-a", "I-a"], "\"O\" once"),
    ("n_intents", 0, "n_intents must be a positive integer"),
    ("tasks", ["id", "ner"], "tasks"),
    ("surprise", 1, "unexpected keyword argument 'surprise'"),
])
def test_invalid_config_values_are_refused_naming_the_file(tmp_path, field, value, message):
    folder = saved_model(tmp_path)
    edit_json(folder / "config.json", lambda r: r.update({field: value}))
    with pytest.raises(ValueError, match=r"config\.json: invalid model config: .*" + message):
        MultiTaskNLU.load(folder)


def test_reordered_tags_do_not_fit_the_data(tmp_path):
    folder = saved_model(tmp_path)
    edit_json(folder / "config.json", lambda r: r.update(tags=["O", "B-b", "I-b", "B-a", "I-a"]))
    MultiTaskNLU.load(folder)  # still a valid BIO list: only the data can tell
    with pytest.raises(ValueError, match=r"config\.json does not fit the data's labels: tags"):
        MultiTaskNLU.load(folder, labels=LABELS)
    fewer = LabelSpace(intents=("i0", "i1"), scenarios=LABELS.scenarios, slot_types=LABELS.slot_types)
    edit_json(folder / "config.json", lambda r: r.update(tags=list(LABELS.tags)))
    with pytest.raises(ValueError, match=r"n_intents=4, the data has 2"):
        MultiTaskNLU.load(folder, labels=fewer)


def test_a_folder_saved_without_checksums_asks_for_a_rerun(tmp_path):
    folder = saved_model(tmp_path)
    edit_json(folder / "config.json", lambda r: r.pop(CHECKSUMS))
    with pytest.raises(ValueError, match=r"records no SHA-256 for model\.safetensors.*re-run the notebook"):
        MultiTaskNLU.load(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_save_and_load(tmp_path, bad):
    model = make_model(seed=4)
    with torch.no_grad():
        model.id_head.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"tensor 'id_head\.weight' holds"):
        model.save(tmp_path / "bad")

    folder = saved_model(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["id_head.weight"][0, 0] = bad
    save_file(state, folder / "model.safetensors")
    rehash(folder / "config.json", "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'id_head\.weight' holds"):
        MultiTaskNLU.load(folder)


# ---------------------------------------------------------------- quantized variants

@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize("method", ["static", "dynamic", "precision"])
def test_a_flipped_byte_in_a_quantized_model_is_refused(tmp_path, method):
    if method == "static":
        folder = saved_static(tmp_path)
    elif method == "dynamic":
        folder = save_quantized(quantize_dynamic(make_model(seed=5)), tmp_path / "dynamic", "dynamic")
    else:
        folder = saved_precision(tmp_path)
    weights = "model.safetensors" if method == "precision" else "model.pt"
    details = json.loads((folder / "quantization.json").read_text())
    assert set(details[CHECKSUMS]) == {"config.json", weights}
    load_quantized(folder, labels=LABELS)

    flip_byte(folder / weights, offset=(folder / weights).stat().st_size // 2)
    with pytest.raises(ValueError, match=weights.replace(".", r"\.") + " is corrupt or truncated"):
        load_quantized(folder)
    truncate(folder / weights)
    rehash(folder / "quantization.json", weights)
    with pytest.raises(ValueError, match=weights.replace(".", r"\.") + ": not a readable"):
        load_quantized(folder)


def test_a_16_bit_group_relabelled_8_is_refused_naming_the_layer(tmp_path):
    folder = saved_precision(tmp_path, bits=8, overrides={"head.id": 16})
    edit_json(folder / "quantization.json", lambda r: r["policy"].update({"head.id": 8}))
    with pytest.raises(ValueError, match=r"layer id_head is recorded as 8-bit, but its stored integers span "
                                         r"\[-?\d+, 32767\], outside \[-128, 127\]"):
        load_quantized(folder)


def test_an_8_bit_group_relabelled_4_or_16_is_refused(tmp_path):
    folder = saved_precision(tmp_path, bits=8)
    edit_json(folder / "quantization.json", lambda r: r["policy"].update({"head.dc": 4}))
    with pytest.raises(ValueError, match=r"layer dc_head is recorded as 4-bit, but its stored integers span "
                                         r"\[-\d+, \d+\], outside \[-8, 7\]"):
        load_quantized(folder)
    edit_json(folder / "quantization.json", lambda r: r["policy"].update({"head.dc": 16}))
    with pytest.raises(ValueError, match=r"layer dc_head is recorded as 16-bit \(torch\.int16\), but its "
                                         r"weights are stored as torch\.int8"):
        load_quantized(folder)


def test_a_nan_scale_is_refused_at_load(tmp_path):
    folder = saved_precision(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["sf_head.scale"][1] = float("nan")
    save_file(state, folder / "model.safetensors")
    rehash(folder / "quantization.json", "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'sf_head\.scale' holds NaN"):
        load_quantized(folder)


def test_an_inf_scale_in_a_static_model_is_refused_at_load(tmp_path):
    folder = saved_static(tmp_path)
    state = torch.load(folder / "model.pt", weights_only=True)
    state["id_head.quant.scale"] = torch.tensor([float("inf")])
    torch.save(state, folder / "model.pt")
    rehash(folder / "quantization.json", "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt: tensor 'id_head\.quant\.scale' holds inf"):
        load_quantized(folder)


def test_quantization_records_are_validated(tmp_path):
    folder = saved_precision(tmp_path)
    (folder / "quantization.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"quantization\.json: invalid JSON at line 1"):
        load_quantized(folder)
    (folder / "quantization.json").write_text(json.dumps({"method": "magic"}))
    with pytest.raises(ValueError, match=r"quantization\.json: method must be one of"):
        load_quantized(folder)

    folder = saved_precision(tmp_path / "again")
    edit_json(folder / "quantization.json", lambda r: r.pop("per_layer"))
    with pytest.raises(ValueError, match=r"quantization\.json: cannot rebuild the precision structure"):
        load_quantized(folder)
    edit_json(folder / "quantization.json", lambda r: r.pop(CHECKSUMS))
    with pytest.raises(ValueError, match=r"records no SHA-256 for config\.json"):
        load_quantized(folder)


def test_a_quantized_model_for_other_labels_is_refused(tmp_path):
    folder = saved_precision(tmp_path)
    other = LabelSpace(intents=LABELS.intents, scenarios=("d0", "d1"), slot_types=LABELS.slot_types)
    with pytest.raises(ValueError, match=r"config\.json does not fit the data's labels: n_domains=3"):
        load_quantized(folder, labels=other)


# ---------------------------------------------------------------- refused when quantizing

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["static", "dynamic", "precision"])
def test_non_finite_weights_are_refused_when_quantizing(method, bad):
    model = make_model(seed=6)
    with torch.no_grad():
        model.encoder.encoder.layer[0].attention.self.query.weight[3, 1] = bad
    name = r"'encoder\.encoder\.layer\.0\.attention\.self\.query\.weight' holds"
    with pytest.raises(ValueError, match=name):
        if method == "static":
            quantize_static(model, iter(make_batches(2)), 2)
        elif method == "dynamic":
            quantize_dynamic(model)
        else:
            groups, policy = precision_policy(model, 8)
            apply_policy(model, policy, groups)


def test_the_quantizer_refuses_nan():
    with pytest.raises(ValueError, match="quantize_symmetric: tensor 'x' holds NaN"):
        quantize_symmetric(torch.tensor([[1.0, float("nan")], [0.5, 0.25]]), 8)


@pytest.mark.parametrize("batches, n", [([], 2), (make_batches(2), 0)], ids=["empty set", "n_batches=0"])
def test_static_quantization_without_calibration_data_is_refused(batches, n):
    with pytest.raises(ValueError, match="calibration"):
        quantize_static(make_model(seed=7), iter(batches), n)


# ---------------------------------------------------------------- training checkpoints

def test_checkpoint_problems_are_found(tmp_path):
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    save_file({"w": torch.ones(3)}, good / "model.safetensors")
    (good / "trainer_state.json").write_text("{}")
    torch.save({"state": torch.ones(3)}, good / "optimizer.pt")
    assert checkpoint_problem(good) is None
    assert last_good_checkpoint(tmp_path) == str(good)

    broken = tmp_path / "checkpoint-10"  # newer by step number, not by name
    broken.mkdir()
    for name in ("model.safetensors", "trainer_state.json", "optimizer.pt"):
        (broken / name).write_bytes((good / name).read_bytes())
    truncate(broken / "optimizer.pt")
    assert "optimizer.pt" in checkpoint_problem(broken)
    with pytest.warns(UserWarning, match=r"skipping the broken checkpoint .*checkpoint-10 \(optimizer\.pt"):
        assert last_good_checkpoint(tmp_path) == str(good)
    (broken / "trainer_state.json").unlink()
    assert checkpoint_problem(broken) == "trainer_state.json is missing"

    truncate(good / "model.safetensors")
    assert "model.safetensors: not a readable safetensors file" in checkpoint_problem(good)
    with pytest.warns(UserWarning):
        assert last_good_checkpoint(tmp_path) is None


def test_a_truncated_checkpoint_is_skipped_for_the_one_before(profile, data, artifacts, monkeypatch):  # noqa: F811
    counting = counting_trainer()
    monkeypatch.setattr(train, "StudyTrainer", counting)
    counting.stop_after = 4  # killed after step 4: checkpoints 2 and 4 exist, no final model
    with pytest.raises(KeyboardInterrupt):
        train_model(profile, data, "broken", max_steps=6, **STEPS)
    checkpoints = next((artifacts / "checkpoints").glob("broken-*"))
    truncate(checkpoints / "checkpoint-4" / "model.safetensors")

    counting.stop_after = None
    counting.steps = 0
    with pytest.warns(UserWarning, match=r"skipping the broken checkpoint .*checkpoint-4 .*model\.safetensors"):
        resumed = train_model(profile, data, "broken", max_steps=6, **STEPS)
    assert counting.steps == 4  # steps 3 to 6, from checkpoint-2
    assert counting.last.state.global_step == 6
    assert (resumed.path / "model.safetensors").is_file()
    assert checkpoint_problem(checkpoints / "checkpoint-4") is None  # rewritten whole on the way


def test_a_cached_model_for_other_labels_is_refused(profile, data, artifacts):  # noqa: F811
    trained = train_model(profile, data, "relabelled", max_steps=1)
    edit_json(trained.path / "config.json", lambda r: r.update(tags=[r["tags"][0], *r["tags"][1:][::-1]]))
    with pytest.raises(ValueError, match=r"config\.json does not fit the data's labels: tags"):
        train_model(profile, data, "relabelled", max_steps=1)
