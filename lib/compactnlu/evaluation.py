"""Evaluate a model variant once, save its predictions, and let later notebooks reload them.

Every variant of the study (baseline, teachers, student, quantized models) goes through
:func:`evaluate_variant`: predictions on the composed test set and on the official
single-utterance test are saved as Parquet under ``artifacts/predictions/<key>/<variant>/``,
so per-language breakdowns and significance tests never rerun a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .artifacts import read_json, write_json
from .cachekeys import artifact_dir
from .config import Profile
from .features import StudyData
from .metrics import by_locale, load_predictions, massive_metrics, save_predictions, predict
from .train import collator_for


@dataclass
class Evaluation:
    variant: str
    composed: pd.DataFrame  # metrics per locale and "all" on the composed test set
    single: pd.DataFrame  # MASSIVE's measures per locale and "all" on single utterances
    eval_loss: float
    predict_seconds: float

    def row(self) -> dict:
        """The ``all`` row of the composed metrics, with the variant's name and eval loss."""
        overall = self.composed.set_index("locale").loc["all"].to_dict()
        return {"model": self.variant, "eval_loss": self.eval_loss, **overall}

    def single_rows(self) -> pd.DataFrame:
        return self.single.assign(variant=self.variant)[["variant", "locale", "intent_acc", "slot_span_f1",
                                                         "exact_match"]]


def predictions_dir(profile: Profile, variant: str) -> Path:
    return artifact_dir(profile, "predictions", "") / variant


NO_SINGLE = pd.DataFrame(columns=["locale", "intent_acc", "slot_span_f1", "exact_match"])


def _single_metrics(single: pd.DataFrame | None, labels) -> pd.DataFrame:
    return NO_SINGLE.copy() if single is None else by_locale(single, labels, massive_metrics)


def evaluate_variant(model, data: StudyData, profile: Profile, variant: str, batch_size: int = 128,
                     single: bool = True) -> Evaluation:
    """Predict the composed and (``single``) the single-utterance test sets; save predictions and metrics.

    ``model`` is an ``interface.NLUModel`` (any variant of the study), or any object with a
    ``predict_frame(dataset, labels)`` method returning :func:`metrics.predict`'s rows
    (the classic reference model), which is used instead. ``single=False`` skips MASSIVE's
    single-utterance test (the PTQ variants of the later training seeds, which no table reads it for).
    """
    folder = predictions_dir(profile, variant)
    config = getattr(model, "config", None)
    if hasattr(config, "check_labels"):  # its outputs are scored by the data's label names
        config.check_labels(data.labels, f"variant {variant}'s config")
    if hasattr(model, "predict_frame"):
        def run(split, desc):
            return model.predict_frame(data.features[split], data.labels)
    else:
        collate = collator_for(data)

        def run(split, desc):
            return predict(model, data.features[split], collate, data.labels, batch_size, desc=desc)
    start = time.perf_counter()
    composed = run("test", f"{variant} test")
    singles = run("test_single", f"{variant} single") if single else None
    seconds = time.perf_counter() - start
    save_predictions(composed, folder / "test.parquet")
    if singles is not None:
        save_predictions(singles, folder / "test_single.parquet")
    result = Evaluation(variant, by_locale(composed, data.labels), _single_metrics(singles, data.labels),
                        composed.attrs.get("eval_loss", float("nan")), seconds)
    write_json(folder / "summary.json", {"eval_loss": result.eval_loss, "predict_seconds": seconds})
    return result


def load_evaluation(profile: Profile, data: StudyData, variant: str) -> Evaluation:
    """The saved predictions of a variant, with metrics recomputed from them."""
    folder = predictions_dir(profile, variant)
    composed = load_predictions(folder / "test.parquet")
    path = folder / "test_single.parquet"
    single = load_predictions(path) if path.exists() else None
    summary = read_json(folder / "summary.json")
    return Evaluation(variant, by_locale(composed, data.labels), _single_metrics(single, data.labels),
                      summary["eval_loss"], summary["predict_seconds"])

