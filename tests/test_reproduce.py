"""The papermill runner: order, resume, and a failure that names notebook and cell."""

import json

import nbformat
import pytest

from compactnlu import config, reproduce
from compactnlu.config import load_profile
from compactnlu.reproduce import StageFailed, main, run


@pytest.fixture(autouse=True)
def isolated_folders(tmp_path, monkeypatch):
    """Artifacts, figures and runs under tmp_path, so a stage's outputs are only what the test's
    notebooks write, and nothing another process writes into the project's folders."""
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "artifacts"))  # the kernels inherit it
    monkeypatch.setattr(config, "ROOT", tmp_path)  # the smoke profile's figures go under ROOT/runs
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)


def write_notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "default"\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    first = write_notebook(folder / "01_first.ipynb", "open('ran-01', 'a').write('x')")
    second = write_notebook(folder / "02_second.ipynb", "x = 1", "raise ValueError('broken on purpose')")
    return first, second


def test_failure_names_notebook_and_cell_then_resume_skips_finished(notebooks, tmp_path):
    first, second = notebooks
    out = tmp_path / "runs"
    with pytest.raises(StageFailed) as failure:
        run("smoke", notebooks=[first, second], out_dir=out)
    message = str(failure.value)
    assert "02_second.ipynb" in message and "cell 3" in message and "broken on purpose" in message
    assert (out / "01_first.ipynb").is_file()
    # the traceback is kept beside, never under the name of a finished copy
    assert str(out / "02_second.failed.ipynb") in message and (out / "02_second.failed.ipynb").is_file()
    assert not (out / "02_second.ipynb").exists() and not list(out.glob("*.running.ipynb"))

    write_notebook(second, "x = 1")  # fixed
    table = run("smoke", notebooks=[first, second], out_dir=out)
    assert table.set_index("notebook")["status"].to_dict() == {"01_first.ipynb": "cached",
                                                                "02_second.ipynb": "ran"}
    assert (first.parent / "ran-01").read_text() == "x"  # notebook 01 executed once, not twice
    assert (out / "notebook_times.csv").is_file()


def test_parameters_reach_the_notebook_and_a_change_reruns(notebooks, tmp_path):
    first, _ = notebooks
    out = tmp_path / "runs"
    run("smoke", notebooks=[first], out_dir=out)
    executed = nbformat.read(out / "01_first.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert 'profile = "smoke"' in injected[0].source
    table = run("smoke", {"epochs": 2}, notebooks=[first], out_dir=out)
    assert table.status.tolist() == ["ran"]  # other parameters: not the finished stage


# ---------------------------------------------------------------- a stage is done only if its work is still there

# A stage that leaves a model in the artifacts folder (COMPACTNLU_ARTIFACTS, inherited by the kernel).
MAKES_MODEL = ("import os, pathlib\n"
               "model = pathlib.Path(os.environ['COMPACTNLU_ARTIFACTS']) / 'models' / 'model.bin'\n"
               "model.parent.mkdir(parents=True, exist_ok=True)\n"
               "model.write_text('weights')")


def statuses(table):
    return table["status"].tolist()


def test_a_stage_whose_outputs_are_cut_or_gone_runs_again(tmp_path):
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    out = tmp_path / "runs"
    run("smoke", notebooks=[nb], out_dir=out)
    model = tmp_path / "artifacts" / "models" / "model.bin"
    model.write_text("wei")  # cut short
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    model.unlink()
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    assert model.read_text() == "weights"
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["cached"]


def test_a_figure_gone_from_a_figures_folder_inside_the_runs_folder_runs_the_stage_again(tmp_path):
    figure = load_profile("smoke").figures_dir / "plot.png"  # runs/smoke/figures, beside runs/smoke/state.json
    nb = write_notebook(tmp_path / "01_plot.ipynb", f"import pathlib\nfigure = pathlib.Path({str(figure)!r})\n"
                                                    "figure.parent.mkdir(parents=True, exist_ok=True)\n"
                                                    "figure.write_bytes(b'png')")
    assert statuses(run("smoke", notebooks=[nb])) == ["ran"]
    assert statuses(run("smoke", notebooks=[nb])) == ["cached"]
    figure.unlink()
    assert statuses(run("smoke", notebooks=[nb])) == ["ran"]
    assert figure.is_file()


def test_a_new_empty_artifacts_folder_runs_every_stage_again(tmp_path, monkeypatch):
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    out = tmp_path / "runs"
    run("smoke", notebooks=[nb], out_dir=out)
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path / "fresh"))
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    assert (tmp_path / "fresh" / "models" / "model.bin").is_file()


def test_a_damaged_executed_copy_runs_again(tmp_path):
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    out = tmp_path / "runs"
    executed = out / nb.name
    run("smoke", notebooks=[nb], out_dir=out)
    executed.write_bytes(executed.read_bytes()[:100])  # cut mid-file
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    executed.write_text("")
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    copy = nbformat.read(executed, as_version=4)
    copy.cells[-1].outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[]))
    nbformat.write(copy, executed)
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["cached"]


def test_an_interrupted_forced_run_leaves_the_stage_to_run_again(tmp_path):
    stop = tmp_path / "stop"
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL,
                        f"import pathlib\nif pathlib.Path({str(stop)!r}).exists(): raise KeyboardInterrupt")
    out = tmp_path / "runs"
    run("smoke", notebooks=[nb], out_dir=out)
    finished_copy = (out / nb.name).read_bytes()
    stop.touch()
    with pytest.raises(StageFailed, match="KeyboardInterrupt"):
        run("smoke", notebooks=[nb], out_dir=out, force=True)
    assert (out / nb.name).read_bytes() == finished_copy  # no half-written copy under the final name
    assert not list(out.glob("*.running.ipynb"))
    stop.unlink()
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]


def test_a_failed_run_with_overrides_leaves_the_stage_to_run_again(tmp_path):
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL, "assert not overrides, 'fails with overrides'")
    out = tmp_path / "runs"
    run("smoke", notebooks=[nb], out_dir=out)
    with pytest.raises(StageFailed, match="fails with overrides"):
        run("smoke", {"epochs": 2}, notebooks=[nb], out_dir=out)
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]


def test_a_table_a_later_stage_adds_rows_to_keeps_the_earlier_stage_finished(tmp_path):
    adds_a_row = ("import os, pathlib\n"
                  "table = pathlib.Path(os.environ['COMPACTNLU_ARTIFACTS']) / 'results.csv'\n"
                  "table.parent.mkdir(exist_ok=True)\n"
                  "with open(table, 'a') as f:\n    f.write(NAME + '\\n')")
    first = write_notebook(tmp_path / "01_a.ipynb", "NAME = 'a'", adds_a_row)
    second = write_notebook(tmp_path / "02_b.ipynb", "NAME = 'b'", adds_a_row)
    out = tmp_path / "runs"
    assert statuses(run("smoke", notebooks=[first, second], out_dir=out)) == ["ran", "ran"]
    assert statuses(run("smoke", notebooks=[first, second], out_dir=out)) == ["cached", "cached"]
    assert (tmp_path / "artifacts" / "results.csv").read_text() == "a\nb\n"


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_an_invalid_state_file_is_named_and_counts_as_nothing_finished(tmp_path, capsys, text):
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    out = tmp_path / "runs"
    out.mkdir()
    (out / "state.json").write_text(text)
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    assert f"{out / 'state.json'}" in capsys.readouterr().err
    assert nb.name in json.loads((out / "state.json").read_text())  # written afresh


def test_only_with_a_prefix_that_matches_no_notebook_is_refused(notebooks, tmp_path):
    with pytest.raises(ValueError, match="--only 99") as info:
        run("smoke", only=["01", "99"], notebooks=list(notebooks), out_dir=tmp_path / "runs")
    assert "01_first.ipynb, 02_second.ipynb" in str(info.value)
    assert not (tmp_path / "runs").exists() and not (notebooks[0].parent / "ran-01").exists()


# ---------------------------------------------------------------- the command line

def refuse_to_execute(*args, **kwargs):
    raise AssertionError("a notebook was executed")


@pytest.mark.parametrize("args, expected", [
    (["--set", "epochs=abc"], "quote strings as JSON, e.g. --set 'pooling=\"mean\"'"),
    (["--set", "pooling=mean"], "'mean' is not JSON"),
    (["--set", "epochs"], "FIELD=JSON"),
    (["--set", 'epochs="abc"'], "epochs='abc' has type str; expected float"),
    (["--set", 'locales="hi-IN"'], "not a string"),
    (["--set", "batch_size=0"], "batch_size=0 is out of range; allowed: >= 1"),
    (["--set", "epochs=-1"], "epochs=-1 is out of range; allowed: > 0"),
    (["--set", "loss_weights=[1,2]"], "loss_weights=(1, 2) has type tuple; expected tuple[float, float, float]"),
    (["--only", "99"], "--only 99: no notebook's name starts with it; notebooks: 01_data.ipynb"),
])
def test_bad_arguments_are_refused_before_anything_runs(monkeypatch, capsys, args, expected):
    monkeypatch.setattr(reproduce.pm, "execute_notebook", refuse_to_execute)
    assert main(["--profile", "smoke", *args]) == 2
    assert expected in capsys.readouterr().err


def test_the_readme_override_syntax_still_works(monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "run", lambda profile, overrides, **kw: calls.append((profile, overrides, kw))
                        or reproduce.pd.DataFrame())
    # the shell turns --set pooling='"mean"' into pooling="mean"
    assert main(["--profile", "default", "--set", "epochs=5", "--set", 'pooling="mean"',
                 "--set", "loss_weights=[10,3,1]", "--only", "01", "02"]) == 0
    assert calls == [("default", {"epochs": 5, "pooling": "mean", "loss_weights": [10, 3, 1]},
                      {"force": False, "only": ["01", "02"]})]


def test_a_same_size_edit_of_an_output_runs_the_stage_again(tmp_path):
    """The runner compares what a stage wrote by SHA-256, not by size."""
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    out = tmp_path / "runs"
    run("smoke", notebooks=[nb], out_dir=out)
    model = tmp_path / "artifacts" / "models" / "model.bin"
    model.write_text("WEIGHTS")  # same size, other bytes
    assert statuses(run("smoke", notebooks=[nb], out_dir=out)) == ["ran"]
    assert model.read_text() == "weights"


def test_a_second_runner_on_the_same_artifacts_folder_is_refused_naming_the_first(tmp_path):
    import fcntl
    import os

    artifacts = tmp_path / "artifacts"
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    with reproduce.runner_lock(artifacts.resolve()):
        with pytest.raises(reproduce.RunnerBusy, match=rf"another runner \(process {os.getpid()}\) is working on"):
            run("smoke", notebooks=[nb], out_dir=tmp_path / "runs")
        assert main(["--profile", "smoke", "--only", "99"]) == 2  # usage errors still come first
    # released: the lock file is empty and can be taken again
    lock = artifacts / reproduce.LOCK_FILE
    assert lock.read_text() == ""
    with open(lock) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)


def test_a_stale_lock_from_a_killed_runner_is_cleared(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    artifacts = (tmp_path / "artifacts").resolve()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from compactnlu import reproduce\n"
                               "with reproduce.runner_lock(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(60)", str(artifacts)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    nb = write_notebook(tmp_path / "01_model.ipynb", MAKES_MODEL)
    with pytest.raises(reproduce.RunnerBusy, match=rf"process {holder.pid}\)"):
        run("smoke", notebooks=[nb], out_dir=tmp_path / "runs")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (artifacts / reproduce.LOCK_FILE).read_text() == str(holder.pid)  # left behind by the kill
    start = time.monotonic()
    assert statuses(run("smoke", notebooks=[nb], out_dir=tmp_path / "runs")) == ["ran"]
    assert time.monotonic() - start < 60  # taken over, not waited on
    assert f"cleared a stale lock on {artifacts} left by process {holder.pid}" in capsys.readouterr().err
