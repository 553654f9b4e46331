"""The study-scale speed bar of issue 14 on this CPU and on it with its ISA lowered to AVX2.

For each ISA setting, a fresh process loads the default profile's ``baseline``, ``kd_pcptq``
(the paper's run-time path) and ``kd_pcptq_fast`` (the stored integers on the kernels measured
fastest under that setting: ``compactnlu.quant.kernels``), plus the baseline with its matrix
multiplies taken out (``bench.without_matmuls``, the floor no kernel can beat), and times
interleaved passes over the composed test set at batch 128, as notebook 08 does. It prints
each variant's median pass and its ratio to the baseline's, measured in that one process.

The lowered setting (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``, plus ``COMPACTNLU_ASSUME_NO_VNNI=1``)
imitates an AVX2-only CPU for torch's kernels, float ones (MKL) included, so the baseline is not
left with AVX-512 while the integer kernels lose it; it is not one: the memory system and
clock stay this machine's.

    MASSIVE_DIR=../shared/massive python benchmarks/fast_path_isa.py [--repeats 5]

Needs the default profile's trained and quantized models (notebooks 01-07).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "COMPACTNLU_ASSUME_NO_VNNI": "1"}
VARIANTS = ("baseline", "kd_pcptq", "kd_pcptq_fast")


def measure(repeats: int) -> dict:
    # imported here, in the child: the ISA limits must be in the environment before torch loads
    import torch

    from compactnlu import bench, cpu
    from compactnlu.config import load_profile
    from compactnlu.features import load_study_data
    from compactnlu.train import collator_for
    from compactnlu.variants import load

    torch.set_num_threads(2)
    profile = load_profile("default")
    data = load_study_data(profile)
    batches = bench.prepared_batches(data.features["test"], collator_for(data), 128)
    models = {name: load(profile, name) for name in VARIANTS}
    models["baseline_without_matmuls"] = bench.without_matmuls(models["baseline"])
    seconds = bench.time_passes(models, batches, repeats=repeats).groupby("variant").seconds.median()
    return {"cpu": cpu.cpu_model(), "isa": " ".join(cpu.isa_flags()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "kernels": bench.kernels_used(models["kd_pcptq_fast"]),
            "seconds": seconds.to_dict(), "vs_baseline": (seconds / seconds["baseline"]).to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    for label, extra in (("this CPU", {}), ("AVX2 imitated", AVX2)):
        done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                              env={**os.environ, **extra}, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{label}: {result['cpu']} (torch dispatches {result['cpu_capability']}; ISA: {result['isa']})")
        print(f"  fast path kernels: {result['kernels']}")
        for name, seconds in result["seconds"].items():
            print(f"  {name:26s} {seconds:7.3f} s   {result['vs_baseline'][name]:.3f}x baseline")
        bar = result["vs_baseline"]["kd_pcptq_fast"]
        print(f"  study-scale bar, kd_pcptq_fast <= 0.7x baseline: {bar:.3f} ({'met' if bar <= 0.7 else 'not met'})")


if __name__ == "__main__":
    main()
