"""One evaluation for every model of the study: per-example predictions, then metrics from them.

Decision rules, stated once (``interface.decide``): ID and DC predict every label whose
sigmoid is at least ``threshold`` (0.5), and the single most probable label when none is;
SF takes the CRF's Viterbi path over the first subword of each word.

Metrics on the composed test set, per locale and overall:
``id_acc``/``dc_acc`` exact-set accuracy; ``id_f1``/``dc_f1`` macro-F1 over labels (and
micro-F1); ``sf_acc`` word-level tag accuracy (the paper's slot accuracy: mostly ``O``
tags, so it flatters); ``sf_f1`` seqeval span micro-F1 (the honest slot measure).
On the official single-utterance MASSIVE test: intent accuracy (top-1), slot span F1
and exact match (intent and every tag right), as MASSIVE's official ``eval_preds`` scores
them: tags are read one slot label per word (``one_label_per_word``), so two adjacent
spans of one type count as one span. The CRF never predicts such a pair (its BIO mask
forbids B-x or I-x -> B-x), so the composed metrics, which score tags as they are, agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from seqeval.metrics import f1_score as span_f1
from sklearn.metrics import f1_score

from .artifacts import atomic_write
from .compose import LabelSpace, multi_hot, one_label_per_word  # noqa: F401 (part of metrics' API)
from .interface import IGNORE, THRESHOLD, NLUModel, infer
from .progress import bar

METRIC_COLUMNS = ["id_acc", "id_f1", "dc_acc", "dc_f1", "sf_acc", "sf_f1"]
# the feature columns the study's collators read
MODEL_INPUTS = ["input_ids", "slot_labels", "intent_ids", "scenario_ids"]
# the collator's targets, which the forward pass takes for the eval loss
LOSS_LABELS = ("intent_labels", "domain_labels", "slot_labels")


@torch.no_grad()
def predict(model: NLUModel, dataset, collator, labels: LabelSpace, batch_size: int = 128,
            threshold: float = THRESHOLD, desc: str = "predict") -> pd.DataFrame:
    """One row per example: gold and predicted intents, domains and word tags, plus scores.

    ``model`` is any ``interface.NLUModel`` (float, quantized, distilled, ONNX Runtime), answered
    by ``interface.infer``. Batches are formed by length for speed; rows come back in dataset order.
    ``df.attrs["eval_loss"]`` holds the mean loss where the model computes one.
    """
    model.eval()
    lengths = np.asarray(dataset["n_subwords"][:])
    order = np.argsort(lengths, kind="stable")
    meta = dataset.select_columns(["uid", "locale", "n_parts", "intents", "scenarios", "tags"]).to_pandas()
    names = labels.intents, labels.scenarios, labels.tags  # tags: a property that builds the tuple anew
    rows: dict[int, dict] = {}
    losses, weights = [], []
    inputs = dataset.select_columns([c for c in MODEL_INPUTS if c in dataset.column_names])
    for start in bar(range(0, len(order), batch_size), desc=desc):
        idx = order[start:start + batch_size].tolist()
        columns = inputs[idx]  # one columnar read a batch, not one row read an example
        batch = collator([dict(zip(columns, values)) for values in zip(*columns.values())])
        batch["word_mask"] = batch["slot_labels"] != IGNORE
        out, decisions = infer(model, batch, threshold, **{k: batch[k] for k in LOSS_LABELS})
        if out.loss is not None:
            losses.append(float(out.loss))
            weights.append(len(idx))
        intent_probs = torch.sigmoid(out.intent_logits).numpy() if out.intent_logits is not None else None
        # words cut by truncation have no prediction: ``named`` counts them as O
        named = decisions.named(*names, n_words=[len(meta.at[i, "tags"]) for i in idx])
        for j, (i, answer) in enumerate(zip(idx, named)):
            row = {}
            if "intents" in answer:
                row["intents_pred"] = answer["intents"]
                row["intent_top"] = labels.intents[int(intent_probs[j].argmax())]
                row["intent_top_prob"] = float(intent_probs[j].max())
            if "domains" in answer:
                row["scenarios_pred"] = answer["domains"]
            if "tags" in answer:
                row["tags_pred"] = answer["tags"]
            rows[i] = row
    pred = pd.DataFrame([rows[i] for i in range(len(dataset))])
    df = pd.concat([meta.rename(columns={"intents": "intents_gold", "scenarios": "scenarios_gold",
                                         "tags": "tags_gold"}), pred], axis=1)
    for column in ("intents_gold", "scenarios_gold", "tags_gold"):
        df[column] = df[column].map(list)
    df.attrs["eval_loss"] = float(np.average(losses, weights=weights)) if losses else float("nan")
    return df


def _set_metrics(gold, pred, names) -> tuple[float, float, float]:
    y_true, y_pred = multi_hot(gold, names), multi_hot(pred, names)
    exact = float((y_true == y_pred).all(1).mean())
    macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    micro = f1_score(y_true, y_pred, average="micro", zero_division=0)
    return exact, float(macro), float(micro)


def task_metrics(df: pd.DataFrame, labels: LabelSpace) -> dict[str, float]:
    """The study's six metrics (plus micro-F1s) on one set of predictions; NaN for a missing task."""
    m = {c: float("nan") for c in METRIC_COLUMNS + ["id_f1_micro", "dc_f1_micro"]}
    if "intents_pred" in df:
        m["id_acc"], m["id_f1"], m["id_f1_micro"] = _set_metrics(df.intents_gold, df.intents_pred, labels.intents)
    if "scenarios_pred" in df:
        m["dc_acc"], m["dc_f1"], m["dc_f1_micro"] = _set_metrics(df.scenarios_gold, df.scenarios_pred,
                                                                 labels.scenarios)
    if "tags_pred" in df:
        gold, pred = list(df.tags_gold), list(df.tags_pred)
        flat_gold, flat_pred = np.concatenate(gold), np.concatenate(pred)
        m["sf_acc"] = float((flat_gold == flat_pred).mean())
        m["sf_f1"] = float(span_f1(gold, pred))
    return m


def by_locale(df: pd.DataFrame, labels: LabelSpace, metric_fn=None) -> pd.DataFrame:
    """Metrics per locale, then a row ``all`` over every example."""
    metric_fn = metric_fn or (lambda part: task_metrics(part, labels))
    rows = [{"locale": loc, **metric_fn(part)} for loc, part in df.groupby("locale", sort=True)]
    rows.append({"locale": "all", **metric_fn(df)})
    return pd.DataFrame(rows)




def massive_metrics(df: pd.DataFrame) -> dict[str, float]:
    """MASSIVE's standard measures on single utterances: intent accuracy, slot span F1, exact match."""
    gold_intent = df.intents_gold.map(lambda x: x[0])
    intent_ok = (df.intent_top == gold_intent).to_numpy() if "intent_top" in df else None
    out = {"intent_acc": float(intent_ok.mean()) if intent_ok is not None else float("nan")}
    if "tags_pred" in df:
        gold = [one_label_per_word(tags) for tags in df.tags_gold]
        pred = [one_label_per_word(tags) for tags in df.tags_pred]
        out["slot_span_f1"] = float(span_f1(gold, pred))
        tags_ok = np.array([g == p for g, p in zip(gold, pred)])
        out["exact_match"] = float((intent_ok & tags_ok).mean()) if intent_ok is not None else float("nan")
    else:
        out["slot_span_f1"] = out["exact_match"] = float("nan")
    return out


def save_predictions(df: pd.DataFrame, path: Path | str) -> Path:
    """Parquet, read back without pickle; pandas keeps ``df.attrs`` (the eval loss) in its metadata."""
    path = Path(path)
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    return path


def load_predictions(path: Path | str) -> pd.DataFrame:
    df = pd.read_parquet(path)
    for column in df.columns:
        if column.endswith(("_gold", "_pred")):
            df[column] = df[column].map(list)
    return df
