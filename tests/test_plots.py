"""Figures that compare variants show mean ± std over training seeds, and their point labels
never overprint each other."""

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from compactnlu import plots  # noqa: E402

METRICS = ["id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"]
# name: (size_mb, inference_s, latency_p50_ms); baseline_static, baseline_dynamic and kd_static
# (and kd_dynamic) sit on almost one point, as the int8 variants do in the real Pareto figure.
VARIANTS = {
    "baseline": (268.0, 41.0, 9.0), "baseline_static": (70.10, 20.0, 4.0), "baseline_dynamic": (70.12, 20.1, 4.1),
    "baseline_pcptq": (55.0, 24.0, 5.0), "kd": (268.2, 40.5, 9.1), "kd_static": (70.11, 20.05, 4.0),
    "kd_dynamic": (70.13, 20.02, 4.05), "kd_pcptq": (55.1, 24.1, 5.1), "kd_pcptq_fast": (55.05, 18.0, 3.5),
    "kd_pcptq_onnx": (54.9, 12.0, 2.5), "kd_onnx_int8": (70.0, 11.0, 2.2), "classic": (3.0, 1.0, 0.3),
}


def _table(std: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i, (name, (size, seconds, p50)) in enumerate(VARIANTS.items()):
        row = {"variant": name, "size_mb": size, "inference_s": seconds, "latency_p50_ms": p50,
               "n_seeds": 1 if name == "classic" else 3}
        near = name in {"baseline_static", "baseline_dynamic", "kd_static", "kd_dynamic"}
        for m in METRICS:
            row[m] = 0.80 + (0.0005 * i if near else 0.1 * rng.random())
            if std:
                row[f"{m}_std"] = np.nan if name == "classic" else 0.01 + 0.01 * rng.random()
        rows.append(row)
    return pd.DataFrame(rows)


def _points(std: bool = True) -> pd.DataFrame:
    table = _table(std).iloc[:8]
    kinds = {"": "fp32", "static": "static int8", "dynamic": "dynamic int8", "pcptq": "selected"}
    points = table.assign(model=table.variant.str.split("_").str[0],
                          kind=table.variant.map(lambda v: kinds[v.partition("_")[2]]), label=table.variant)
    extra = pd.DataFrame({"model": ["kd", "kd", "kd"], "kind": ["uniform", "λ sweep", "λ sweep"],
                          "label": ["uniform-8", "λ=0.1", "λ=1"], "size_mb": [70.12, 60.0, 50.0],
                          "id_acc": [0.8012, 0.83, 0.82], "sf_f1": [0.8011, 0.84, 0.81]})
    return pd.concat([points, extra], ignore_index=True)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _error_containers(fig) -> int:
    return sum(isinstance(c, ErrorbarContainer) for ax in fig.axes for c in ax.containers)


def _label_boxes(ax):
    return [t.get_window_extent() for t in ax.texts if t.get_gid() == plots.LABEL_GID and t.get_text()]


def _assert_labels_apart(fig, expected: int):
    fig.canvas.draw()
    boxes = [box for ax in fig.axes for box in _label_boxes(ax)]
    assert len(boxes) == expected
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


FIGURES = {
    "models_by_task": lambda t: plots.models_by_task(t, title="t"),
    "accuracy_by_task": lambda t: plots.accuracy_by_task(t),
    "size_vs_accuracy": lambda t: plots.size_vs_accuracy(t, metrics=("id_acc", "sf_f1")),
    "pareto": lambda t: plots.pareto(_points("id_acc_std" in t)),
}


@pytest.mark.parametrize("name", FIGURES)
def test_error_bars_follow_std_columns(name):
    with_std = FIGURES[name](_table(std=True))
    without = FIGURES[name](_table(std=False))
    assert isinstance(with_std, plt.Figure) and isinstance(without, plt.Figure)
    assert _error_containers(with_std) > 0
    assert _error_containers(without) == 0


def test_bars_skip_single_seed_variant():
    table = _table().iloc[[0, -1]]  # baseline (3 seeds) and classic (1 seed, NaN std)
    fig = plots.accuracy_by_task(table)
    (container,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(container.lines[2][0].get_segments()) == len(METRICS)  # one bar per metric, baseline's only


def test_models_by_task_id_column():
    table = _table().rename(columns={"variant": "model"}).iloc[:3]
    assert plots.models_by_task(table).axes[0].get_legend().get_texts()[0].get_text() == "baseline"
    assert plots.models_by_task(_table().iloc[:3], id_column="variant").axes[0].get_legend() is not None


def test_size_vs_accuracy_labels_apart():
    fig = plots.size_vs_accuracy(_table(), metrics=("id_acc", "dc_acc"))
    _assert_labels_apart(fig, 2 * len(VARIANTS))


def test_pareto_labels_apart():
    points = _points()
    fig = plots.pareto(points)
    _assert_labels_apart(fig, 2 * len(points))


def test_efficiency_labels_apart():
    fig = plots.efficiency(_table())
    assert isinstance(fig, plt.Figure)
    _assert_labels_apart(fig, len(VARIANTS))


def _by_locale(std: bool) -> pd.DataFrame:
    table = _table(std).iloc[:4]
    return pd.concat([table.assign(locale=locale) for locale in ["en-US", "de-DE", "fr-FR"]], ignore_index=True)


def test_variants_by_locale_shows_spread():
    fig = plots.variants_by_locale(_by_locale(std=True))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 12 and all("±" in t and "\n" in t for t in texts)
    assert texts[0] == f"{_table().id_acc[0]:.3f}\n±{_table().id_acc_std[0]:.3f}"
    plain = plots.variants_by_locale(_by_locale(std=False), fmt=".2f")
    texts = [t.get_text() for t in plain.axes[0].texts]
    assert len(texts) == 12 and not any("±" in t for t in texts)
