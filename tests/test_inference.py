"""``compactnlu.inference.predict`` on a tiny model and tokenizer: bad input, and texts too long to read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import compactnlu.inference as inference
from compactnlu.compose import LabelSpace
from compactnlu.config import load_profile
from compactnlu.features import METASPACE, train_tokenizer
from compactnlu.inference import predict, spans
from compactnlu.model import MultiTaskNLU, NLUConfig
from conftest import labelled_positions

MAX_LENGTH = 16
LABELS = LabelSpace(intents=("alarm_set", "play_music"), scenarios=("alarm", "music"), slot_types=("time",))
TEXTS = ["wake me at five am", "play some music by the band", "set an alarm for six in the morning",
         "play the song again", "wake me up at seven", "turn the music up loud"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=60)


@pytest.fixture
def profile(tokenizer, monkeypatch):
    """A profile whose data and model are the tiny ones here: predict's cached loaders are replaced."""
    torch.manual_seed(0)
    encoder = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=MAX_LENGTH + 2, pad_token_id=1, type_vocab_size=1)
    model = MultiTaskNLU(NLUConfig(n_intents=len(LABELS.intents), n_domains=len(LABELS.scenarios),
                                   tags=LABELS.tags, encoder=encoder)).eval()
    data = SimpleNamespace(tokenizer=tokenizer, labels=LABELS)
    monkeypatch.setattr(inference, "_data", lambda profile: data)
    monkeypatch.setattr(inference, "_model", lambda profile, variant: model)
    return load_profile("default", {"max_length": MAX_LENGTH})


def n_subwords(tokenizer, words) -> int:
    return len(tokenizer(words, is_split_into_words=True)["input_ids"])


def words_seen(tokenizer, words, max_length: int) -> int:
    """Words whose labelled subword lies in the first ``max_length - 1`` tokens (the last slot is </s>)."""
    encoded = tokenizer(words, is_split_into_words=True)
    positions = labelled_positions(encoded["input_ids"], encoded.word_ids(), tokenizer.convert_tokens_to_ids(METASPACE))
    return sum(1 for pos in positions.values() if pos < max_length - 1)


@pytest.mark.parametrize("text", [None, 5, 2.5, b"wake me at five", ["wake", "me"]])
def test_a_text_that_is_not_a_string_is_a_type_error(profile, text):
    with pytest.raises(TypeError, match=f"text must be a string, got {type(text).__name__}"):
        predict(text, profile=profile)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_a_text_without_words_is_a_value_error(profile, text):
    with pytest.raises(ValueError, match="has no words"):
        predict(text, profile=profile)


def test_a_short_text_is_read_whole(profile, tokenizer):
    text = "wake me at five am"
    assert n_subwords(tokenizer, text.split()) <= MAX_LENGTH
    answer = predict(text, profile=profile)
    assert answer["truncated"] is False and answer["unseen_words"] == 0
    assert len(answer["tags"]) == 5 and set(answer["tags"]) <= set(LABELS.tags)
    assert set(answer["intents"]) <= set(LABELS.intents) and set(answer["domains"]) <= set(LABELS.scenarios)


def test_a_long_text_says_it_was_cut_and_how_many_words_were_not_seen(profile, tokenizer):
    words = ("wake me at five am and play the song again " * 1000).split()[:2000]
    text = " ".join(words)
    seen = words_seen(tokenizer, words, MAX_LENGTH)
    assert 0 < seen < len(words)

    answer = predict(text, profile=profile)

    assert answer["truncated"] is True
    assert answer["unseen_words"] == len(words) - seen
    assert len(answer["tags"]) == len(words)  # one tag a word still, the unseen ones "O"
    assert set(answer["tags"][seen:]) == {"O"}


def test_truncated_starts_one_subword_past_max_length(profile, tokenizer):
    words = "set an alarm for six in the morning and play some music by the band".split()
    fits = max(k for k in range(1, len(words) + 1) if n_subwords(tokenizer, words[:k]) <= MAX_LENGTH)
    assert fits < len(words)

    whole = predict(" ".join(words[:fits]), profile=profile)
    cut = predict(" ".join(words[:fits + 1]), profile=profile)

    assert (whole["truncated"], whole["unseen_words"]) == (False, 0)
    assert cut["truncated"] is True
    assert cut["unseen_words"] == fits + 1 - words_seen(tokenizer, words[:fits + 1], MAX_LENGTH)


def test_labels_below_the_threshold_give_the_most_probable_one(profile):
    """The study's rule (``interface.decide``): with every intent and domain below 0.5 the most
    probable label is still answered; above it, every label that reaches it."""
    model = inference._model(profile, "any")
    with torch.no_grad():
        model.id_head.weight.zero_()
        model.dc_head.weight.zero_()
        model.id_head.bias.copy_(torch.tensor([-2.0, -1.0]))  # play_music the more probable, neither at 0.5
        model.dc_head.bias.copy_(torch.tensor([1.0, 2.0]))  # both at 0.5
    answer = predict("wake me at five am", profile=profile)
    assert answer["intents"] == ["play_music"] and answer["domains"] == ["alarm", "music"]


def test_spans_read_a_run_of_one_type_as_one_span():
    """MASSIVE keeps one slot label per word, so B-x B-x is one span there, as here."""
    words = ["at", "five", "six", "am", "today"]
    assert spans(words, ["O", "B-time", "B-time", "I-time", "B-date"]) == [
        {"slot": "time", "text": "five six am"}, {"slot": "date", "text": "today"}]
    assert spans(words, ["B-time", "O", "B-time", "I-date", "B-date"]) == [
        {"slot": "time", "text": "at"}, {"slot": "time", "text": "six"}, {"slot": "date", "text": "am today"}]
