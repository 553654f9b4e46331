"""The paper's reported numbers, as printed (``../shared/paper_claims.md``), for side-by-side tables.

These are the paper's claims, never our results; every table of ours is measured.
"""

from __future__ import annotations

import pandas as pd

# Table 1 (teachers), percentages as printed; None where a teacher lacks the task.
TABLE1 = pd.DataFrame([
    {"model": "teacher_idsf", "eval_loss": 0.4806, "id_acc": 89.14, "id_f1": 87.02, "dc_acc": None, "dc_f1": None,
     "sf_acc": 79.85, "sf_f1": 77.73},
    {"model": "teacher_iddc", "eval_loss": 0.5195, "id_acc": 80.07, "id_f1": 77.28, "dc_acc": 90.00, "dc_f1": 89.77,
     "sf_acc": None, "sf_f1": None},
    {"model": "teacher_dcsf", "eval_loss": 0.0723, "id_acc": None, "id_f1": None, "dc_acc": 79.71, "dc_f1": 78.47,
     "sf_acc": 90.64, "sf_f1": 90.69},
])

# Table 2 (all variants, CPU).
TABLE2 = pd.DataFrame([
    ("baseline", 1064.80, 232.24, 0.9481, 0.9373, 0.8668, 0.8590, 0.9782, 0.9674),
    ("baseline_static", 279.58, 99.57, 0.9947, 0.9939, 0.8598, 0.8509, 0.9994, 0.9994),
    ("baseline_dynamic", 310.24, 91.63, 0.9934, 0.9926, 0.8541, 0.8510, 0.9962, 0.9961),
    ("kd", 1064.86, 92.20, 0.9852, 0.9838, 0.8765, 0.8734, 0.9388, 0.9350),
    ("kd_static", 734.09, 154.16, 0.9536, 0.9432, 0.8735, 0.8783, 0.8881, 0.8743),
    ("kd_dynamic", 533.12, 85.40, 0.9988, 0.9985, 0.8769, 0.8742, 0.9967, 0.9964),
    ("kd_pcptq", 428.25, 76.34, 0.9991, 0.9989, 0.9015, 0.9010, 0.9972, 0.9969),
], columns=["variant", "size_mb", "inference_s", "id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"])

# Table 3 (KD + precision-controlled PTQ by language).
TABLE3 = pd.DataFrame([
    ("hi-IN", 0.9991, 0.9989, 0.9050, 0.9040, 0.9973, 0.9971),
    ("ta-IN", 0.9988, 0.9986, 0.9020, 0.9010, 0.9970, 0.9969),
    ("kn-IN", 0.9989, 0.9987, 0.9000, 0.8990, 0.9969, 0.9967),
    ("ml-IN", 0.9987, 0.9985, 0.8980, 0.8970, 0.9968, 0.9966),
    ("bn-BD", 0.9990, 0.9988, 0.8995, 0.8985, 0.9969, 0.9967),
    ("te-IN", 0.9989, 0.9987, 0.9015, 0.9005, 0.9971, 0.9969),
], columns=["locale", "id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"])

# Table 4 (baseline + static PTQ against KD + precision-controlled PTQ): mean, std, p as printed.
TABLE4 = pd.DataFrame([
    ("id_acc", 0.9947, 0.0021, 0.9991, 0.0006, "< 0.001"),
    ("id_f1", 0.9939, 0.0024, 0.9989, 0.0007, "< 0.001"),
    ("dc_acc", 0.8598, 0.0153, 0.9015, 0.0085, "0.010"),
    ("dc_f1", 0.8509, 0.0171, 0.9010, 0.0090, "0.015"),
    ("sf_acc", 0.9994, 0.0005, 0.9972, 0.0010, "0.080"),
    ("sf_f1", 0.9994, 0.0005, 0.9969, 0.0011, "0.070"),
], columns=["metric", "a_mean", "a_std", "b_mean", "b_std", "p_value"])


def relative_to_baseline(table: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Size and time as a fraction of the table's own baseline; accuracy as a difference from it."""
    t = table.set_index("variant")
    out = pd.DataFrame({"size_vs_baseline": t.size_mb / t.size_mb[baseline],
                        "time_vs_baseline": t.inference_s / t.inference_s[baseline]})
    for metric in ("id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"):
        out[f"{metric}_diff"] = t[metric] - t[metric][baseline]
    return out.reset_index()
