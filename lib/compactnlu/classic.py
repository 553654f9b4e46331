"""A classic, non-neural reference model: what a practitioner would try first, without a GPU.

ID and DC: one TF-IDF vectorizer over character n-grams within word boundaries (shared by
both tasks), then one logistic regression per label (one-vs-rest) on multi-hot targets, since
a composed utterance carries one to three intents and domains. Labels are chosen with the
study's decision rule (:func:`interface.decide_sets`): every label whose probability is at least
0.5, the most probable one when none is. The regressions use liblinear's dual solver, the
fastest of those tried on this data (78 of them in ~150 s on one core).

SF: a linear-chain CRF over words (CRFsuite) with hand-made features: the lowercased word,
its 1-3 character prefixes and suffixes, digits, a length bucket, first/last position, the
words at -2..+2 and the locale. Its weights are fitted with CRFsuite's averaged perceptron
(10 passes): on the default corpus (~880k words, 111 tags) that took 100-120 s and gave a
higher span F1 than L2 likelihood by SGD (``crf_algorithm="l2sgd"``) in 8 passes and 145 s;
likelihood by L-BFGS costs ~16 s an iteration there, far too slow. The whole fit took 4.6
minutes on one core of a 2-core machine, predicting both test sets 12 s. Its tags are read
with :func:`compose.one_label_per_word`: an ``I-x`` that continues nothing becomes ``B-x`` (as
seqeval reads it) and a ``B-x`` right after a tag of type x becomes ``I-x``, so a run of one
type is one span. That is the neural CRF's rule too (its mask forbids ``B-x``/``I-x -> B-x``
and ``O -> I-x``), and every gold sequence of the study is already in that form.

Saved without pickle: skops' format for the scikit-learn parts (loaded trusting only the types
in :data:`TRUSTED_TYPES`), CRFsuite's own model file for the CRF, and ``classic.json`` with the
settings, the label order and the SHA-256 of both files, checked before anything is read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pycrfsuite
import skops.io as sio
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from .artifacts import read_json, verify_checksums, with_checksums, write_json, atomic_dir
from .cachekeys import artifact_dir
from .config import Profile
from .features import StudyData
from .interface import decide_sets
from .progress import bar
from .compose import multi_hot, one_label_per_word

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TEXT_FILE = "text.skops"  # vectorizer and the two one-vs-rest classifiers
CRF_FILE = "slots.crfsuite"  # CRFsuite's own model format
MANIFEST = "classic.json"
FILES = [TEXT_FILE, CRF_FILE]
# Types skops does not trust by default that these models may hold: OneVsRestClassifier keeps
# this stand-in for a label no training example has (a probability of 0 for it).
TRUSTED_TYPES = ("sklearn.multiclass._ConstantPredictor",)
META = ["uid", "locale", "n_parts", "intents", "scenarios", "tags"]


@dataclass(frozen=True)
class ClassicSettings:
    ngram_range: tuple[int, int] = (1, 4)
    min_df: int = 2
    max_features: int | None = 50_000  # caps the weights: 78 labels x features x 4 bytes
    C: float = 10.0  # inverse L2 strength of each logistic regression
    tol: float = 0.1  # liblinear's dual solver: 1e-2 gave the same F1 in 1.5x the time
    crf_algorithm: str = "ap"  # CRFsuite's averaged perceptron; "l2sgd": L2 likelihood by SGD
    crf_epochs: int = 10
    crf_c2: float = 1.0  # l2sgd only
    crf_minfreq: int = 2  # drop (attribute, tag) pairs seen once: 22.6 -> 17.6 MB, -0.003 span F1
    threshold: float = 0.5
    seed: int = 0  # liblinear's and CRFsuite's (the C library's rand()) shuffles

    @classmethod
    def from_dict(cls, raw: dict) -> "ClassicSettings":
        raw = {**raw, "ngram_range": tuple(raw["ngram_range"])}
        return cls(**raw)


def _length_bucket(n: int) -> str:
    return "1" if n <= 1 else "2-3" if n <= 3 else "4-6" if n <= 6 else "7-10" if n <= 10 else "11+"


def word_features(words, locale: str) -> list[list[str]]:
    """CRFsuite attributes (value 1) of each word of one utterance."""
    low = [w.lower() for w in words]
    n = len(low)

    def at(j: int) -> str:
        return low[j] if 0 <= j < n else ("<s>" if j < 0 else "</s>")

    out = []
    for i, w in enumerate(low):
        f = ["bias", f"loc={locale}", f"w={w}", f"len={_length_bucket(len(w))}"]
        f += [f"p{k}={w[:k]}" for k in (1, 2, 3)] + [f"s{k}={w[-k:]}" for k in (1, 2, 3)]
        if w.isdigit():
            f.append("digit")
        if i == 0:
            f.append("first")
        if i == n - 1:
            f.append("last")
        f += [f"w{d:+d}={at(i + d)}" for d in (-2, -1, 1, 2)]
        out.append(f)
    return out


def _texts(dataset) -> list[str]:
    return [" ".join(words) for words in dataset["words"]]


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()``: CRFsuite draws its shuffles from it, so a fit repeats exactly."""
    try:
        ctypes.CDLL(None).srand(seed)
    except (OSError, AttributeError, TypeError):  # no C library to load by name (Windows)
        log.warning("cannot seed the C library's rand(); the CRF's training order is not repeatable")


class _CRFTrainer(pycrfsuite.Trainer):
    """CRFsuite's trainer, silent but for a progress bar (``progress``) that advances on each
    iteration CRFsuite's log reports; the log is only read, training is the same."""

    progress = None

    def message(self, message):
        if self.logparser.feed(message) == "iteration" and self.progress is not None:
            self.progress.update()


class ClassicNLU:
    """TF-IDF + one-vs-rest logistic regression for ID and DC, a word CRF for SF."""

    def __init__(self, settings: ClassicSettings | None = None):
        self.settings = settings or ClassicSettings()
        self.intents: tuple[str, ...] = ()
        self.scenarios: tuple[str, ...] = ()
        self.tags: tuple[str, ...] = ()
        self.vectorizer = self.intent_clf = self.domain_clf = None
        self._crf_model: bytes = b""
        self._tagger: pycrfsuite.Tagger | None = None

    # ------------------------------------------------------------ training
    def fit(self, dataset, labels) -> "ClassicNLU":
        s, start = self.settings, time.perf_counter()
        self.intents, self.scenarios, self.tags = tuple(labels.intents), tuple(labels.scenarios), tuple(labels.tags)
        stages = bar(desc="classic fit: TF-IDF, ID, DC", total=3)
        self.vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=s.ngram_range, min_df=s.min_df,
                                          max_features=s.max_features, sublinear_tf=True, dtype=np.float32)
        x = self.vectorizer.fit_transform(_texts(dataset))
        # plain ints: skops would write each NumPy integer of the vocabulary as a file of its own
        self.vectorizer.vocabulary_ = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        stages.update()

        def classifier(targets):
            regression = LogisticRegression(C=s.C, solver="liblinear", dual=True, tol=s.tol, random_state=s.seed)
            fitted = OneVsRestClassifier(regression).fit(x, targets)
            for estimator in fitted.estimators_:  # float32 weights, as the neural models keep: half the file
                if hasattr(estimator, "coef_"):  # not the constant stand-in for a label never seen
                    estimator.coef_ = estimator.coef_.astype(np.float32)
            stages.update()
            return fitted

        self.intent_clf = classifier(multi_hot(dataset["intents"], self.intents))
        self.domain_clf = classifier(multi_hot(dataset["scenarios"], self.scenarios))

        stages.close()
        text_seconds = time.perf_counter() - start
        _seed_c_rand(s.seed)
        trainer = _CRFTrainer(algorithm=s.crf_algorithm, verbose=False)
        rows = zip(dataset["words"], dataset["tags"], dataset["locale"])
        for words, tags, locale in bar(rows, desc="classic fit: SF features", total=len(dataset)):
            trainer.append(word_features(words, locale), list(tags))
        params = {"max_iterations": s.crf_epochs, "feature.minfreq": s.crf_minfreq}
        trainer.set_params({**params, "c2": s.crf_c2} if s.crf_algorithm == "l2sgd" else params)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CRF_FILE
            trainer.progress = bar(desc="classic fit: SF (CRF) iterations", total=s.crf_epochs)
            with trainer.progress:
                trainer.train(str(path))
            self._set_crf(path.read_bytes())
        log.info("classic fit: ID and DC %.0f s, SF %.0f s", text_seconds, time.perf_counter() - start - text_seconds)
        return self

    def _set_crf(self, model: bytes) -> None:
        self._crf_model = model
        self._tagger = pycrfsuite.Tagger()
        self._tagger.open_inmemory(model)

    # ------------------------------------------------------------ prediction
    def predict_frame(self, dataset, labels) -> pd.DataFrame:
        """The rows and columns :func:`metrics.predict` gives, so the study's metrics apply unchanged."""
        if self._tagger is None:
            raise RuntimeError("ClassicNLU is not fitted; call fit() or ClassicNLU.load()")
        mine = (self.intents, self.scenarios, self.tags)
        if tuple(map(tuple, (labels.intents, labels.scenarios, labels.tags))) != mine:
            raise ValueError("the label space differs from the one this classic model was trained on")
        meta = dataset.select_columns(META).to_pandas()
        x = self.vectorizer.transform(_texts(dataset))
        intent_probs = self.intent_clf.predict_proba(x)
        domain_probs = self.domain_clf.predict_proba(x)
        threshold = self.settings.threshold
        tags = [one_label_per_word(self._tagger.tag(word_features(words, locale)))
                for words, locale in zip(dataset["words"], dataset["locale"])]
        pred = pd.DataFrame({
            "intents_pred": [[self.intents[k] for k in row] for row in decide_sets(intent_probs, threshold)],
            "intent_top": [self.intents[k] for k in intent_probs.argmax(1)],
            "intent_top_prob": intent_probs.max(1).astype(float),
            "scenarios_pred": [[self.scenarios[k] for k in row] for row in decide_sets(domain_probs, threshold)],
            "tags_pred": tags,
        })
        df = pd.concat([meta.rename(columns={"intents": "intents_gold", "scenarios": "scenarios_gold",
                                             "tags": "tags_gold"}), pred], axis=1)
        for column in ("intents_gold", "scenarios_gold", "tags_gold"):
            df[column] = df[column].map(list)
        df.attrs["eval_loss"] = float("nan")  # no loss comparable to the neural models'
        return df

    # ------------------------------------------------------------ files
    def save(self, folder: Path | str, fit_seconds: float = float("nan")) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        parts = {"vectorizer": self.vectorizer, "intents": self.intent_clf, "scenarios": self.domain_clf}
        sio.dump(parts, folder / TEXT_FILE, compression=zipfile.ZIP_DEFLATED)
        (folder / CRF_FILE).write_bytes(self._crf_model)
        record = {"format": FORMAT_VERSION, "settings": dataclasses.asdict(self.settings),
                  "labels": {"intents": self.intents, "scenarios": self.scenarios, "tags": self.tags},
                  "fit_seconds": fit_seconds}
        write_json(folder / MANIFEST, with_checksums(record, folder, FILES))
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> "ClassicNLU":
        """A saved model; its checksums and the types in its skops file are checked before it is read."""
        folder = Path(folder)
        verify_checksums(folder / MANIFEST, FILES)
        record = read_json(folder / MANIFEST)
        if record.get("format") != FORMAT_VERSION:
            raise ValueError(f"{folder / MANIFEST}: format {record.get('format')!r}, expected {FORMAT_VERSION}")
        unexpected = sorted(set(sio.get_untrusted_types(file=folder / TEXT_FILE)) - set(TRUSTED_TYPES))
        if unexpected:
            raise ValueError(f"{folder / TEXT_FILE} holds types this module does not trust: {unexpected}")
        parts = sio.load(folder / TEXT_FILE, trusted=list(TRUSTED_TYPES))
        model = cls(ClassicSettings.from_dict(record["settings"]))
        names = record["labels"]
        model.intents, model.scenarios, model.tags = (tuple(names[k]) for k in ("intents", "scenarios", "tags"))
        model.vectorizer, model.intent_clf, model.domain_clf = parts["vectorizer"], parts["intents"], parts["scenarios"]
        model._set_crf((folder / CRF_FILE).read_bytes())
        return model


def size_bytes(folder: Path | str) -> int:
    """Bytes on disk of a saved classic model (both model files and its manifest)."""
    folder = Path(folder)
    return sum((folder / name).stat().st_size for name in FILES + [MANIFEST])


# ---------------------------------------------------------------- the study's cached model

@dataclass
class TrainedClassic:
    model: ClassicNLU
    path: Path
    fit_seconds: float


def classic_dir(profile: Profile) -> Path:
    return artifact_dir(profile, "classic", "classic")


def train_classic(profile: Profile, data: StudyData, retrain: bool = False,
                  settings: ClassicSettings | None = None) -> TrainedClassic:
    """Fit on the composed training split, or load the model saved for this data and these settings."""
    settings = settings or ClassicSettings()
    path = classic_dir(profile)
    if path.exists() and not retrain:
        saved = read_json(path / MANIFEST)
        if saved.get("settings") == {**dataclasses.asdict(settings), "ngram_range": list(settings.ngram_range)}:
            return TrainedClassic(ClassicNLU.load(path), path, float(saved["fit_seconds"]))
        log.info("%s was fitted with other settings; fitting again", path)
    start = time.perf_counter()
    model = ClassicNLU(settings).fit(data.features["train"], data.labels)
    seconds = time.perf_counter() - start
    with atomic_dir(path) as tmp:
        model.save(tmp, fit_seconds=seconds)
    return TrainedClassic(model, path, seconds)
