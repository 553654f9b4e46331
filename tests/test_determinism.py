"""Same seed, same numbers: fresh processes give byte-identical tokenizers, weights and tables.

Every run here is a separate Python process, with a different PYTHONHASHSEED: the
nondeterminism this guards against (``tokenizers``' UnigramTrainer, since replaced by
SentencePiece) came from hash maps seeded anew in each process, which one process
training twice would never see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compactnlu.config import ROOT

# A generous guard against a hung child, not a timing check.
CHILD_TIMEOUT_S = 1800


def run_python(args: list, hash_seed: int, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run the venv's python with ``args`` in a fresh process; fail with its stderr if it fails."""
    child_env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), **(env or {})}
    result = subprocess.run([sys.executable, *map(str, args)], env=child_env, cwd=cwd,
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, f"{args[:2]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def assert_same_files(first: Path, second: Path, pattern: str = "*", skip: tuple[str, ...] = ()) -> list[str]:
    """Assert both folders hold the same files matching ``pattern``, byte for byte; return their names."""
    def listing(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob(pattern) if p.is_file() and p.name not in skip)

    names = listing(first)
    assert names, f"no {pattern} files under {first}"
    assert names == listing(second)
    differing = [n for n in names if (first / n).read_bytes() != (second / n).read_bytes()]
    assert not differing, f"files differ between two runs: {differing}"
    return names


# ---------------------------------------------------------------- the tokenizer

TRAIN_TOKENIZER = """
import sys
from pathlib import Path
from compactnlu.features import train_tokenizer
texts = Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()
train_tokenizer(texts, int(sys.argv[2])).save_pretrained(sys.argv[3])
"""


def test_tokenizer_trained_in_two_processes_is_byte_identical(records, tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(records["utt"]) + "\n", encoding="utf-8")
    for hash_seed, run in enumerate(("first", "second")):
        run_python(["-c", TRAIN_TOKENIZER, corpus, 1500, tmp_path / run], hash_seed)
    names = assert_same_files(tmp_path / "first", tmp_path / "second")
    assert "tokenizer.json" in names


# ---------------------------------------------------------------- data, training and tables

SMOKE_STUDY = """
import sys
from pathlib import Path
import torch
from compactnlu.artifacts import write_table
from compactnlu.config import load_profile
from compactnlu.evaluation import evaluate_variant
from compactnlu.features import build_study_data
from compactnlu.train import train_model

torch.set_num_threads(1)
out = Path(sys.argv[1])
profile = load_profile("smoke", {"epochs": 1, "mlm_epochs": 0})
data = build_study_data(profile)
trained = train_model(profile, data, "baseline", disable_tqdm=True)
evaluation = evaluate_variant(trained.model, data, profile, "baseline")
write_table(evaluation.composed, out / "tables" / "baseline_metrics.csv")
write_table(evaluation.single_rows(), out / "tables" / "massive_single_test.csv")
for weights in trained.path.glob("*.safetensors"):
    (out / "weights").mkdir(exist_ok=True)
    (out / "weights" / weights.name).write_bytes(weights.read_bytes())
"""


def test_smoke_data_and_training_from_empty_artifacts_are_byte_identical(tmp_path):
    # Library level, short: the cheap stand-in for the notebook run below.
    for hash_seed, run in enumerate(("first", "second")):
        artifacts = tmp_path / run / "artifacts"
        run_python(["-c", SMOKE_STUDY, tmp_path / run], hash_seed, env={"COMPACTNLU_ARTIFACTS": str(artifacts)})
    first, second = tmp_path / "first", tmp_path / "second"
    assert_same_files(first / "artifacts" / "tokenizer", second / "artifacts" / "tokenizer")
    assert_same_files(first / "weights", second / "weights")
    names = assert_same_files(first / "tables", second / "tables", pattern="*.csv")
    assert names == ["baseline_metrics.csv", "massive_single_test.csv"]


@pytest.mark.slow
def test_smoke_notebooks_01_02_from_empty_artifacts_give_identical_tables(tmp_path):
    # The runner writes under config.ROOT (runs/, figures/), so each run gets its own copy of
    # the library and notebooks, imported first through PYTHONPATH: the repo's runs/ stays untouched.
    tables = []
    for hash_seed, run in enumerate(("first", "second")):
        root = tmp_path / run
        skip = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
        shutil.copytree(ROOT / "lib" / "compactnlu", root / "lib" / "compactnlu", ignore=skip)
        shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=skip)
        python_path = os.pathsep.join(filter(None, [str(root / "lib"), os.environ.get("PYTHONPATH")]))
        run_python(["-m", "compactnlu.reproduce", "--profile", "smoke", "--only", "01", "02"], hash_seed,
                   env={"PYTHONPATH": python_path, "COMPACTNLU_ARTIFACTS": str(root / "artifacts")}, cwd=root)
        tables.append(root / "runs" / "smoke" / "figures" / "tables")
    # notebook_times.csv holds the run times, the one table that should differ.
    names = assert_same_files(*tables, pattern="*.csv", skip=("notebook_times.csv",))
    assert {"data_counts.csv", "baseline_metrics.csv", "massive_single_test.csv"} <= set(names)
