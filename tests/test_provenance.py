"""Every result knows the code that made it: the library's digest keys the runner's stages and
every cached artifact, and every table and figure is entered in ``provenance.json``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from compactnlu import cachekeys, provenance
from compactnlu.artifacts import write_table
from compactnlu.config import load_profile
from compactnlu.plots import save
from test_reproduce import MAKES_MODEL, isolated_folders, statuses, write_notebook  # noqa: F401 (fixture)


def test_the_code_digest_covers_every_source_file_and_changes_with_any():
    sources = {p.relative_to(provenance.PACKAGE).as_posix(): p.read_bytes() for p in provenance.PACKAGE.rglob("*.py")}
    assert "quant/registry.py" in sources and provenance.code_digest() == provenance.digest_of(sources)
    edited = {**sources, "model.py": sources["model.py"] + b"\n# a comment\n"}
    assert provenance.digest_of(edited) != provenance.digest_of(sources)
    assert provenance.digest_of(dict(reversed(list(sources.items())))) == provenance.digest_of(sources)


def test_a_change_of_the_library_changes_every_artifact_key(monkeypatch):
    profile = load_profile("smoke")
    before = {a: cachekeys.artifact_key(profile, a) for a in cachekeys.ARTIFACTS}
    monkeypatch.setattr(provenance, "code_digest", lambda: "another-version")
    after = {a: cachekeys.artifact_key(profile, a) for a in cachekeys.ARTIFACTS}
    assert all(before[a] != after[a] for a in before)


def test_a_change_of_the_library_runs_a_finished_stage_again(tmp_path, monkeypatch):
    from compactnlu.reproduce import run

    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    out = tmp_path / "runs"
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["cached"]
    monkeypatch.setattr(provenance, "code_digest", lambda: "another-version")
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A profile whose figures go to tmp_path/figures, as notebook.start would set it."""
    profile = load_profile("smoke")
    figures = tmp_path / "figures"
    monkeypatch.setattr(provenance, "_run", {})
    provenance.set_run(profile)
    provenance._run["figures"] = figures.resolve()
    return figures


def write_results(figures):
    import matplotlib.pyplot as plt

    write_table(pd.DataFrame({"a": [1.0]}), figures / "tables" / "one.csv")
    fig, _ = plt.subplots()
    save(fig, figures, "plot")
    plt.close(fig)


def test_tables_and_figures_are_entered_with_commit_code_profile_and_cpu(run_folder):
    write_results(run_folder)
    recorded = json.loads((run_folder / provenance.FILE).read_text())
    assert set(recorded) == {"tables/one.csv", "plot.png"}
    for entry in recorded.values():
        assert entry["code"] == provenance.code_digest() and entry["profile"] == "smoke"
        assert entry["commit"] == provenance.commit() and entry["cpu"] and "isa" in entry


def test_outside_a_run_nothing_is_entered(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_run", {})
    write_table(pd.DataFrame({"a": [1.0]}), tmp_path / "tables" / "one.csv")
    assert not (tmp_path / provenance.FILE).exists()


def test_problems_name_results_that_are_not_from_one_commits_code(run_folder, monkeypatch):
    head = provenance._git("rev-parse", "HEAD")
    if head is None:
        pytest.skip("not a git checkout")
    clean = {"commit": head, "code": provenance.commit_digest(head), "profile": "smoke"}
    monkeypatch.setattr(provenance, "entry", lambda: dict(clean))
    write_results(run_folder)
    assert provenance.problems(run_folder) == []

    (run_folder / "tables" / "two.csv").write_text("a\n1\n")  # written outside the run
    assert provenance.problems(run_folder) == [f"tables/two.csv has no entry in {run_folder / provenance.FILE}"]
    (run_folder / "tables" / "two.csv").unlink()

    monkeypatch.setattr(provenance, "entry", lambda: {**clean, "code": "0" * 16})
    write_table(pd.DataFrame({"a": [2.0]}), run_folder / "tables" / "one.csv")  # rewritten by other code
    found = provenance.problems(run_folder)
    assert any("2 different commits or code versions" in p for p in found)
    assert any(f"is not commit {head[:12]}'s code" in p for p in found)

    monkeypatch.setattr(provenance, "entry", lambda: {**clean, "commit": head + "+dirty"})
    write_results(run_folder)
    assert any("uncommitted code" in p for p in provenance.problems(run_folder))


def test_a_stage_writing_tables_is_cached_on_the_next_run(tmp_path):
    """provenance.json changes with every table any stage (or the runner) writes: it is a record,
    not a stage's output, so it sends no stage back to run."""
    from compactnlu.reproduce import run

    figures = load_profile("smoke").figures_dir  # under tmp_path (isolated_folders); the kernel is told
    nb = write_notebook(tmp_path / "01_table.ipynb",
                        "import pathlib\nimport pandas as pd\nfrom compactnlu import provenance\n"
                        "from compactnlu.artifacts import write_table\nfrom compactnlu.config import load_profile\n"
                        f"figures = pathlib.Path({str(figures)!r})\n"
                        "provenance.set_run(load_profile(profile))\nprovenance._run['figures'] = figures\n"
                        "write_table(pd.DataFrame({'a': [1]}), figures / 'tables' / 'one.csv')")
    assert statuses(run("smoke", notebooks=[nb])) == ["ran"]
    assert "tables/one.csv" in json.loads((figures / provenance.FILE).read_text())
    assert statuses(run("smoke", notebooks=[nb])) == ["cached"]
