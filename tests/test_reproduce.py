"""The papermill runner: order, resume, and a failure that names notebook and cell."""

import nbformat
import pytest

from compactnlu.reproduce import StageFailed, run


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
