"""Find, download, verify and parse MASSIVE 1.1.

``annot_utt`` such as ``wake me [time : five am]`` becomes words
``["wake", "me", "five", "am"]`` and BIO tags ``["O", "O", "B-time", "I-time"]``.
Every malformed record raises :class:`MassiveFormatError` naming file and line.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tarfile
import tempfile
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from .artifacts import sha256_file

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz"
TARBALL_NAME = "amazon-massive-dataset-1.1.tar.gz"
# SHA-256 of the official 1.1 locale files (the release's data/<locale>.jsonl).
OFFICIAL_SHA256 = {
    "bn-BD": "de4dbf6553dda2adae44663156b940980606bc4dbc4a4b7c802410da6ee28dbf",
    "en-US": "c70f75c6a543a26e249ec383df67733ad9b1066f6c0406c2e04a3f03356e407e",
    "hi-IN": "5ec38fdc3a424ba4ce85de7f8c2ac0a3a8838417f1df60a4a8cc5ea4fd1e700c",
    "kn-IN": "c0ab6b5866ebedd17b85c45c831e5068a3e4d5d7732722aaaec91bd6153ef912",
    "ml-IN": "9ec62a2368b6d029a7b02878749f1c055b464dc5b964bd83531b147b0aa40fc1",
    "ta-IN": "d9a28c1644cfe36a0b3715f341bceeaea52525668d01a70f448a8751e6dc1a55",
    "te-IN": "503250e32c6312fa6db30d094b66df361adb73720fc2f5718ac85234fd7e4125",
}
# The 52 locales of the MASSIVE 1.1 release: a name outside these cannot be downloaded.
MASSIVE_LOCALES = (
    "af-ZA", "am-ET", "ar-SA", "az-AZ", "bn-BD", "ca-ES", "cy-GB", "da-DK", "de-DE", "el-GR", "en-US",
    "es-ES", "fa-IR", "fi-FI", "fr-FR", "he-IL", "hi-IN", "hu-HU", "hy-AM", "id-ID", "is-IS", "it-IT",
    "ja-JP", "jv-ID", "ka-GE", "km-KH", "kn-IN", "ko-KR", "lv-LV", "ml-IN", "mn-MN", "ms-MY", "my-MM",
    "nb-NO", "nl-NL", "pl-PL", "pt-PT", "ro-RO", "ru-RU", "sl-SL", "sq-AL", "sv-SE", "sw-KE", "ta-IN",
    "te-IN", "th-TH", "tl-PH", "tr-TR", "ur-PK", "vi-VN", "zh-CN", "zh-TW",
)
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


class AnnotationError(ValueError):
    """An ``annot_utt`` string that is not well formed (raised without file context)."""


class ArchiveError(ValueError):
    """A MASSIVE tarball or download that is truncated, corrupt or unsafe; ``str()`` names it."""


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


# ---------------------------------------------------------------- files

def download(url: str, dest: Path | str) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; the file appears only when complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
        # urllib returns a short body without complaint when the connection drops.
        if total is not None and received != total:
            raise ArchiveError(f"download of {url} stopped after {received} of {total} bytes; "
                               f"nothing saved to {dest}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


@contextmanager
def _open_tarball(tarball: Path | str):
    """The open archive; a truncated or corrupt one raises ArchiveError naming it."""
    try:
        with tarfile.open(tarball, "r:*") as archive:
            yield archive
    except (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ArchiveError(f"{tarball}: truncated or corrupt archive ({err}); "
                           f"delete it to have it downloaded again") from None


def safe_extract(tarball: Path | str, dest: Path | str, members: set[str] | None = None) -> list[Path]:
    """Extract regular files of ``tarball`` under ``dest``; refuse any path that leaves it.

    ``members``: only these archive paths (all regular files when None). Every member is
    checked before any is written, and files are extracted into a temporary folder and
    moved into place only when all of them came out whole: a truncated or unsafe archive
    leaves ``dest`` as it was.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with _open_tarball(tarball) as archive:
        # getmembers() reads the whole archive, so truncation shows up here, before any write.
        # By name: a path stored twice is extracted once, its last copy winning as with tar.
        chosen = list({m.name: m for m in archive.getmembers() if _is_wanted(m, tarball, dest, members)}.values())
        with tempfile.TemporaryDirectory(dir=dest, prefix=".extracting-") as tmp:
            for member in chosen:
                archive.extract(member, tmp, filter="data")
            _read_to_end(archive)
            written = []
            for member in chosen:
                target = (dest / member.name).resolve()
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / member.name, target)
                written.append(target)
    return written


def _read_to_end(archive: tarfile.TarFile) -> None:
    # A tarball cut inside its end padding lists and extracts fine: only reading the
    # compressed stream to its end (EOFError) shows the cut.
    while archive.fileobj.read(1 << 20):
        pass


def _is_wanted(member: tarfile.TarInfo, tarball, dest: Path, members: set[str] | None) -> bool:
    """Whether to extract ``member``; raises ArchiveError for one that is unsafe even if unwanted."""
    if not (dest / member.name).resolve().is_relative_to(dest):
        raise ArchiveError(f"{tarball}: member {member.name!r} would be written outside {dest}")
    if member.issym() or member.islnk() or member.isdev():
        raise ArchiveError(f"{tarball}: member {member.name!r} is a link or device; refusing it")
    return not member.isdir() and (members is None or member.name in members)


def _candidates(root: Path, locale: str) -> list[Path]:
    return [root / "1.1" / "data" / f"{locale}.jsonl", root / "data" / f"{locale}.jsonl"]


def available_locales(root: Path | str) -> list[str]:
    root = Path(root)
    found = set()
    for folder in (root / "1.1" / "data", root / "data"):
        if folder.is_dir():
            found |= {p.stem for p in folder.glob("*.jsonl")}
    return sorted(found)


def locate(massive_dir: Path | str, locales: tuple[str, ...] | list[str], *, verify: bool = True,
           allow_download: bool = True, url: str = OFFICIAL_URL,
           checksums: dict[str, str] | None = None) -> dict[str, Path]:
    """Paths of ``<locale>.jsonl`` for each locale, fetching the official release if needed.

    Looks in ``massive_dir`` for ``1.1/data/<locale>.jsonl`` or ``data/<locale>.jsonl``;
    else extracts ``massive_dir/amazon-massive-dataset-1.1.tar.gz``; else downloads that
    tarball from ``url`` first. With ``verify`` each file's SHA-256 must match ``checksums``
    (the official sums by default).
    """
    root = Path(massive_dir)
    checksums = OFFICIAL_SHA256 if checksums is None else checksums

    def found() -> dict[str, Path]:
        out = {}
        for loc in locales:
            for cand in _candidates(root, loc):
                if cand.is_file():
                    out[loc] = cand
                    break
        return out

    paths = found()
    if len(paths) < len(locales):
        tarball = root / TARBALL_NAME
        if not tarball.is_file():
            if not allow_download:
                raise FileNotFoundError(_missing_message(root, locales, paths))
            unknown = [loc for loc in locales if loc not in paths and loc not in MASSIVE_LOCALES]
            if unknown:
                raise ValueError(f"unknown locale(s) {', '.join(unknown)}{_did_you_mean(unknown, MASSIVE_LOCALES)}"
                                 f"; not downloading: MASSIVE 1.1 has {', '.join(MASSIVE_LOCALES)}")
            log.info("MASSIVE not found in %s; downloading %s", root, url)
            download(url, tarball)
        with _open_tarball(tarball) as archive:
            names = {m.name for m in archive.getmembers() if m.isfile()}
            _read_to_end(archive)
        in_tar = {Path(n).stem for n in names if n.endswith(".jsonl")}
        unknown = [loc for loc in locales if loc not in in_tar]
        if unknown:
            raise ValueError(f"unknown locale(s) {', '.join(unknown)}{_did_you_mean(unknown, in_tar)} in {tarball}; "
                             f"available: {', '.join(sorted(in_tar))}")
        wanted = {n for n in names if Path(n).stem in locales and n.endswith(".jsonl")}
        safe_extract(tarball, root, members=wanted)
        paths = found()
        if len(paths) < len(locales):
            raise FileNotFoundError(_missing_message(root, locales, paths))
    if verify:
        for loc, path in paths.items():
            expected = checksums.get(loc)
            if expected is None:
                log.warning("no known SHA-256 for %s; not verified", path)
                continue
            actual = sha256_file(path)
            if actual != expected:
                raise ValueError(f"{path}: SHA-256 {actual} does not match the official {expected}")
    return paths


def _missing_message(root: Path, locales, paths) -> str:
    missing = [loc for loc in locales if loc not in paths]
    have = available_locales(root)
    hint = f"available: {', '.join(have)}" if have else "no locale files there"
    return (f"unknown or missing locale(s) {', '.join(missing)}{_did_you_mean(missing, MASSIVE_LOCALES)} "
            f"under {root} (looked for 1.1/data/<locale>.jsonl, data/<locale>.jsonl, {TARBALL_NAME}); {hint}")


def _did_you_mean(names, known) -> str:
    """`` (did you mean hi-IN?)`` for names that differ from a known locale only in case or '_'."""
    by_key = {k.lower().replace("_", "-"): k for k in known}
    guesses = [by_key[key] for n in names
               if (key := n.lower().replace("_", "-")) in by_key and by_key[key] != n]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def load_massive(massive_dir: Path | str, locales, *, verify: bool = True, strict: bool = True,
                 max_per_partition: int | None = None, allow_download: bool = True,
                 dropped: list[DroppedLine] | None = None) -> datasets.Dataset:
    """Every record of ``locales`` as one :class:`datasets.Dataset` (columns in ``FEATURES``).

    ``max_per_partition`` keeps the first N records of each locale and partition, in file order.
    """
    paths = locate(massive_dir, tuple(locales), verify=verify, allow_download=allow_download)
    rows: list[dict] = []
    for loc in tqdm(locales, desc="parse MASSIVE", leave=False):
        records = read_locale_file(paths[loc], loc, strict=strict, dropped=dropped)
        if max_per_partition is not None:
            seen: dict[str, int] = {}
            for rec in records:
                seen[rec["partition"]] = seen.get(rec["partition"], 0) + 1
                if seen[rec["partition"]] <= max_per_partition:
                    rows.append(rec)
        else:
            rows.extend(records)
    return rows_to_dataset(rows, FEATURES)


def rows_to_dataset(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    """``Dataset.from_list`` that also accepts no rows (datasets 5 rejects an empty list)."""
    if not rows:
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)

