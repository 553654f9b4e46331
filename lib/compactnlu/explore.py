"""Summaries of the data that notebook 01 shows: counts, lengths, labels, Fig. 1 examples."""

from __future__ import annotations

import datasets
import pandas as pd


def slot_annotation(words: list[str], tags: list[str]) -> str:
    """Words and BIO tags back to MASSIVE's ``[slot : words]`` notation."""
    out, open_label = [], None
    for word, tag in zip(words, tags):
        if tag.startswith("I-") and open_label == tag[2:]:
            out[-1] = out[-1][:-1] + f" {word}]"
            continue
        open_label = tag[2:] if tag != "O" else None
        out.append(f"[{open_label} : {word}]" if open_label else word)
    return " ".join(out)


def data_counts(report: dict) -> pd.DataFrame:
    """``locale, partition, utterances, composed_examples``: official records and composed examples."""
    df = pd.DataFrame(report["counts"])
    df["partition"] = pd.Categorical(df["partition"], ["train", "dev", "test"], ordered=True)
    return df.sort_values(["locale", "partition"])[["locale", "partition", "utterances", "composed_examples"]]


def truncation(report: dict) -> pd.DataFrame:
    df = pd.DataFrame(report["counts"])
    return df[["locale", "partition", "composed_examples", "truncated_examples", "truncated_words"]]


def lengths(features: datasets.DatasetDict, splits=("train", "test_single")) -> pd.DataFrame:
    """One row per example: split, locale, parts, words and subwords."""
    frames = []
    for split in splits:
        df = features[split].select_columns(["locale", "n_parts", "words", "n_subwords"]).to_pandas()
        df["n_words"] = df.pop("words").map(len)
        df["split"] = split
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def label_frequencies(records: datasets.Dataset, partition: str = "train") -> dict[str, pd.Series]:
    """How often each intent, scenario and slot type occurs in one partition."""
    df = records.filter(lambda p: p == partition, input_columns="partition").to_pandas()
    slots = df["tags"].explode()
    slots = slots[slots.str.startswith("B-", na=False)].str[2:]
    return {"intent": df["intent"].value_counts(), "scenario": df["scenario"].value_counts(),
            "slot": slots.value_counts()}


def fig1_examples(test: datasets.Dataset, gloss: datasets.Dataset, per_locale: int = 1,
                  min_parts: int = 2) -> pd.DataFrame:
    """Composed test examples per locale with intents, domains, slots and English glosses.

    The gloss is the en-US utterance with the same MASSIVE id as each part (MASSIVE is
    parallel across locales).
    """
    english = {(r["partition"], r["id"]): r["utt"] for r in gloss.to_list()}
    rows = []
    seen: dict[str, int] = {}
    for ex in test.to_list():
        if ex["n_parts"] < min_parts or seen.get(ex["locale"], 0) >= per_locale:
            continue
        seen[ex["locale"]] = seen.get(ex["locale"], 0) + 1
        rows.append({
            "locale": ex["locale"],
            "utterance": ex["utt"],
            "intents": ", ".join(ex["intents"]),
            "domains": ", ".join(ex["scenarios"]),
            "slots": slot_annotation(ex["words"], ex["tags"]),
            "english gloss": " | ".join(english.get((ex["partition"], i), "?") for i in ex["source_ids"]),
        })
    return pd.DataFrame(rows)
