"""Every file a model is rebuilt from is sealed and checked on every load path.

A saved model's ``config.json`` (and a quantized variant's ``quantization.json``) records the
SHA-256 of its own content beside that of the weights, so a hand edit that keeps the JSON
valid (a reordered tag list, another pooling, another activation) is refused by
``variants.load`` and ``predict`` alike, without the caller passing the data's labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import compactnlu.inference as inference
from compactnlu import variants
from compactnlu.artifacts import RECORD_DIGEST
from compactnlu.compose import LabelSpace
from compactnlu.config import load_profile
from compactnlu.features import train_tokenizer
from compactnlu.inference import predict
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.quant import load_quantized, quantize_dynamic, save_quantized

LABELS = LabelSpace(intents=("alarm_set", "play_music"), scenarios=("alarm", "music"), slot_types=("time",))
TEXTS = ["wake me at five am", "play some music by the band", "set an alarm for six in the morning",
         "play the song again", "wake me up at seven", "turn the music up loud",
         "अलार्म সকাল அலாரம் అలారం ಅಲಾರಂ അലാറം\u200d"] * 3
SEALED = r"config\.json was changed after it was saved"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=120)


def tiny_model(tokenizer, pooling="max", labels=LABELS) -> MultiTaskNLU:
    torch.manual_seed(0)
    encoder = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1,
                   hidden_act="gelu")
    return MultiTaskNLU(NLUConfig(n_intents=len(labels.intents), n_domains=len(labels.scenarios), tags=labels.tags,
                                  pooling=pooling, encoder=encoder, intents=labels.intents,
                                  domains=labels.scenarios)).eval()


@pytest.fixture
def profile(tokenizer, tmp_path, monkeypatch):
    """The default profile with its artifacts under tmp_path and predict's data replaced by the
    tiny tokenizer and labels; models are loaded for real, through the variant registry."""
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setattr(inference, "_data", lambda profile: SimpleNamespace(tokenizer=tokenizer, labels=LABELS))
    inference._model.cache_clear()
    yield load_profile("default", {"max_length": 64})
    inference._model.cache_clear()


def hand_edit(path: Path, change) -> None:
    """Edit a saved JSON record as a person would: valid JSON, its seal left as it was."""
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=1))


CONFIG_EDITS = {
    "tag order": lambda r: r.update(tags=[r["tags"][0], *r["tags"][:0:-1]]),
    "pooling max -> mean": lambda r: r.update(pooling="mean"),
    "hidden_act gelu -> relu": lambda r: r["encoder"].update(hidden_act="relu"),
}


@pytest.mark.parametrize("edit", CONFIG_EDITS)
def test_an_edited_config_is_refused_by_variants_load_and_predict(profile, tokenizer, tmp_path, edit):
    folder = tmp_path / "baseline"
    tiny_model(tokenizer).save(folder)
    variants.register(profile, "baseline", folder)
    assert predict("wake me at five am", variant="baseline", profile=profile)["tags"]
    inference._model.cache_clear()

    hand_edit(folder / "config.json", CONFIG_EDITS[edit])
    with pytest.raises(ValueError, match=SEALED):
        variants.load(profile, "baseline")
    with pytest.raises(ValueError, match=SEALED):
        predict("wake me at five am", variant="baseline", profile=profile)


def test_a_reordered_tag_list_is_refused_without_the_callers_labels(tokenizer, tmp_path):
    folder = tmp_path / "m"
    tiny_model(tokenizer).save(folder)
    hand_edit(folder / "config.json", CONFIG_EDITS["tag order"])
    with pytest.raises(ValueError, match=SEALED):
        MultiTaskNLU.load(folder)  # no labels= passed


def test_a_saved_model_records_the_names_of_its_outputs(tokenizer, tmp_path):
    tiny_model(tokenizer).save(tmp_path / "m")
    loaded = MultiTaskNLU.load(tmp_path / "m")
    assert loaded.config.intents == LABELS.intents and loaded.config.domains == LABELS.scenarios
    swapped = LabelSpace(intents=LABELS.intents[::-1], scenarios=LABELS.scenarios, slot_types=LABELS.slot_types)
    with pytest.raises(ValueError, match=r"intents differ from the data's at position 0"):
        MultiTaskNLU.load(tmp_path / "m", labels=swapped)


def test_predict_names_outputs_by_the_models_own_labels(profile, tokenizer, tmp_path, monkeypatch):
    """Data whose intent list is in another order does not relabel the model's answers."""
    folder = tmp_path / "baseline"
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.id_head.weight.zero_()
        model.id_head.bias.copy_(torch.tensor([3.0, -3.0]))  # output 0: alarm_set
    model.save(folder)
    variants.register(profile, "baseline", folder)
    swapped = LabelSpace(intents=LABELS.intents[::-1], scenarios=LABELS.scenarios, slot_types=LABELS.slot_types)
    monkeypatch.setattr(inference, "_data", lambda profile: SimpleNamespace(tokenizer=tokenizer, labels=swapped))
    assert predict("wake me at five am", variant="baseline", profile=profile)["intents"] == ["alarm_set"]


def test_an_edited_config_of_a_quantized_variant_is_refused(profile, tokenizer, tmp_path):
    folder = save_quantized(quantize_dynamic(tiny_model(tokenizer)), tmp_path / "dyn", "dynamic")
    variants.register(profile, "baseline_dynamic", folder)
    variants.load(profile, "baseline_dynamic")
    hand_edit(folder / "config.json", CONFIG_EDITS["pooling max -> mean"])
    with pytest.raises(ValueError, match=r"config\.json is corrupt or truncated"):
        variants.load(profile, "baseline_dynamic")
    with pytest.raises(ValueError, match=r"config\.json is corrupt or truncated"):
        predict("wake me at five am", variant="baseline_dynamic", profile=profile)


def test_a_hand_edited_quantization_record_is_refused(tokenizer, tmp_path):
    folder = save_quantized(quantize_dynamic(tiny_model(tokenizer)), tmp_path / "dyn", "dynamic", {"note": "a"})
    hand_edit(folder / "quantization.json", lambda r: r.update(note="b"))
    with pytest.raises(ValueError, match=r"quantization\.json was changed after it was saved"):
        load_quantized(folder)
    hand_edit(folder / "quantization.json", lambda r: r.pop(RECORD_DIGEST))
    with pytest.raises(ValueError, match=r"records no record_sha256"):
        load_quantized(folder)


def test_an_unknown_variant_name_suggests_the_closest(profile):
    with pytest.raises(KeyError, match=r"did you mean 'baseline'\? names are lower case"):
        predict("wake me at five am", variant="Baseline", profile=profile)
    with pytest.raises(KeyError, match=r"did you mean 'kd_pcptq'\?"):
        variants.load(profile, "kd_pcptp")


# ---------------------------------------------------------------- text predict cannot read

@pytest.fixture
def answer(profile, tokenizer, tmp_path):
    folder = tmp_path / "baseline"
    tiny_model(tokenizer).save(folder)
    variants.register(profile, "baseline", folder)
    return lambda text: predict(text, variant="baseline", profile=profile)


def test_corpus_text_is_readable(answer):
    assert answer("wake me at five am")["unreadable_words"] == 0
    # the six scripts, with the zero-width (non-)joiners their words hold
    assert answer("अलार्म সকাল அலாரம் అలారం ಅಲಾರಂ അലാറം\u200d")["unreadable_words"] == 0
    # everyday signs, superscripts, fractions, modifier letters and Tamil's signs are text too
    assert [c for c in "°©½²ʼ௳" if not inference._readable_character(c)] == []


@pytest.mark.parametrize("word", ["\U0001F600", "будильник", "闹钟", "wake\x07", "\u200b", "\ufeffwake", "\u202eam"])
def test_text_outside_the_six_locales_is_counted_as_unreadable(answer, word):
    result = answer(f"wake me at {word} five")
    assert result["unreadable_words"] == 1 and result["unreadable"] == [word]
    assert result["unseen_words"] == 0  # read, but not readable: a separate count


@pytest.mark.parametrize("text", ["wake \ud800 me", "\udfff"])
def test_a_lone_surrogate_is_a_value_error_naming_it(answer, text):
    with pytest.raises(ValueError, match=r"lone surrogate"):
        answer(text)
