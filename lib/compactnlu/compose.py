"""Multi-intent, cross-domain utterances composed from single MASSIVE utterances.

As in the paper's Fig. 1, an example joins k utterances of one locale and partition,
each from a different scenario (domain), with a sentence separator natural to the
script between them. Labels: the set of intents, the set of domains, and the
concatenated BIO slot tags (the separator is tagged ``O``). Each example keeps the ids
of its source utterances, and only ever draws from its own partition.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np

from .massive import PARTITIONS, rows_to_dataset

# Hindi and Bengali end sentences with the danda; the Dravidian scripts use the full stop.
SEPARATORS = {"hi-IN": "।", "bn-BD": "।", "ta-IN": ".", "te-IN": ".", "kn-IN": ".", "ml-IN": "."}
DEFAULT_SEPARATOR = "."

FEATURES = datasets.Features({
    "uid": datasets.Value("string"),
    "locale": datasets.Value("string"),
    "partition": datasets.Value("string"),
    "n_parts": datasets.Value("int32"),
    "source_ids": datasets.Sequence(datasets.Value("string")),
    "utt": datasets.Value("string"),
    "words": datasets.Sequence(datasets.Value("string")),
    "tags": datasets.Sequence(datasets.Value("string")),
    "intents": datasets.Sequence(datasets.Value("string")),
    "scenarios": datasets.Sequence(datasets.Value("string")),
})


@dataclass(frozen=True)
class LabelSpace:
    """The label vocabularies, taken from the data."""

    intents: tuple[str, ...]
    scenarios: tuple[str, ...]
    slot_types: tuple[str, ...]

    @property
    def tags(self) -> tuple[str, ...]:
        """BIO tags: ``O`` first, then ``B-x``, ``I-x`` for each slot type."""
        return ("O",) + tuple(f"{p}-{s}" for s in self.slot_types for p in ("B", "I"))

    @classmethod
    def from_records(cls, records: datasets.Dataset) -> "LabelSpace":
        slot_types = {t[2:] for tags in records["tags"] for t in tags if t != "O"}
        return cls(tuple(sorted(set(records["intent"]))), tuple(sorted(set(records["scenario"]))),
                   tuple(sorted(slot_types)))

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path | str) -> "LabelSpace":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{k: tuple(v) for k, v in raw.items()})


def _rng(seed: int, locale: str, partition: str) -> np.random.Generator:
    # A stable per-(locale, partition) stream: the same seed composes the same examples
    # whatever other locales are loaded.
    return np.random.default_rng([seed, zlib.crc32(f"{locale}/{partition}".encode())])


def _join(parts: list[dict], separator: str) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for i, part in enumerate(parts):
        if i:
            words.append(separator)
            tags.append("O")
        words.extend(part["words"])
        tags.extend(part["tags"])
    return words, tags


def _example(uid: str, parts: list[dict], separator: str) -> dict:
    words, tags = _join(parts, separator)
    return {
        "uid": uid, "locale": parts[0]["locale"], "partition": parts[0]["partition"],
        "n_parts": len(parts), "source_ids": [p["id"] for p in parts], "utt": " ".join(words),
        "words": words, "tags": tags,
        "intents": [p["intent"] for p in parts], "scenarios": [p["scenario"] for p in parts],
    }


def compose_group(records: list[dict], n_examples: int, k_probs, rng: np.random.Generator,
                  separator: str) -> list[dict]:
    """``n_examples`` composed examples from the records of one locale and partition.

    Every record is used as an anchor once before any is used twice; partners come from
    scenarios not yet in the example, drawn uniformly by scenario, then by utterance.
    """
    k_values = np.arange(1, len(k_probs) + 1)
    probs = np.asarray(k_probs, dtype=float)
    if (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
        raise ValueError(f"compose_k_probs must be non-negative and sum to 1, got {tuple(k_probs)}")
    if not records or n_examples <= 0:
        return []
    by_scenario: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_scenario.setdefault(rec["scenario"], []).append(i)
    scenario_names = sorted(by_scenario)
    n_rounds = -(-n_examples // len(records))
    anchors = np.concatenate([rng.permutation(len(records)) for _ in range(n_rounds)])[:n_examples]
    ks = rng.choice(k_values, size=n_examples, p=probs)
    examples = []
    for n, (anchor, k) in enumerate(zip(anchors, ks)):
        chosen = [int(anchor)]
        used = {records[anchor]["scenario"]}
        for _ in range(min(int(k), len(scenario_names)) - 1):
            free = [s for s in scenario_names if s not in used]
            scenario = free[rng.integers(len(free))]
            pool = by_scenario[scenario]
            chosen.append(pool[rng.integers(len(pool))])
            used.add(scenario)
        order = rng.permutation(len(chosen))
        parts = [records[chosen[i]] for i in order]
        examples.append(_example(f"{parts[0]['locale']}/{parts[0]['partition']}/{n}", parts, separator))
    return examples


def _grouped(records: datasets.Dataset) -> dict[tuple[str, str], list[dict]]:
    """Records by (partition, locale), refusing any that would break composing or leak.

    ``load_massive`` already refuses these; records built another way are checked here.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    partition_of: dict[tuple[str, str], str] = {}  # (locale, id) -> partition
    for rec in records:
        where = f"record {rec['id']!r} of {rec['locale']} {rec['partition']}"
        if not rec["words"]:
            raise ValueError(f"{where}: empty utterance (no words)")
        for key in ("intent", "scenario"):
            if not isinstance(rec[key], str) or not rec[key]:
                raise ValueError(f"{where}: {key} is {rec[key]!r}, not a label")
        first = partition_of.setdefault((rec["locale"], rec["id"]), rec["partition"])
        if first != rec["partition"]:
            raise ValueError(f"id {rec['id']!r} of {rec['locale']} is in both {first} and {rec['partition']}: "
                             f"composed examples would leak between the partitions")
        groups.setdefault((rec["partition"], rec["locale"]), []).append(rec)
    return groups


def compose(records: datasets.Dataset, *, k_probs=(0.3, 0.4, 0.3), per_utterance: float = 1.0,
            seed: int = 13) -> datasets.DatasetDict:
    """Composed examples for every locale, one split per partition (train, dev, test)."""
    groups = _grouped(records)
    splits: dict[str, list[dict]] = {p: [] for p in PARTITIONS}
    for (partition, locale), recs in sorted(groups.items()):
        n_out = int(round(len(recs) * per_utterance))
        sep = SEPARATORS.get(locale, DEFAULT_SEPARATOR)
        splits.setdefault(partition, []).extend(
            compose_group(recs, n_out, k_probs, _rng(seed, locale, partition), sep))
    return datasets.DatasetDict(
        {p: rows_to_dataset(rows, FEATURES) for p, rows in splits.items()})


def singles(records: datasets.Dataset, partition: str = "test") -> datasets.Dataset:
    """The official single-utterance examples of one partition, in the composed schema."""
    rows = [_example(f"{r['locale']}/{partition}/single/{r['id']}", [r], DEFAULT_SEPARATOR)
            for r in records if r["partition"] == partition]
    return rows_to_dataset(rows, FEATURES)

def multi_hot(sets, names) -> np.ndarray:
    """``[n, len(names)]`` int8 indicators of each set of label names."""
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(sets), len(names)), dtype=np.int8)
    for r, labels in enumerate(sets):
        out[r, [index[x] for x in labels]] = 1
    return out

def one_label_per_word(tags: list[str]) -> list[str]:
    """BIO ``tags`` as MASSIVE's official scoring reads them: one slot type per word, a run of
    one type is one span (alexa/massive ``convert_to_bio``). B-x B-x and I-x B-x become
    B-x I-x; an I-x that continues nothing becomes B-x, as seqeval already reads it."""
    out, previous = [], None
    for tag in tags:
        slot = None if tag == "O" else tag[2:]
        out.append("O" if slot is None else ("I-" if slot == previous else "B-") + slot)
        previous = slot
    return out
