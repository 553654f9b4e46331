"""``predict("...", variant="kd_pcptq")``: one utterance in, intents, domains and slots out."""

from __future__ import annotations

import functools
import unicodedata

import torch

from .config import Profile, load_profile
from .features import encode_words, load_study_data
from .interface import IGNORE, THRESHOLD, check_threshold, infer
from .variants import load as load_variant


@functools.lru_cache(maxsize=4)
def _data(profile: Profile):
    return load_study_data(profile)


@functools.lru_cache(maxsize=16)
def _model(profile: Profile, variant: str):
    return load_variant(profile, variant).eval()


def spans(words: list[str], tags: list[str]) -> list[dict]:
    """BIO tags to slot spans ``{"slot", "text"}``, read one slot label per word as MASSIVE's
    official scoring reads them (``compose.one_label_per_word``): a run of one slot type is one
    span, and an ``I-`` that continues nothing opens a span."""
    out: list[dict] = []
    current = None
    for word, tag in zip(words, tags):
        if tag == "O":
            current = None
            continue
        slot = tag[2:]
        if current is not None and current["slot"] == slot:
            current["words"].append(word)
        else:
            current = {"slot": slot, "words": [word]}
            out.append(current)
    return [{"slot": s["slot"], "text": " ".join(s["words"])} for s in out]


# What the study's text is written in (MASSIVE's six locales, and the Latin words among them);
# a word with letters of any other script, an emoji, a control or another invisible format
# character is text the model never saw, whatever its tokenizer makes of it.
SCRIPTS = ("DEVANAGARI", "BENGALI", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM", "LATIN")
# Zero-width (non-)joiners and the zero-width space occur inside the corpus's own words.
CORPUS_FORMAT_CHARACTERS = {"\u200b", "\u200c", "\u200d"}


def _readable_character(ch: str) -> bool:
    category = unicodedata.category(ch)
    if category in ("Nd", "No", "Lm", "Sc", "Sm", "Sk") or category[0] == "P" or ch in "°©®":
        return True  # digits, ², ½, modifier letters, currency, math, punctuation, everyday signs
    if category[0] in "LMNS":  # letters and marks of the six scripts (Tamil's signs too), not emoji
        return unicodedata.name(ch, "").split(" ")[0] in SCRIPTS or category == "Mn" and ch < "\u0370"
    return ch in CORPUS_FORMAT_CHARACTERS


def unreadable_words(words: list[str], tokenizer) -> list[str]:
    """The words the model cannot read: a character outside the six locales' scripts (and Latin,
    digits, punctuation), only invisible characters, or a piece the tokenizer maps to <unk>."""
    unk = tokenizer.unk_token_id
    out = []
    for word in words:
        invisible = all(ch in CORPUS_FORMAT_CHARACTERS for ch in word)
        if invisible or not all(_readable_character(ch) for ch in word) or \
                unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
            out.append(word)
    return out


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"predict: text must be a string, got {type(text).__name__} {text!r:.80}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"predict: text holds U+{ord(text[error.start]):04X} at position {error.start}, a lone "
                         f"surrogate, which is not a character: it is not valid Unicode text (decode the bytes "
                         f"it came from with errors='replace')") from None


def _label_names(model, data) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Intent, domain and tag names in the order of the model's outputs: those its saved config
    records (sealed with it), else the data's."""
    config = getattr(model, "config", None)
    intents = getattr(config, "intents", ()) or data.labels.intents
    domains = getattr(config, "domains", ()) or data.labels.scenarios
    tags = getattr(config, "tags", ()) or data.labels.tags
    return tuple(intents), tuple(domains), tuple(tags)


@torch.no_grad()
def predict(text: str, variant: str = "kd_pcptq", profile: str | Profile = "default",
            threshold: float = THRESHOLD) -> dict:
    """Intents, domains (labels with probability ≥ ``threshold``, or the most likely one) and
    slots of ``text`` (words split on whitespace, as MASSIVE's are), by a registered variant
    of ``profile`` (a name, or a ``Profile`` with overrides).

    The model reads at most ``profile.max_length`` subwords. ``truncated`` says whether the
    text was cut to fit; ``unseen_words`` counts the words cut off (their tags are "O"), and
    the intents and domains come from the part that was read. ``unreadable_words`` counts the
    words it cannot read (``unreadable`` lists them): another script, emoji, control or other
    invisible characters, or pieces the tokenizer does not know; an answer for a text made of
    them is a guess. A string that is not valid Unicode (a lone surrogate) is a ValueError.
    """
    _check_text(text)
    check_threshold(threshold)
    words = text.split()
    if not words:
        raise ValueError(f"predict: text {text!r:.80} has no words (it is empty or only whitespace)")
    if isinstance(profile, str):
        profile = load_profile(profile)
    data = _data(profile)
    model = _model(profile, variant)
    intent_names, domain_names, tag_names = _label_names(model, data)
    unreadable = unreadable_words(words, data.tokenizer)
    encoded = encode_words(data.tokenizer, [words], [["O"] * len(words)], {"O": 0}, profile.max_length)
    input_ids = torch.tensor(encoded["input_ids"])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "word_mask": torch.tensor(encoded["slot_labels"]) != IGNORE}
    _, decisions = infer(model, batch, threshold)
    result = {"text": text, "variant": variant, "truncated": encoded["n_subwords"][0] > profile.max_length,
              "unseen_words": encoded["truncated_words"][0],
              "unreadable_words": len(unreadable), "unreadable": unreadable}
    result.update(decisions.named(intent_names, domain_names, tag_names, n_words=[len(words)])[0])
    if "tags" in result:
        result["slots"] = spans(words, result["tags"])
    return result
