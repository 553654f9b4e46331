"""Parse and validate MASSIVE 1.1's locale files into one :class:`datasets.Dataset`
(finding, downloading and verifying them: :mod:`compactnlu.massive_download`).

``annot_utt`` such as ``wake me [time : five am]`` becomes words
``["wake", "me", "five", "am"]`` and BIO tags ``["O", "O", "B-time", "I-time"]``.
Every malformed record raises :class:`MassiveFormatError` naming file and line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from .massive_download import locate

log = logging.getLogger(__name__)

PARTITIONS = ("train", "dev", "test")
REQUIRED_KEYS = ("id", "locale", "partition", "scenario", "intent", "utt", "annot_utt")

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "locale": datasets.Value("string"),
    "partition": datasets.Value("string"),
    "scenario": datasets.Value("string"),
    "intent": datasets.Value("string"),
    "utt": datasets.Value("string"),
    "words": datasets.Sequence(datasets.Value("string")),
    "tags": datasets.Sequence(datasets.Value("string")),
})


class MassiveFormatError(ValueError):
    """A MASSIVE record that cannot be parsed; ``str()`` names file and line."""

    def __init__(self, path: Path | str, line: int, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


class IncompleteLocaleError(ValueError):
    """A requested locale whose file is empty or lacks a partition; ``str()`` names the file."""

    def __init__(self, path: Path | str, locale: str, reason: str):
        self.path, self.locale, self.reason = Path(path), locale, reason
        super().__init__(f"{path}: {reason}")


class AnnotationError(ValueError):
    """An ``annot_utt`` string that is not well formed (raised without file context)."""


@dataclass(frozen=True)
class DroppedLine:
    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


# ---------------------------------------------------------------- parsing

def parse_annotation(annot_utt: str) -> tuple[list[str], list[str]]:
    """Words and BIO tags of one ``annot_utt`` string."""
    words: list[str] = []
    tags: list[str] = []
    label: str | None = None  # the open slot's label, None outside brackets
    awaiting_colon = False
    slot_words = 0
    for token in annot_utt.split():
        if token.startswith("["):
            if label is not None:
                raise AnnotationError(f"nested '[' inside slot {label!r}")
            label = token[1:]
            if not label or label == ":":
                raise AnnotationError("slot without a label: '[' must be followed by 'label :'")
            if "]" in label or "[" in label:
                raise AnnotationError(f"malformed slot label {label!r}")
            awaiting_colon, slot_words = True, 0
            continue
        if awaiting_colon:
            if token != ":":
                raise AnnotationError(f"slot {label!r}: expected ' : ' after the label, got {token!r}")
            awaiting_colon = False
            continue
        closes = token.endswith("]")
        word = token[:-1] if closes else token
        if "[" in word or "]" in word:
            raise AnnotationError(f"stray bracket in {token!r}")
        if closes and label is None:
            raise AnnotationError(f"unbalanced ']' in {token!r}")
        if word:
            words.append(word)
            if label is None:
                tags.append("O")
            else:
                if slot_words == 0 and tags and tags[-1][2:] == label:
                    # The official scoring keeps one label per word, so it would read the two as one span.
                    raise AnnotationError(f"two adjacent spans of slot {label!r}: MASSIVE's one-label-per-word "
                                          "format cannot tell them apart")
                tags.append(("B-" if slot_words == 0 else "I-") + label)
                slot_words += 1
        if closes:
            if slot_words == 0:
                raise AnnotationError(f"slot {label!r} has no words")
            label = None
    if label is not None:
        raise AnnotationError(f"unbalanced '[': slot {label!r} is never closed")
    return words, tags


def _check_field(key: str, value) -> None:
    # MASSIVE's ids are strings of numbers; a bare JSON number is accepted as the same id.
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, str):
        raise AnnotationError(f"field {key!r} is {json.dumps(value, ensure_ascii=False)[:40]}, not a string")
    if not value.strip():
        what = "empty utterance: " if key in ("utt", "annot_utt") else ""
        raise AnnotationError(f"{what}field {key!r} is empty" + (f" (only {value!r})" if value else ""))


def parse_record(raw: dict, expected_locale: str | None = None) -> dict:
    """One MASSIVE json record to the fields the study uses (raises AnnotationError)."""
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise AnnotationError(f"record lacks field(s) {', '.join(missing)}")
    for key in REQUIRED_KEYS:
        _check_field(key, raw[key])
    if expected_locale and raw["locale"] != expected_locale:
        raise AnnotationError(f"record locale {raw['locale']!r} in the file of {expected_locale!r}")
    if raw["partition"] not in PARTITIONS:
        raise AnnotationError(f"unknown partition {raw['partition']!r}")
    words, tags = parse_annotation(raw["annot_utt"])
    if " ".join(words) != raw["utt"]:
        raise AnnotationError(
            f"annotation and utterance disagree: annot_utt gives {' '.join(words)!r}, utt is {raw['utt']!r}"
        )
    return {
        "id": str(raw["id"]), "locale": raw["locale"], "partition": raw["partition"],
        "scenario": raw["scenario"], "intent": raw["intent"], "utt": raw["utt"],
        "words": words, "tags": tags,
    }


def read_locale_file(path: Path | str, locale: str | None = None, strict: bool = True,
                     dropped: list[DroppedLine] | None = None) -> list[dict]:
    """Parse every line of one ``<locale>.jsonl``.

    Strict (the default) raises on the first bad line. With ``strict=False`` bad lines
    are skipped, each recorded in ``dropped`` and named (file:line: reason) in a warning.
    An id used twice is a bad line: in two partitions it would leak test data into training.
    """
    path = Path(path)
    locale = locale or path.stem
    records, bad = [], []
    first_seen: dict[str, tuple[int, str]] = {}  # id -> (line, partition) of its first record
    # Bytes, decoded line by line, so that invalid UTF-8 is reported with its line number.
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            try:
                line = _decode_line(raw_line, number)
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AnnotationError(f"broken JSON: {err.msg} at column {err.colno}") from None
                if not isinstance(raw, dict):
                    raise AnnotationError("a line must hold one JSON object")
                rec = parse_record(raw, expected_locale=locale)
                _check_new_id(rec, number, first_seen)
                records.append(rec)
            except AnnotationError as err:
                if strict:
                    raise MassiveFormatError(path, number, str(err)) from None
                bad.append(DroppedLine(path, number, str(err)))
    if bad:
        shown = "".join(f"\n  {d}" for d in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        log.warning("%s: dropped %d bad line(s): %s%s", path, len(bad),
                    ", ".join(str(d.line) for d in bad[:20]) + (" ..." if len(bad) > 20 else ""), shown)
        if dropped is not None:
            dropped.extend(bad)
    return records


def _decode_line(raw_line: bytes, number: int) -> str:
    # utf-8-sig on the first line: a byte-order mark some editors write is not part of the record.
    try:
        return raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"invalid UTF-8 at byte {err.start + 1} of the line ({err.reason})") from None


def _check_new_id(rec: dict, number: int, first_seen: dict[str, tuple[int, str]]) -> None:
    first_line, first_partition = first_seen.setdefault(rec["id"], (number, rec["partition"]))
    if first_line == number:
        return
    if first_partition == rec["partition"]:
        raise AnnotationError(f"id {rec['id']!r} is used twice in {first_partition}: lines {first_line} and {number}")
    raise AnnotationError(
        f"id {rec['id']!r} is in both {first_partition} (line {first_line}) and {rec['partition']} "
        f"(line {number}): one utterance in two partitions leaks between them")


# ---------------------------------------------------------------- loading

def load_massive(massive_dir: Path | str, locales, *, verify: bool = True, strict: bool = True,
                 max_per_partition: int | None = None, allow_download: bool = True,
                 dropped: list[DroppedLine] | None = None,
                 require_partitions: tuple[str, ...] = ()) -> datasets.Dataset:
    """Every record of ``locales`` as one :class:`datasets.Dataset` (columns in ``FEATURES``).

    A locale with no records, or none in one of ``require_partitions``, raises
    :class:`IncompleteLocaleError`; with ``strict=False`` it is left out with a warning naming
    its file, so every locale in the result has every required partition.
    ``max_per_partition`` keeps the first N records of each locale and partition, in file order.
    """
    paths = locate(massive_dir, tuple(locales), verify=verify, allow_download=allow_download)
    rows: list[dict] = []
    for loc in tqdm(locales, desc="parse MASSIVE", leave=False):
        records = read_locale_file(paths[loc], loc, strict=strict, dropped=dropped)
        problem = _incompleteness(paths[loc], loc, records, require_partitions)
        if problem:
            if strict:
                raise IncompleteLocaleError(paths[loc], loc, problem)
            log.warning("%s: %s; leaving %s out", paths[loc], problem, loc)
            continue
        if max_per_partition is not None:
            seen: dict[str, int] = {}
            for rec in records:
                seen[rec["partition"]] = seen.get(rec["partition"], 0) + 1
                if seen[rec["partition"]] <= max_per_partition:
                    rows.append(rec)
        else:
            rows.extend(records)
    return rows_to_dataset(rows, FEATURES)


def _incompleteness(path: Path, locale: str, records: list[dict], partitions) -> str | None:
    """Why ``records`` cannot stand for ``locale`` (None if they can)."""
    way_out = (f"replace it with 1.1/data/{locale}.jsonl of the official MASSIVE 1.1 release, "
               f"or leave {locale} out of the locales")
    if not records:
        empty = not path.read_bytes().strip()
        return f"{'the file is empty' if empty else 'every line was dropped'}: no {locale} records; {way_out}"
    present = {rec["partition"] for rec in records}
    missing = [p for p in partitions if p not in present]
    if missing:
        return f"no {locale} records in {', '.join(missing)} (needed: {', '.join(partitions)}); {way_out}"
    return None


def rows_to_dataset(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    """``Dataset.from_list`` that also accepts no rows (datasets 5 rejects an empty list)."""
    if not rows:
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)

