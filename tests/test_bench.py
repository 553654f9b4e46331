"""``compactnlu.bench``: what the harness measures and how (never how fast anything is)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

from compactnlu import bench, classic
from compactnlu.interface import NLUOutput, infer
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.paper import TABLE2, relative_to_baseline

ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)


class Counting(torch.nn.Module):
    """A stand-in model that records the order it was called in."""

    tasks = ("id",)

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, input_ids, attention_mask):
        self.log.append(self.name)
        return NLUOutput(intent_logits=torch.zeros(len(input_ids), 3))


def test_artifact_size_counts_deployed_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model.crf.safetensors").write_bytes(b"x" * 200)
    (tmp_path / "config.json").write_bytes(b"x" * 30)
    (tmp_path / "training.json").write_bytes(b"x" * 5000)  # a log, not deployed
    assert bench.artifact_size_mb(tmp_path) == pytest.approx(1230 / 1e6)
    with pytest.raises(FileNotFoundError):
        bench.artifact_size_mb(tmp_path / "missing")


def test_artifact_size_of_the_classic_reference_is_its_own_count(tmp_path):
    """``DEPLOYED`` names the classic files rather than importing them: it must count what
    ``classic.size_bytes`` counts (both model files and the manifest), and nothing else."""
    for k, name in enumerate(classic.FILES + [classic.MANIFEST]):
        (tmp_path / name).write_bytes(b"x" * (100 + 10 * k))
    (tmp_path / "fit.log").write_bytes(b"x" * 5000)
    assert bench.artifact_size_mb(tmp_path) == pytest.approx(classic.size_bytes(tmp_path) / 1e6)


def test_the_bench_layer_imports_neither_the_study_nor_the_search():
    """Sizes, times and memory are measured without the study layer (``study``, ``pcptq``), and
    sizing the classic reference needs none of its libraries (``classic``, scikit-learn)."""
    code = ("import sys, compactnlu.bench; print(sorted({'compactnlu.study', 'compactnlu.pcptq', "
            "'compactnlu.classic', 'sklearn'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_timed_pass_is_the_scored_one():
    """``paper_scale`` calls ``bench.infer``: it is ``interface.infer``, not a copy of it."""
    assert bench.infer is infer


def test_passes_are_interleaved_in_seeded_orders():
    log: list = []
    models = {n: Counting(n, log) for n in "abc"}
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    passes = bench.time_passes(models, [batch], repeats=3, warmup=0)
    assert log == [name for _, order in bench.running_orders(list("abc"), 3) for name in order]
    assert len(passes) == 9 and (passes.seconds > 0).all()
    assert passes.groupby("variant").size().tolist() == [3, 3, 3]
    assert passes.groupby("repeat").variant.apply(sorted).map(tuple).nunique() == 1  # every variant once a repeat


def test_running_orders_are_reproducible_and_vary_who_runs_before_whom():
    names = ["baseline", "static", "dynamic", "onnx"]
    orders = [order for _, order in bench.running_orders(names, 20)]
    assert orders == [order for _, order in bench.running_orders(names, 20)]
    assert all(sorted(order) == sorted(names) for order in orders)
    before_baseline = {order[order.index("baseline") - 1] for order in orders if order[0] != "baseline"}
    assert before_baseline == {"static", "dynamic", "onnx"}  # a rotation would always give the same one


def test_ratios_within_repeats_pair_each_pass_with_the_reference_of_its_repeat():
    passes = pd.DataFrame({"variant": ["ref", "q"] * 3, "repeat": [0, 0, 1, 1, 2, 2],
                           "seconds": [1.0, 0.5, 4.0, 2.4, 2.0, 1.4]})  # repeat 1 slowed by load, both alike
    ratios = bench.ratios_within_repeats(passes, "ref")
    assert ratios.loc["q"].tolist() == pytest.approx([0.6, 0.5, 0.7])
    assert ratios.loc["ref"].tolist() == [1.0, 1.0, 1.0]


def test_summary_takes_medians_and_percentiles():
    passes = pd.DataFrame({"variant": ["a"] * 3 + ["b"] * 3, "repeat": [0, 1, 2] * 2,
                           "seconds": [1.0, 3.0, 2.0, 10.0, 30.0, 20.0]})
    latencies = pd.DataFrame({"variant": ["a"] * 100 + ["b"] * 100, "ms": list(range(100)) * 2})
    throughput = pd.DataFrame({"variant": ["a", "b"], "seconds": [2.0, 4.0]})
    out = bench.summarise(passes, latencies, throughput, n_throughput=64).set_index("variant")
    assert out.inference_s["a"] == 2.0 and out.inference_min_s["b"] == 10.0 and out.inference_max_s["b"] == 30.0
    assert out.latency_p50_ms["a"] == pytest.approx(49.5) and out.latency_p95_ms["a"] == pytest.approx(94.05)
    assert out.throughput.tolist() == [32.0, 16.0]


def test_infer_runs_a_real_model_with_viterbi():
    torch.manual_seed(0)
    model = MultiTaskNLU(NLUConfig(n_intents=4, n_domains=3, tags=("O", "B-a", "I-a"), encoder=dict(ENCODER))).eval()
    ids = torch.randint(3, 50, (2, 6))
    word_mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]]).bool()
    out, answer = infer(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "word_mask": word_mask})
    assert out.loss is None  # the benchmark passes no labels: no loss is computed in a timed pass
    assert [len(p) for p in answer.slots] == [3, 1]
    assert answer.intents.shape == (2, 4) and answer.domains.shape == (2, 3)
    assert answer.intents.any(1).all() and answer.domains.any(1).all()  # at least one label each, as scored


def test_without_matmuls_keeps_every_output_shape_and_no_linear_layer():
    torch.manual_seed(0)
    model = MultiTaskNLU(NLUConfig(n_intents=4, n_domains=3, tags=("O", "B-a", "I-a"), encoder=dict(ENCODER))).eval()
    floor = bench.without_matmuls(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in floor.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 9  # the original is untouched
    ids = torch.randint(3, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "word_mask": torch.ones_like(ids).bool()}
    (_, real), (_, free) = infer(model, batch), infer(floor, batch)
    assert free.intents.shape == real.intents.shape and free.domains.shape == real.domains.shape
    assert [len(p) for p in free.slots] == [len(p) for p in real.slots] == [6, 6]
    with torch.no_grad():
        assert not floor(input_ids=ids, attention_mask=torch.ones_like(ids)).slot_logits.any()


def test_relative_to_baseline_on_the_papers_table():
    rel = relative_to_baseline(TABLE2).set_index("variant")
    assert rel.size_vs_baseline["baseline"] == 1.0
    assert rel.size_vs_baseline["kd_pcptq"] == pytest.approx(428.25 / 1064.80)
    assert rel.time_vs_baseline["kd_pcptq"] == pytest.approx(76.34 / 232.24)
    assert rel.id_acc_diff["kd_pcptq"] == pytest.approx(0.9991 - 0.9481)


def test_environment_names_the_machine_and_versions():
    env = bench.environment()
    assert env["torch"].startswith("2.13") and env["cores"] >= 1 and env["torch_threads"] >= 1


def test_time_split_separates_forward_and_viterbi():
    torch.manual_seed(0)
    model = MultiTaskNLU(NLUConfig(n_intents=4, n_domains=3, tags=("O", "B-a", "I-a"), encoder=dict(ENCODER))).eval()
    ids = torch.randint(3, 50, (3, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "word_mask": torch.ones_like(ids).bool()}
    split = bench.time_split({"a": model, "b": model}, [batch, batch], repeats=3).set_index("variant")
    assert list(split.index) == ["a", "b"]
    assert (split.forward_s > 0).all() and (split.viterbi_s > 0).all()
    assert ((split.viterbi_share > 0) & (split.viterbi_share < 1)).all()


def test_kernels_used_names_how_each_kind_of_variant_runs(tmp_path):
    from compactnlu.quant import apply_policy, precision_groups, quantize_dynamic
    from compactnlu.quant.fast import to_fast

    torch.manual_seed(0)
    model = MultiTaskNLU(NLUConfig(n_intents=3, n_domains=2, tags=("O", "B-x", "I-x"), encoder=dict(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40))).eval()
    groups = precision_groups(model)
    paper_path = apply_policy(model, {g: 8 for g in groups}, groups)
    assert bench.kernels_used(model) == "float (torch)"
    assert bench.kernels_used(quantize_dynamic(model)).startswith("torch.ao quantized")
    assert bench.kernels_used(paper_path).startswith("paper path")
    forced = bench.kernels_used(to_fast(paper_path, "dequant", cache=tmp_path / "kernels.json"))
    assert forced.startswith("dequant x") and "paper" not in forced
