"""Find MASSIVE 1.1's locale files, downloading and extracting the official release if they
are missing, and verify them against the official SHA-256 sums."""

from __future__ import annotations

import gzip
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

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


class ArchiveError(ValueError):
    """A MASSIVE tarball or download that is truncated, corrupt or unsafe; ``str()`` names it."""


class DownloadError(OSError):
    """MASSIVE is not on disk and could not be downloaded; ``str()`` says where to put it by hand."""


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
        raise ArchiveError(f"{tarball}: member {member.name!r} is a link or device; refusing it: the official "
                           f"{TARBALL_NAME} holds 1.1/data/<locale>.jsonl as regular files, so replace "
                           f"this archive with the one from {OFFICIAL_URL}")
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
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(_not_a_folder_message(root))

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
            try:
                download(url, tarball)
            except OSError as err:  # URLError included: offline, DNS, HTTP errors
                raise DownloadError(_download_failed_message(root, url, err)) from None
        with _open_tarball(tarball) as archive:
            members = archive.getmembers()
            _read_to_end(archive)
        for member in members:
            # A link is refused here, before the locale check, which would only see it as missing.
            _is_wanted(member, tarball, root.resolve(), None)
        names = {m.name for m in members if m.isfile()}
        in_tar = {Path(n).stem for n in names if n.endswith(".jsonl")}
        unknown = [loc for loc in locales if loc not in in_tar]
        if unknown:
            have = (f"available: {', '.join(sorted(in_tar))}" if in_tar
                    else "it holds no <locale>.jsonl at all (the official one holds 1.1/data/<locale>.jsonl)")
            raise ValueError(f"unknown locale(s) {', '.join(unknown)}{_did_you_mean(unknown, in_tar)} in {tarball}; "
                             + have)
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


def _not_a_folder_message(root: Path) -> str:
    hint = (f"; set MASSIVE_DIR to the folder that holds it, {root.parent}" if root.name == TARBALL_NAME
            else "; set MASSIVE_DIR (or the profile's massive_dir) to such a folder")
    return (f"the MASSIVE folder {root} is a file, not a folder: expected a folder holding "
            f"1.1/data/<locale>.jsonl or the official tarball {TARBALL_NAME}{hint}")


def _download_failed_message(root: Path, url: str, err: OSError) -> str:
    if isinstance(err, urllib.error.HTTPError):
        why = f"HTTP {err.code} {err.reason}"
    else:
        # URLError wraps the socket error; its strerror reads without the "[Errno -2]".
        reason = getattr(err, "reason", err)
        why = getattr(reason, "strerror", None) or str(reason)
    return (f"MASSIVE 1.1 is not in {root} (no 1.1/data/<locale>.jsonl, no {TARBALL_NAME}) and downloading "
            f"{url} failed ({why}); download it by hand to {root / TARBALL_NAME}, or set MASSIVE_DIR to a "
            f"folder that holds 1.1/data/<locale>.jsonl")


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
