"""Error analysis on prediction frames (``compactnlu.metrics.predict``) for notebook 09.

Each function is pure and returns a tidy DataFrame. Metrics come from
``compactnlu.metrics.task_metrics``; "over-predicted domain" means a predicted domain
that is not in the example's gold domain set.
"""

from __future__ import annotations

from collections import Counter
from itertools import product

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, fisher_exact

from .compose import LabelSpace
from .metrics import METRIC_COLUMNS, by_locale, task_metrics

FAMILY = {"hi-IN": "Indo-Aryan", "bn-BD": "Indo-Aryan",
          "ta-IN": "Dravidian", "te-IN": "Dravidian", "kn-IN": "Dravidian", "ml-IN": "Dravidian"}
FAMILIES = ("Indo-Aryan", "Dravidian")
TASKS = ("id", "dc", "sf")
_PRED = {"id": "intents_pred", "dc": "scenarios_pred", "sf": "tags_pred"}


# ---------------------------------------------------------------- quantization noise

def flip_rates(reference: pd.DataFrame, quantized: pd.DataFrame) -> dict[str, float]:
    """Share of examples whose prediction changed, per task (NaN where a frame lacks the task).

    id/dc: the predicted label *set* differs; sf: any word tag differs. Gold is not
    used, so this measures quantization noise even where accuracy does not move.
    """
    _check_aligned(reference, quantized)
    out = {}
    for task, column in _PRED.items():
        if column not in reference or column not in quantized:
            out[task] = float("nan")
            continue
        if task == "sf":
            changed = [list(a) != list(b) for a, b in zip(reference[column], quantized[column])]
        else:
            changed = [set(a) != set(b) for a, b in zip(reference[column], quantized[column])]
        out[task] = float(np.mean(changed)) if changed else float("nan")
    return out


def quantization_drop(predictions: dict[str, pd.DataFrame], labels: LabelSpace, pairs: dict[str, str],
                      per_locale: bool = False) -> pd.DataFrame:
    """Change of each of the six metrics from an fp32 reference to its quantized variant.

    ``pairs`` maps quantized variant -> reference, e.g. ``{"kd_static": "kd"}``; both must
    be keys of ``predictions`` and have the same rows in the same order.
    One row per (variant, locale, metric), locale ``all`` only unless ``per_locale``:
    ``reference_score``/``quantized_score`` and ``delta`` (quantized − reference) are in
    **points** (×100), so a loss is a negative delta; ``relative_drop`` is
    (reference − quantized) / reference as a fraction, so a loss is positive;
    ``flip_rate`` (fraction) is the task's share of changed predictions (see
    ``flip_rates``), repeated on the task's two metric rows.
    Rank tasks with ``task_sensitivity``.
    """
    rows = []
    for variant, ref_name in pairs.items():
        missing = [n for n in (variant, ref_name) if n not in predictions]
        if missing:
            raise KeyError(f"no predictions for {missing} (pair {variant!r} -> {ref_name!r})")
        ref, quant = predictions[ref_name], predictions[variant]
        _check_aligned(ref, quant)
        if per_locale:
            ref_m = by_locale(ref, labels).set_index("locale")
            quant_m = by_locale(quant, labels).set_index("locale")
            # rows are aligned, so one mask selects the same examples in both frames
            parts = [(loc, ref.locale.to_numpy() == loc) for loc in ref_m.index if loc != "all"]
            parts.append(("all", np.ones(len(ref), dtype=bool)))
        else:
            ref_m = pd.DataFrame([task_metrics(ref, labels)], index=["all"])
            quant_m = pd.DataFrame([task_metrics(quant, labels)], index=["all"])
            parts = [("all", np.ones(len(ref), dtype=bool))]
        for locale, mask in parts:
            flips = flip_rates(ref[mask].reset_index(drop=True), quant[mask].reset_index(drop=True))
            for metric in METRIC_COLUMNS:
                r, q = float(ref_m.at[locale, metric]), float(quant_m.at[locale, metric])
                task = metric.split("_")[0]
                rows.append({
                    "variant": variant, "reference": ref_name, "locale": locale, "task": task,
                    "metric": metric, "reference_score": 100 * r, "quantized_score": 100 * q,
                    "delta": 100 * (q - r), "relative_drop": (r - q) / r if r else float("nan"),
                    "flip_rate": flips[task],
                })
    return pd.DataFrame(rows, columns=["variant", "reference", "locale", "task", "metric", "reference_score",
                                       "quantized_score", "delta", "relative_drop", "flip_rate"])


def task_sensitivity(drop: pd.DataFrame) -> pd.DataFrame:
    """Which task loses most under quantization, from a ``quantization_drop`` frame.

    Rule: a task's loss is the mean ``relative_drop`` of its acc and f1 metrics; within
    each (variant, locale) tasks are ranked by it, 1 = loses most (ties share the
    lower rank). Rows ``variant == "all"`` average loss and flip rate over variants per
    locale and rank those means. ``delta`` is the mean of the two deltas (points).
    """
    keys = ["variant", "reference", "locale", "task"]
    per = (drop.groupby(keys, sort=False)
           .agg(relative_drop=("relative_drop", "mean"), delta=("delta", "mean"), flip_rate=("flip_rate", "first"))
           .reset_index())
    overall = (per.groupby(["locale", "task"], sort=False)
               .agg(relative_drop=("relative_drop", "mean"), delta=("delta", "mean"),
                    flip_rate=("flip_rate", "mean"), n_variants=("variant", "size"))
               .reset_index().assign(variant="all", reference="all"))
    out = pd.concat([per.assign(n_variants=1), overall], ignore_index=True)
    out["rank"] = (out.groupby(["variant", "locale"], sort=False)["relative_drop"]
                   .rank(ascending=False, method="min"))
    return out[keys + ["relative_drop", "delta", "flip_rate", "rank", "n_variants"]]


def _check_aligned(a: pd.DataFrame, b: pd.DataFrame) -> None:
    if len(a) != len(b):
        raise ValueError(f"prediction frames differ in length: {len(a)} vs {len(b)}")
    if "uid" in a and "uid" in b and not (a.uid.to_numpy() == b.uid.to_numpy()).all():
        raise ValueError("prediction frames are not in the same row order (uid differs)")


# ---------------------------------------------------------------- domains

def _extra(gold, pred) -> set:
    return set(pred) - set(gold)


def domain_overprediction(df: pd.DataFrame) -> pd.DataFrame:
    """Domain over-prediction per locale, then ``all``.

    ``overpred_rate``: share of examples with at least one predicted domain not in gold;
    ``mean_extra``: mean number of such domains per example (over all examples);
    ``underpred_rate``: share missing a gold domain, for contrast; ``dc_error_rate``:
    1 − exact-set accuracy; ``top_extra``/``top_extra_count``: the most frequent extra
    domain (ties broken by name).
    """
    def summary(part: pd.DataFrame) -> dict:
        extra = [_extra(g, p) for g, p in zip(part.scenarios_gold, part.scenarios_pred)]
        missed = [set(g) - set(p) for g, p in zip(part.scenarios_gold, part.scenarios_pred)]
        counts = Counter(d for e in extra for d in e)
        top = min(counts.items(), key=lambda kv: (-kv[1], kv[0])) if counts else (None, 0)
        n = len(part)
        return {"n": n,
                "dc_error_rate": float(np.mean([bool(e or m) for e, m in zip(extra, missed)])) if n else np.nan,
                "overpred_rate": float(np.mean([bool(e) for e in extra])) if n else np.nan,
                "mean_extra": float(np.mean([len(e) for e in extra])) if n else np.nan,
                "underpred_rate": float(np.mean([bool(m) for m in missed])) if n else np.nan,
                "top_extra": top[0], "top_extra_count": top[1]}

    rows = [{"locale": loc, **summary(part)} for loc, part in df.groupby("locale", sort=True)]
    rows.append({"locale": "all", **summary(df)})
    return pd.DataFrame(rows)


def extra_domains(df: pd.DataFrame, top: int | None = 10) -> pd.DataFrame:
    """Counts of (gold domain X, extra predicted domain Y) over examples.

    Each example adds 1 to every pair of a gold domain X and a predicted-but-not-gold
    domain Y, so "alarm added to music inputs" is the row X=music, Y=alarm. ``rate`` is
    count / ``n_gold`` (examples whose gold contains X). Sorted by count; ``top=None``
    keeps every pair.
    """
    gold_n: Counter = Counter()
    pairs: Counter = Counter()
    for g, p in zip(df.scenarios_gold, df.scenarios_pred):
        gold = set(g)
        gold_n.update(gold)
        pairs.update(product(gold, _extra(gold, p)))
    out = pd.DataFrame([{"gold_domain": x, "extra_domain": y, "count": c, "n_gold": gold_n[x], "rate": c / gold_n[x]}
                        for (x, y), c in pairs.items()],
                       columns=["gold_domain", "extra_domain", "count", "n_gold", "rate"])
    out = out.sort_values(["count", "gold_domain", "extra_domain"], ascending=[False, True, True], ignore_index=True)
    return out if top is None else out.head(top)


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> dict:
    """Test k1/n1 vs k2/n2 on the 2×2 table [[k1, n1−k1], [k2, n2−k2]].

    Chi-square with Yates' correction when every expected count is at least 5, else
    Fisher's exact test. Examples are treated as independent draws: with only six
    locales, a family difference can still be a locale effect.
    """
    if min(n1, n2) == 0:
        return {"p_value": float("nan"), "test": "none"}
    table = np.array([[k1, n1 - k1], [k2, n2 - k2]])
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        # both rates are 0 (or both 1): nothing differs, and chi2 would divide by zero
        return {"p_value": 1.0, "test": "none"}
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    if expected.min() >= 5:
        return {"p_value": float(chi2_contingency(table, correction=True)[1]), "test": "chi2"}
    return {"p_value": float(fisher_exact(table)[1]), "test": "fisher"}


def family_domain_errors(df: pd.DataFrame) -> pd.DataFrame:
    """DC error rate and domain over-prediction rate per language family, with a test.

    One row per (measure, family): ``measure`` is ``dc_error`` (1 − exact-set DC
    accuracy) or ``overpred`` (≥ 1 extra domain); ``n`` examples, ``count`` with the
    error, ``rate``; ``difference`` (Dravidian − Indo-Aryan rate), ``p_value`` and
    ``test`` from ``two_proportion_test``, repeated on both family rows. Locales outside
    ``FAMILY`` are left out.
    """
    family = df.locale.map(FAMILY)
    extra = np.array([bool(_extra(g, p)) for g, p in zip(df.scenarios_gold, df.scenarios_pred)], dtype=bool)
    wrong = np.array([set(g) != set(p) for g, p in zip(df.scenarios_gold, df.scenarios_pred)], dtype=bool)
    rows = []
    for measure, flags in (("dc_error", wrong), ("overpred", extra)):
        stats = {}
        for fam in FAMILIES:
            mask = (family == fam).to_numpy()
            n, k = int(mask.sum()), int(flags[mask].sum())
            stats[fam] = (k, n, k / n if n else float("nan"))
        (k1, n1, r1), (k2, n2, r2) = stats["Indo-Aryan"], stats["Dravidian"]
        test = two_proportion_test(k1, n1, k2, n2)
        for fam in FAMILIES:
            k, n, r = stats[fam]
            rows.append({"measure": measure, "family": fam, "n": n, "count": k, "rate": r,
                         "difference": r2 - r1, **test})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- intents

def confused_intent_pairs(df: pd.DataFrame, top: int | None = 15) -> pd.DataFrame:
    """Most frequent (gold intent missed, wrong intent predicted) pairs.

    Rule: in each example, every gold intent missing from the prediction is paired
    with every predicted intent not in gold, and each pair counts 1 (so a miss with
    no wrong intent predicted, or an extra intent with nothing missed, adds no pair).
    Single- and multi-intent examples count alike; ``count_single``/``count_multi``
    split the count by the number of gold intents. ``rate`` is count / examples whose
    gold contains the missed intent; ``share`` is count / all pairs. ``rank`` is by
    count over the full table (ties share the lower rank), then ``top`` rows are kept
    (``None`` keeps all: pass that to ``pair_count``/``undirected_pairs``).
    """
    gold_n: Counter = Counter()
    counts: dict[tuple, list[int]] = {}
    for g, p in zip(df.intents_gold, df.intents_pred):
        gold, pred = set(g), set(p)
        gold_n.update(gold)
        multi = int(len(gold) > 1)
        for pair in product(sorted(gold - pred), sorted(pred - gold)):
            counts.setdefault(pair, [0, 0])[multi] += 1
    total = sum(sum(c) for c in counts.values())
    out = pd.DataFrame([{"gold": a, "predicted": b, "count": s + m, "count_single": s, "count_multi": m,
                         "rate": (s + m) / gold_n[a], "share": (s + m) / total}
                        for (a, b), (s, m) in counts.items()],
                       columns=["gold", "predicted", "count", "count_single", "count_multi", "rate", "share"])
    out = out.sort_values(["count", "gold", "predicted"], ascending=[False, True, True], ignore_index=True)
    out.insert(0, "rank", out["count"].rank(ascending=False, method="min").astype(int))
    return out if top is None else out.head(top)


def pair_count(table: pd.DataFrame, a: str, b: str) -> int:
    """Count of confusions between intents ``a`` and ``b`` in both directions (a→b plus b→a)."""
    hit = ((table.gold == a) & (table.predicted == b)) | ((table.gold == b) & (table.predicted == a))
    return int(table.loc[hit, "count"].sum())


def undirected_pairs(table: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """``confused_intent_pairs`` with both directions merged: one row per unordered pair, ranked by count."""
    if table.empty:
        return pd.DataFrame(columns=["rank", "intent_a", "intent_b", "count"])
    ends = np.sort(table[["gold", "predicted"]].to_numpy(dtype=str), axis=1)
    out = (pd.DataFrame({"intent_a": ends[:, 0], "intent_b": ends[:, 1], "count": table["count"].to_numpy()})
           .groupby(["intent_a", "intent_b"], as_index=False)["count"].sum()
           .sort_values(["count", "intent_a", "intent_b"], ascending=[False, True, True], ignore_index=True))
    out.insert(0, "rank", out["count"].rank(ascending=False, method="min").astype(int))
    return out if top is None else out.head(top)


# ---------------------------------------------------------------- length

def errors_by_length(df: pd.DataFrame, labels: LabelSpace, bins: int | list[float] = 5) -> pd.DataFrame:
    """Metrics by utterance length in words (``len(tags_gold)``) and by ``n_parts``.

    ``bins``: an int q gives quantile bins of the word count over the whole frame
    (edges are floored quantiles, so bins hold whole word counts and may be fewer than q
    when counts repeat); a list gives fixed right-closed edges ``(e0, e1], (e1, e2], ...``
    that must cover every example. Each example is in exactly one row of each
    ``grouping`` ("words", "n_parts"). Columns: grouping, group (label), lo, hi
    (inclusive word or part counts), n, share, the six metrics and the micro-F1s.
    Macro-F1 averages over every label, including labels absent from a small group
    (scored 0), so compare groups by acc and micro-F1.
    """
    words = df.tags_gold.map(len).to_numpy()
    if isinstance(bins, (int, np.integer)):
        edges = np.unique(np.floor(np.quantile(words, np.linspace(0, 1, int(bins) + 1))))
        edges[0] = words.min() - 1
        edges = np.unique(np.append(edges, words.max()))
    else:
        edges = np.asarray(bins, dtype=float)
        if (words <= edges[0]).any() or (words > edges[-1]).any():
            raise ValueError(f"bins {list(bins)} do not cover word counts {words.min()}..{words.max()}")
    which = np.searchsorted(edges, words, side="left") - 1  # right-closed: e_i < w <= e_{i+1}
    rows = []
    for i in range(len(edges) - 1):
        mask = which == i
        if not mask.any():
            continue
        lo, hi = int(np.floor(edges[i])) + 1, edges[i + 1]
        hi_label = "∞" if np.isinf(hi) else str(int(np.floor(hi)))
        rows.append(_group_row(df[mask], labels, "words", f"{lo}–{hi_label}", float(lo), float(np.floor(hi)),
                               len(df)))
    for parts, part in df.groupby("n_parts", sort=True):
        rows.append(_group_row(part, labels, "n_parts", str(int(parts)), float(parts), float(parts), len(df)))
    return pd.DataFrame(rows)


def _group_row(part: pd.DataFrame, labels: LabelSpace, grouping: str, group: str, lo, hi, total: int) -> dict:
    return {"grouping": grouping, "group": group, "lo": lo, "hi": hi, "n": len(part), "share": len(part) / total,
            **task_metrics(part, labels)}
