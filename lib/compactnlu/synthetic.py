"""A tiny synthetic corpus in MASSIVE's format, for the smoke profile and the tests.

MASSIVE itself is never copied into the project. The smoke profile and the tests run
on this stand-in instead: made-up words in each locale's script, a handful of
scenarios, intents and slots, and parallel ids across locales (as in MASSIVE, the same
id is the same request in every language, so en-US can gloss the others). Utterances
are built from intent keywords and slot values, so a small model can learn them.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from pathlib import Path

import numpy as np

from .artifacts import atomic_dir
from .config import GLOSS_LOCALE, LOCALES, ROOT

log = logging.getLogger(__name__)
_said_massive_dir_ignored = False  # many steps reach the corpus; one line per process says it

# (first consonant, last consonant, first vowel sign, last vowel sign) of each script.
SCRIPT_RANGES = {
    "hi-IN": (0x0915, 0x0939, 0x093E, 0x094C),
    "bn-BD": (0x0995, 0x09B9, 0x09BE, 0x09CC),
    "ta-IN": (0x0B95, 0x0BB9, 0x0BBE, 0x0BCC),
    "te-IN": (0x0C15, 0x0C39, 0x0C3E, 0x0C4C),
    "kn-IN": (0x0C95, 0x0CB9, 0x0CBE, 0x0CCC),
    "ml-IN": (0x0D15, 0x0D39, 0x0D3E, 0x0D4C),
}
SCENARIOS = {
    "alarm": ["alarm_set", "alarm_remove"],
    "music": ["play_music", "music_query"],
    "weather": ["weather_query"],
    "calendar": ["calendar_set", "calendar_query"],
    "email": ["email_send"],
    "takeaway": ["takeaway_order"],
    "news": ["news_query"],
}
SLOTS_BY_SCENARIO = {
    "alarm": ["time", "date"], "music": ["song_name", "artist_name"], "weather": ["place_name", "date"],
    "calendar": ["event_name", "date", "time"], "email": ["person"], "takeaway": ["food_type", "business_name"],
    "news": ["news_topic"],
}
SIZES = {"train": 90, "dev": 24, "test": 30}


def _assigned(cp: int) -> bool:
    return bool(unicodedata.name(chr(cp), ""))


def _lexicon(locale: str, n_words: int, rng: np.random.Generator) -> list[str]:
    """``n_words`` distinct pseudo-words of 2-3 syllables in the locale's script."""
    if locale in SCRIPT_RANGES:
        c0, c1, v0, v1 = SCRIPT_RANGES[locale]
        consonants = [chr(c) for c in range(c0, c1 + 1) if _assigned(c)]
        vowels = [chr(c) for c in range(v0, v1 + 1) if _assigned(c)] + [""]
    else:
        consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
    words: list[str] = []
    seen = set()
    while len(words) < n_words:
        n_syl = int(rng.integers(2, 4))
        word = "".join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
                       for _ in range(n_syl))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _plans(rng: np.random.Generator) -> list[dict]:
    """Language-independent content of every record: intent, slots, word order."""
    plans, next_id = [], 0
    intents = [(s, i) for s, items in SCENARIOS.items() for i in items]
    for partition, size in SIZES.items():
        for n in range(size):
            scenario, intent = intents[n % len(intents)]
            slot_types = [s for s in SLOTS_BY_SCENARIO[scenario] if rng.random() < 0.7]
            parts = [("kw", intent, j) for j in range(2)] + [("fill", None, int(rng.integers(6)))]
            parts += [("slot", s, int(rng.integers(5))) for s in slot_types]
            order = rng.permutation(len(parts))
            plans.append({"id": str(next_id), "partition": partition, "scenario": scenario,
                          "intent": intent, "parts": [parts[i] for i in order]})
            next_id += 1
    return plans


def _render(plan: dict, words: dict) -> tuple[str, str]:
    utt, annot = [], []
    for kind, name, index in plan["parts"]:
        if kind == "kw":
            token = words["kw"][name][index]
            utt.append(token)
            annot.append(token)
        elif kind == "fill":
            utt.append(words["fill"][index])
            annot.append(words["fill"][index])
        else:
            value = words["slot"][name][index]
            utt.extend(value)
            annot.append(f"[{name} : {' '.join(value)}]")
    return " ".join(utt), " ".join(annot)


def write_corpus(folder: Path | str, locales=LOCALES + (GLOSS_LOCALE,), seed: int = 0) -> Path:
    """Write ``folder/1.1/data/<locale>.jsonl`` for each locale; returns the folder."""
    folder = Path(folder)
    data_dir = folder / "1.1" / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    plans = _plans(np.random.default_rng(seed))
    intents = [i for items in SCENARIOS.values() for i in items]
    slot_types = sorted({s for items in SLOTS_BY_SCENARIO.values() for s in items})
    for k, locale in enumerate(locales):
        rng = np.random.default_rng([seed, k + 1])
        lex = iter(_lexicon(locale, 2 * len(intents) + 6 + 5 * 2 * len(slot_types), rng))
        words = {
            "kw": {i: [next(lex), next(lex)] for i in intents},
            "fill": [next(lex) for _ in range(6)],
            "slot": {s: [[next(lex)] if v % 2 else [next(lex), next(lex)] for v in range(5)]
                     for s in slot_types},
        }
        path = data_dir / f"{locale}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for plan in plans:
                utt, annot = _render(plan, words)
                record = {"id": plan["id"], "locale": locale, "partition": plan["partition"],
                          "scenario": plan["scenario"], "intent": plan["intent"], "utt": utt, "annot_utt": annot}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder


def note_massive_dir_ignored(folder: Path | str) -> None:
    """Say, once per process, that a set MASSIVE_DIR is not read: the corpus in ``folder`` is."""
    global _said_massive_dir_ignored
    value = os.environ.get("MASSIVE_DIR")
    if _said_massive_dir_ignored or not value or (ROOT / value).resolve() == Path(folder).resolve():
        return
    _said_massive_dir_ignored = True
    log.warning("MASSIVE_DIR=%s is ignored: this profile reads the synthetic stand-in corpus in %s, not MASSIVE "
                "(use the default or paper profile for MASSIVE)", value, folder)


def ensure_corpus(folder: Path | str) -> Path:
    """Write the synthetic corpus into ``folder`` unless it is there already."""
    folder = Path(folder)
    note_massive_dir_ignored(folder)
    if not (folder / "1.1" / "data" / f"{GLOSS_LOCALE}.jsonl").is_file():
        with atomic_dir(folder) as tmp:
            write_corpus(tmp)
    return folder
