"""Which code made a result: a digest of the library's source, the commit it was run from, the
profile and the CPU.

The digest covers every ``.py`` file of the package, so any change of the library changes it:
the runner's freshness hash and every cached artifact's key include it (``reproduce``,
``cachekeys``), so changing the library reruns what it made instead of reusing models trained by
older code. Every table and figure a notebook writes is entered in ``provenance.json`` beside
them (``<figures>/provenance.json``: file -> commit, code digest, profile, CPU), and
:func:`problems` says where a folder's results do not all come from one commit's code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

from .cpu import cpu_model, isa_flags

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parents[1]
FILE = "provenance.json"
_run: dict = {}  # the profile this process writes results for (set_run), and its figures folder


def digest_of(sources: dict[str, bytes]) -> str:
    """16 hex characters of the SHA-256 of ``sources`` (relative path -> bytes), order-free."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The digest of every ``.py`` file of ``compactnlu`` as it is on disk (read once a process)."""
    return digest_of({p.relative_to(PACKAGE).as_posix(): p.read_bytes() for p in PACKAGE.rglob("*.py")})


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_digest(commit: str) -> str | None:
    """The code digest of ``commit``'s ``lib/compactnlu`` (None where git cannot tell)."""
    listing = _git("ls-tree", "-r", "--name-only", commit, "--", "lib/compactnlu")
    if listing is None:
        return None
    prefix = "lib/compactnlu/"
    sources = {}
    for name in (n for n in listing.splitlines() if n.endswith(".py")):
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"], capture_output=True, timeout=20)
        if blob.returncode != 0:
            return None
        sources[name[len(prefix):]] = blob.stdout
    return digest_of(sources)


@functools.lru_cache(maxsize=1)
def commit() -> str | None:
    """The commit the library runs from, ``+dirty`` when its code differs from that commit's."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    return head if commit_digest(head) == code_digest() else f"{head}+dirty"


def set_run(profile) -> None:
    """Results written from now on in this process are ``profile``'s (notebook.start calls it)."""
    _run.update(profile=profile.name, result_key=profile.result_key, figures=Path(profile.figures_dir).resolve())


def entry() -> dict:
    return {"commit": commit(), "code": code_digest(), "profile": _run.get("profile"),
            "result_key": _run.get("result_key"), "cpu": cpu_model(), "isa": " ".join(isa_flags())}


def note(path: Path | str) -> None:
    """Enter ``path`` (a table or figure just written under the run's figures folder) in that
    folder's ``provenance.json``; outside a run (a test, a script), or outside that folder, nothing."""
    figures = _run.get("figures")
    path = Path(path).resolve()
    if figures is None or not path.is_relative_to(figures):
        return
    record_file = figures / FILE
    try:
        recorded = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    except ValueError as error:  # e.g. a merge conflict in the committed file
        raise ValueError(f"{record_file} is not valid JSON ({error}); delete it and rerun the notebooks that "
                         f"wrote {figures}") from None
    recorded[path.relative_to(figures).as_posix()] = entry()
    tmp = record_file.with_name(f".{FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, record_file)


def problems(figures: Path | str, patterns=("tables/*.csv", "*.png")) -> list[str]:
    """Why the results in ``figures`` do not all come from one commit's code (empty: they do): a
    file with no entry, entries from several commits or code digests, a dirty commit, or a
    recorded digest that is not the recorded commit's code."""
    figures = Path(figures)
    record_file = figures / FILE
    if not record_file.is_file():
        return [f"{record_file} is missing"]
    recorded = json.loads(record_file.read_text(encoding="utf-8"))
    files = sorted(p.relative_to(figures).as_posix() for pattern in patterns for p in figures.glob(pattern))
    out = [f"{name} has no entry in {record_file}" for name in files if name not in recorded]
    runs = {(e.get("commit"), e.get("code")) for name, e in recorded.items() if name in files}
    if len(runs) > 1:
        out.append(f"{record_file}: results from {len(runs)} different commits or code versions: {sorted(map(str, runs))}")
    for made_by, code in runs:
        if not made_by or made_by.endswith("+dirty"):
            out.append(f"{record_file}: results made by uncommitted code ({made_by})")
        elif commit_digest(made_by) not in (None, code):
            out.append(f"{record_file}: code digest {code} is not commit {made_by[:12]}'s code")
    return out
