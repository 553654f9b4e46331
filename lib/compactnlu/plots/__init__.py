"""One function a figure. Each returns the matplotlib Figure; :func:`save` writes it.

Modules by the notebooks whose figures they draw: ``data`` (01), ``training`` (02-04),
``quantization`` (05, 07), ``results`` (08, 11), ``per_language`` (09); ``style`` and
``labels`` are what they share. Every figure is importable from here.
"""

from .data import data_counts, label_frequencies, lengths, parts_per_example  # noqa: F401
from .per_language import by_length, task_drops, variants_by_locale  # noqa: F401
from .quantization import calibration_sweep, pareto, policy_heatmap, search_history  # noqa: F401
from .results import accuracy_by_task, efficiency, paper_scale, size_vs_accuracy  # noqa: F401
from .style import LABEL_GID, METRICS, save  # noqa: F401
from .training import fusion_weights, learning_curves, metrics_by_locale, models_by_task, ours_vs_paper  # noqa: F401
