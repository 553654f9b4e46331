"""Run every numbered notebook in order with papermill, for one profile.

    python -m compactnlu.reproduce --profile default

Executed copies go to ``runs/<profile>/``. A notebook counts as finished, and is skipped on
the next call, only if it ran with the same source, parameters and artifacts folder, its
executed copy reads back without an error in it, and every file it wrote under the artifacts
and figures folders is still there with the SHA-256 it was left with (a same-size edit counts);
so an interrupted run resumes where it stopped. ``--force`` runs everything again. The first
failure stops the run, names the notebook and the cell, and keeps the executed copy with the
traceback as ``<notebook>.failed.ipynb``.

One runner works on an artifacts folder at a time: a second one started on the same folder
refuses, naming the first one's process id. The lock is an ``flock`` on ``.runner.lock`` in
that folder, which the system releases when its holder dies, so a lock left by a killed run
is taken over (and said so), never waited on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
from papermill.exceptions import PapermillExecutionError

from . import provenance
from .artifacts import sha256_file, write_json, write_table
from .config import ROOT, load_profile, parse_override

NOTEBOOK_DIR = ROOT / "notebooks"


def numbered_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def _stage_hash(notebook: Path, parameters: dict) -> str:
    """What a finished stage is keyed by: the notebook, its parameters and the library's code."""
    blob = notebook.read_bytes() + json.dumps(parameters, sort_keys=True, default=str).encode() + \
        provenance.code_digest().encode()
    return hashlib.sha256(blob).hexdigest()


class StageFailed(RuntimeError):
    pass


class UsageError(ValueError):
    """A command-line argument the runner cannot use (a --set that is not JSON, an --only that matches nothing)."""


def selected_notebooks(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """The notebooks whose names start with one of ``only`` (all without it), in order."""
    if not only:
        return list(notebooks)
    unmatched = [prefix for prefix in only if not any(nb.name.startswith(prefix) for nb in notebooks)]
    if unmatched:
        raise UsageError(f"--only {' '.join(unmatched)}: no notebook's name starts with "
                         f"{'it' if len(unmatched) == 1 else 'them'}; notebooks: "
                         f"{', '.join(nb.name for nb in notebooks)}")
    return [nb for nb in notebooks if any(nb.name.startswith(prefix) for prefix in only)]


def _read_state(path: Path) -> dict:
    """Finished stages by notebook name; an unreadable file is reported and counts as none finished."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        print(f"reproduce: {path} is not valid JSON ({err}); treating every notebook as not finished",
              file=sys.stderr)
        return {}
    if not isinstance(state, dict):
        print(f"reproduce: {path} holds {type(state).__name__}, not an object; treating every notebook "
              f"as not finished", file=sys.stderr)
        return {}
    return {name: entry for name, entry in state.items() if isinstance(entry, dict)}


def _listing(folders: list[Path], runner_dir: Path, runner_files: set[Path]) -> dict[str, list[int]]:
    """path -> [size, mtime_ns] of every file under ``folders``, except the runner's own: those
    directly in ``runner_dir`` (state, executed copies) and ``runner_files``. A profile's figures
    may lie in a subfolder of ``runner_dir`` (runs/smoke/figures), so that is not skipped."""
    files = {}
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                path = Path(parent, name)
                if path.parent == runner_dir or path in runner_files:
                    continue
                try:
                    st = path.stat()
                except OSError:  # removed while we looked
                    continue
                files[str(path)] = [st.st_size, st.st_mtime_ns]
    return files


def _executed_problem(executed: Path) -> str | None:
    """Why the executed copy does not show a finished run, or None."""
    if not executed.is_file():
        return f"its executed copy {executed} is missing"
    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception as err:  # a cut or emptied file fails in several ways inside nbformat
        return f"its executed copy {executed} does not read back ({type(err).__name__})"
    if any(out.get("output_type") == "error" for cell in nb.cells for out in cell.get("outputs", [])):
        return f"its executed copy {executed} holds an error"
    return None


def _why_rerun(entry: dict | None, digest: str, artifacts: str, executed: Path) -> str | None:
    """Why a stage cannot count as finished, or None when it can."""
    if not entry or entry.get("hash") != digest:
        return "not finished with this notebook, these parameters and this library code"
    if entry.get("artifacts_dir") != artifacts:
        return f"finished with another artifacts folder ({entry.get('artifacts_dir')})"
    problem = _executed_problem(executed)
    if problem:
        return problem
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        return "no record of the files it wrote"
    changed = [path for path, recorded in outputs.items() if not _unchanged(Path(path), recorded)]
    if changed:
        return f"{len(changed)} of the {len(outputs)} files it wrote are missing or changed, e.g. {changed[0]}"
    return None


def _unchanged(path: Path, recorded) -> bool:
    """Whether ``path`` still holds what was recorded (``[size, mtime_ns, SHA-256]``). The SHA-256
    is compared only where size or time moved, so a rerun does not hash gigabytes of models
    that nothing touched; an edit, even one that keeps the size, moves the time."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not isinstance(recorded, list) or len(recorded) != 3:
        return False
    return [st.st_size, st.st_mtime_ns] == recorded[:2] or sha256_file(path) == recorded[2]


def _fingerprint(path: Path, stat: list[int]) -> list | None:
    try:
        return [*stat, sha256_file(path)]
    except OSError:
        return None


def _record_outputs(state: dict, name: str, before: dict, after: dict) -> dict[str, list]:
    """The files stage ``name`` created or changed (path -> [size, mtime_ns, SHA-256]). Files an
    earlier stage wrote and this one changed or removed are brought up to date in that stage's
    record, so a table several stages add rows to does not send the earlier ones back to run."""
    changed = {path: _fingerprint(Path(path), stat) for path, stat in after.items() if before.get(path) != stat}
    for other, entry in state.items():
        outputs = entry.get("outputs")
        if other == name or not isinstance(outputs, dict):
            continue
        for path in list(outputs):
            if path in before and path not in after:
                del outputs[path]
            elif path in changed:
                outputs[path] = changed[path]
    return changed


def _execute(notebook: Path, executed: Path, parameters: dict) -> None:
    """Run ``notebook`` into a temporary copy that becomes ``executed`` only when every cell succeeded."""
    running = executed.with_name(f"{executed.stem}.running.ipynb")
    failed = executed.with_name(f"{executed.stem}.failed.ipynb")
    failed.unlink(missing_ok=True)
    try:
        pm.execute_notebook(str(notebook), str(running), parameters=parameters,
                            cwd=str(notebook.parent), progress_bar=sys.stderr.isatty(),
                            kernel_name="python3")
        os.replace(running, executed)
    except PapermillExecutionError as err:
        os.replace(running, failed)
        first_line = next((ln for ln in err.source.splitlines() if ln.strip()), "")
        raise StageFailed(
            f"{notebook.name} failed in cell {err.cell_index} (execution count {err.exec_count}, "
            f"starting {first_line!r}): {err.ename}: {err.evalue}\n"
            f"executed copy with the traceback: {failed}") from None
    finally:
        running.unlink(missing_ok=True)  # interrupted: no half-written copy is left behind


class RunnerBusy(RuntimeError):
    """Another runner holds the artifacts folder."""


LOCK_FILE = ".runner.lock"


@contextlib.contextmanager
def runner_lock(artifacts_dir: Path):
    """Hold ``artifacts_dir``'s runner lock for the block, or raise ``RunnerBusy`` naming the holder.

    ``flock`` is released by the system when its holder exits, however it exits (``kill -9``
    included), so a lock file left behind with no holder is stale and is taken over."""
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    path = artifacts_dir / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunnerBusy(f"another runner (process {holder}) is working on {artifacts_dir}; wait for it "
                             f"to finish, or stop it, then run again (two runners would each run every "
                             f"stage)") from None
        handle.seek(0)
        stale = handle.read().strip()
        if stale:
            print(f"reproduce: cleared a stale lock on {artifacts_dir} left by process {stale}, which is no "
                  f"longer running", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # empty: released cleanly, not stale
            handle.flush()
    finally:
        handle.close()  # closing releases the flock


def run(profile: str = "default", overrides: dict | None = None, *, force: bool = False,
        only: list[str] | None = None, notebooks: list[Path] | None = None,
        out_dir: Path | None = None) -> pd.DataFrame:
    """Execute the notebooks, holding the artifacts folder's runner lock; returns a table of
    notebook, status and seconds."""
    config = load_profile(profile, overrides)  # fail early on a bad profile or override
    chosen = selected_notebooks(notebooks or numbered_notebooks(), only)
    provenance.set_run(config)
    out = Path(out_dir or ROOT / "runs" / profile)
    # one runner per artifacts folder (the models) and per runs folder (the state, the executed copies)
    with runner_lock(config.artifacts_dir.resolve()), runner_lock(out.resolve()):
        return _run(config, profile, overrides, chosen, force=force, custom=notebooks is not None, out_dir=out_dir)


def _run(config, profile: str, overrides: dict | None, chosen: list[Path], *, force: bool, custom: bool,
         out_dir: Path | None) -> pd.DataFrame:
    parameters = {"profile": profile, "overrides": dict(overrides or {})}
    out_dir = Path(out_dir or ROOT / "runs" / profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "state.json"
    state = _read_state(state_path)
    # The study's own run times go beside its tables; a custom notebook list keeps them in out_dir.
    times_path = (out_dir if custom else config.tables_dir) / "notebook_times.csv"
    # What a stage made lives in these folders; the runner's own files there are not a stage's.
    watched = [config.artifacts_dir.resolve(), config.figures_dir.resolve()]
    # provenance.json is rewritten by every stage and by the runner's own times table: a record, not an output
    runner_files = {times_path.resolve(), times_path.with_suffix(".md").resolve(),
                    (config.figures_dir / provenance.FILE).resolve(),
                    (config.artifacts_dir / LOCK_FILE).resolve()}
    artifacts = str(watched[0])
    rows = []
    for notebook in chosen:
        executed = out_dir / notebook.name
        digest = _stage_hash(notebook, parameters)
        done = state.get(notebook.name)
        reason = "--force" if force else _why_rerun(done, digest, artifacts, executed)
        if reason is None:
            print(f"[skip] {notebook.name}: finished before with these parameters ({done['seconds']:.0f} s)")
            rows.append({"notebook": notebook.name, "status": "cached", "seconds": done["seconds"]})
            continue
        print(f"[run ] {notebook.name} (profile {profile}; {reason}) -> {executed}", flush=True)
        # From here until it finishes, the stage is not done: a failure or a kill leaves it to run again.
        state.pop(notebook.name, None)
        write_json(state_path, state)
        before = _listing(watched, out_dir.resolve(), runner_files)
        start = time.perf_counter()
        _execute(notebook, executed, parameters)
        seconds = time.perf_counter() - start
        after = _listing(watched, out_dir.resolve(), runner_files)
        outputs = _record_outputs(state, notebook.name, before, after)
        state[notebook.name] = {"hash": digest, "artifacts_dir": artifacts, "outputs": outputs, "seconds": seconds,
                                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(state_path, state)
        _record_times(state, times_path)  # after each stage, so a run that stops later keeps them
        print(f"[done] {notebook.name} in {seconds:.0f} s", flush=True)
        rows.append({"notebook": notebook.name, "status": "ran", "seconds": seconds})
    return pd.DataFrame(rows)


def _record_times(state: dict, path: Path) -> None:
    """Each notebook's last measured run time, in minutes."""
    times = pd.DataFrame([{"notebook": name, "minutes": round(s["seconds"] / 60, 2), "finished": s["finished"]}
                          for name, s in sorted(state.items()) if "seconds" in s and "finished" in s])
    if not times.empty:
        write_table(times, path, float_format="%.2f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", help="smoke, default or paper")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a profile field, e.g. --set epochs=1 or --set 'pooling=\"mean\"' "
                             "(the value is JSON: strings in double quotes)")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("--force", action="store_true", help="run finished notebooks again")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(item) for item in args.set)
        table = run(args.profile, overrides, force=args.force, only=args.only)
    except (StageFailed, RunnerBusy) as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # a bad --set, --only or profile, refused before anything ran
        print(f"reproduce: {err}", file=sys.stderr)
        return 2
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
