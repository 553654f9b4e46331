"""Run every numbered notebook in order with papermill, for one profile.

    python -m compactnlu.reproduce --profile default

Executed copies go to ``runs/<profile>/``. A notebook that finished with the same source
and parameters is skipped on the next call, so an interrupted run resumes where it
stopped; ``--force`` runs everything again. The first failure stops the run and names
the notebook and the cell.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import papermill as pm
from papermill.exceptions import PapermillExecutionError

from .artifacts import read_json, write_json, write_table
from .config import ROOT, load_profile

NOTEBOOK_DIR = ROOT / "notebooks"


def numbered_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def _stage_hash(notebook: Path, parameters: dict) -> str:
    blob = notebook.read_bytes() + json.dumps(parameters, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class StageFailed(RuntimeError):
    pass


def run(profile: str = "default", overrides: dict | None = None, *, force: bool = False,
        only: list[str] | None = None, notebooks: list[Path] | None = None,
        out_dir: Path | None = None) -> pd.DataFrame:
    """Execute the notebooks; returns a table of notebook, status and seconds."""
    load_profile(profile, overrides)  # fail early on a bad profile or override
    parameters = {"profile": profile, "overrides": dict(overrides or {})}
    out_dir = Path(out_dir or ROOT / "runs" / profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "state.json"
    state = read_json(state_path) if state_path.exists() else {}
    # The study's own run times go beside its tables; a custom notebook list keeps them in out_dir.
    times_path = (load_profile(profile, overrides).tables_dir if notebooks is None else out_dir) / "notebook_times.csv"
    rows = []
    for notebook in notebooks or numbered_notebooks():
        if only and not any(notebook.name.startswith(o) for o in only):
            continue
        executed = out_dir / notebook.name
        digest = _stage_hash(notebook, parameters)
        done = state.get(notebook.name, {})
        if not force and done.get("hash") == digest and executed.exists():
            print(f"[skip] {notebook.name}: finished before with these parameters ({done['seconds']:.0f} s)")
            rows.append({"notebook": notebook.name, "status": "cached", "seconds": done["seconds"]})
            continue
        print(f"[run ] {notebook.name} (profile {profile}) -> {executed}", flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(notebook), str(executed), parameters=parameters,
                                cwd=str(notebook.parent), progress_bar=sys.stderr.isatty(),
                                kernel_name="python3")
        except PapermillExecutionError as err:
            first_line = next((ln for ln in err.source.splitlines() if ln.strip()), "")
            raise StageFailed(
                f"{notebook.name} failed in cell {err.cell_index} (execution count {err.exec_count}, "
                f"starting {first_line!r}): {err.ename}: {err.evalue}\n"
                f"executed copy with the traceback: {executed}") from None
        seconds = time.perf_counter() - start
        state[notebook.name] = {"hash": digest, "seconds": seconds,
                                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(state_path, state)
        _record_times(state, times_path)  # after each stage, so a run that stops later keeps them
        print(f"[done] {notebook.name} in {seconds:.0f} s", flush=True)
        rows.append({"notebook": notebook.name, "status": "ran", "seconds": seconds})
    return pd.DataFrame(rows)


def _record_times(state: dict, path: Path) -> None:
    """Each notebook's last measured run time, in minutes."""
    times = pd.DataFrame([{"notebook": name, "minutes": round(s["seconds"] / 60, 2), "finished": s["finished"]}
                          for name, s in sorted(state.items())])
    if not times.empty:
        write_table(times, path, float_format="%.2f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", help="smoke, default or paper")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a profile field, e.g. --set epochs=1 (value parsed as JSON)")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("--force", action="store_true", help="run finished notebooks again")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    try:
        table = run(args.profile, overrides, force=args.force, only=args.only)
    except StageFailed as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 1
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
