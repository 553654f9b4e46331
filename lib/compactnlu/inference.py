"""``predict("...", variant="kd_pcptq")``: one utterance in, intents, domains and slots out."""

from __future__ import annotations

import functools

import torch

from .config import Profile, load_profile
from .features import IGNORE, encode_words, load_study_data
from .interface import THRESHOLD, decide, label_sets
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


@torch.no_grad()
def predict(text: str, variant: str = "kd_pcptq", profile: str | Profile = "default",
            threshold: float = THRESHOLD) -> dict:
    """Intents, domains (labels with probability ≥ ``threshold``, or the most likely one) and
    slots of ``text`` (words split on whitespace, as MASSIVE's are), by a registered variant
    of ``profile`` (a name, or a ``Profile`` with overrides).

    The model reads at most ``profile.max_length`` subwords. ``truncated`` says whether the
    text was cut to fit; ``unseen_words`` counts the words cut off (their tags are "O"), and
    the intents and domains come from the part that was read.
    """
    if not isinstance(text, str):
        raise TypeError(f"predict: text must be a string, got {type(text).__name__} {text!r:.80}")
    words = text.split()
    if not words:
        raise ValueError(f"predict: text {text!r:.80} has no words (it is empty or only whitespace)")
    if isinstance(profile, str):
        profile = load_profile(profile)
    data = _data(profile)
    model = _model(profile, variant)
    encoded = encode_words(data.tokenizer, [words], [["O"] * len(words)], {"O": 0}, profile.max_length)
    input_ids = torch.tensor(encoded["input_ids"])
    labels = torch.tensor(encoded["slot_labels"])
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    result = {"text": text, "variant": variant, "truncated": encoded["n_subwords"][0] > profile.max_length,
              "unseen_words": encoded["truncated_words"][0]}
    decisions = decide(out, labels != IGNORE, model, threshold)
    for name, chosen, names in (("intents", decisions.intents, data.labels.intents),
                                ("domains", decisions.domains, data.labels.scenarios)):
        if chosen is not None:
            result[name] = [names[i] for i in label_sets(chosen)[0]]
    if decisions.slots is not None:
        path = decisions.slots[0]
        tags = [data.labels.tags[t] for t in path] + ["O"] * (len(words) - len(path))
        result["tags"] = tags
        result["slots"] = spans(words, tags)
    return result
