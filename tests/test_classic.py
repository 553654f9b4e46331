"""``compactnlu.classic`` on the smoke profile: the non-neural reference model.

It fits, predicts label sets from the label space and BIO-valid tags, saves without pickle,
reloads to the same predictions, refuses a tampered or untrusted file, and goes through the
study's one evaluation function.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import skops.io as sio

from compactnlu import classic
from compactnlu.artifacts import read_json, with_checksums, write_json
from compactnlu.classic import ClassicNLU, size_bytes, train_classic
from compactnlu.evaluation import evaluate_variant, predictions_dir
from test_train import artifacts, data, profile  # noqa: F401 (smoke fixtures, one thread)

# metrics.predict's columns, in its order
COLUMNS = ["uid", "locale", "n_parts", "intents_gold", "scenarios_gold", "tags_gold",
           "intents_pred", "intent_top", "intent_top_prob", "scenarios_pred", "tags_pred"]


@pytest.fixture(scope="module")
def trained(profile, data):
    return train_classic(profile, data)


@pytest.fixture(scope="module")
def frame(trained, data):
    return trained.model.predict_frame(data.features["test"], data.labels)


def bio_problems(tags: list[str]) -> list[str]:
    """Where ``tags`` break the study's BIO rule: I-x must follow B-x or I-x, B-x must not follow x."""
    problems, previous = [], "O"
    for i, tag in enumerate(tags):
        slot, before = tag[2:], previous[2:]
        if tag.startswith("I-") and before != slot:
            problems.append(f"{i}: {previous} -> {tag}")
        if tag.startswith("B-") and before == slot:
            problems.append(f"{i}: {previous} -> {tag}")
        previous = tag
    return problems


def test_fit_is_cached_and_saved_as_its_three_files(trained, profile, data):
    assert trained.path == classic.classic_dir(profile) and trained.fit_seconds > 0
    assert sorted(p.name for p in trained.path.iterdir()) == sorted(classic.FILES + [classic.MANIFEST])
    assert not [p for p in trained.path.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin", ".joblib")]
    assert size_bytes(trained.path) == sum(p.stat().st_size for p in trained.path.iterdir())
    again = train_classic(profile, data)  # loaded, not fitted again
    assert again.path == trained.path and again.fit_seconds == pytest.approx(trained.fit_seconds)


def test_predictions_have_predict_s_rows_label_sets_and_bio_tags(frame, data):
    test = data.features["test"]
    assert list(frame.columns) == COLUMNS and list(frame.uid) == list(test["uid"])
    assert math.isnan(frame.attrs["eval_loss"])
    for column, names in (("intents_pred", data.labels.intents), ("scenarios_pred", data.labels.scenarios)):
        assert all(len(s) > 0 and set(s) <= set(names) for s in frame[column])
    assert all(top in pred for top, pred in zip(frame.intent_top, frame.intents_pred))
    assert frame.intent_top_prob.between(0, 1).all()
    for words, pred in zip(test["words"], frame.tags_pred):
        assert len(pred) == len(words) and set(pred) <= set(data.labels.tags)
        assert not bio_problems(pred)
    # far better than chance on the easy synthetic corpus
    assert (frame.intents_pred.map(sorted) == frame.intents_gold.map(sorted)).mean() > 0.3


def test_reload_gives_identical_predictions_without_pickle(trained, frame, data, refuse_pickle):
    loaded = ClassicNLU.load(trained.path)
    pd.testing.assert_frame_equal(loaded.predict_frame(data.features["test"], data.labels), frame)


def test_a_second_fit_is_the_same_model(trained, data, frame, tmp_path):
    again = ClassicNLU().fit(data.features["train"], data.labels)
    again.save(tmp_path / "again")  # skops names its arrays by memory address: compare contents
    assert (tmp_path / "again" / classic.CRF_FILE).read_bytes() == (trained.path / classic.CRF_FILE).read_bytes()
    for mine, theirs in zip(again.intent_clf.estimators_ + again.domain_clf.estimators_,
                            trained.model.intent_clf.estimators_ + trained.model.domain_clf.estimators_):
        np.testing.assert_array_equal(mine.coef_, theirs.coef_)
    pd.testing.assert_frame_equal(again.predict_frame(data.features["test"], data.labels), frame)


@pytest.mark.parametrize("name", classic.FILES)
def test_load_refuses_a_changed_byte(trained, tmp_path, name):
    copy = shutil.copytree(trained.path, tmp_path / "copy")
    raw = bytearray((copy / name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{name} is corrupt or truncated"):
        ClassicNLU.load(copy)


@pytest.mark.filterwarnings("ignore:Label not .* is present in all training examples")
def test_an_intent_without_training_examples_is_saved_and_never_predicted(data, tmp_path, refuse_pickle):
    train = data.features["train"]
    missing = train[0]["intents"][0]
    model = ClassicNLU().fit(train.filter(lambda row: missing not in row["intents"]), data.labels)
    # OneVsRestClassifier keeps a constant stand-in for it: the one type load trusts beyond skops' own
    model.save(tmp_path / "model")
    assert sio.get_untrusted_types(file=tmp_path / "model" / classic.TEXT_FILE) == list(classic.TRUSTED_TYPES)
    frame = ClassicNLU.load(tmp_path / "model").predict_frame(data.features["test"], data.labels)
    assert not any(missing in s for s in frame.intents_pred)


class Foreign:
    """A type skops does not trust."""


def test_load_refuses_types_it_does_not_trust_even_with_right_checksums(trained, tmp_path):
    copy = shutil.copytree(trained.path, tmp_path / "copy")
    sio.dump({"vectorizer": Foreign()}, copy / classic.TEXT_FILE)
    record = read_json(copy / classic.MANIFEST)
    write_json(copy / classic.MANIFEST, with_checksums(record, copy, classic.FILES))
    with pytest.raises(ValueError, match="does not trust.*Foreign"):
        ClassicNLU.load(copy)


def test_predict_refuses_another_label_space(trained, data):
    other = type(data.labels)(data.labels.intents[::-1], data.labels.scenarios, data.labels.slot_types)
    with pytest.raises(ValueError, match="label space"):
        trained.model.predict_frame(data.features["test"].select(range(3)), other)


def test_evaluate_variant_takes_the_classic_model(trained, data, profile, frame):
    result = evaluate_variant(trained.model, data, profile, "classic")
    overall = result.composed.set_index("locale").loc["all"]
    assert np.isfinite(overall[["id_acc", "dc_acc", "sf_acc", "sf_f1"]].astype(float)).all()
    single = result.single.set_index("locale").loc["all"]
    assert np.isfinite(single[["intent_acc", "slot_span_f1", "exact_match"]].astype(float)).all()
    assert math.isnan(result.eval_loss) and result.predict_seconds > 0
    folder = predictions_dir(profile, "classic")
    assert {"test.parquet", "test_single.parquet", "summary.json"} <= {p.name for p in folder.iterdir()}


def test_a_model_saved_with_other_settings_is_fitted_again(profile, data, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTNLU_ARTIFACTS", str(tmp_path))
    first = train_classic(profile, data, settings=classic.ClassicSettings(crf_epochs=2))
    assert train_classic(profile, data, settings=classic.ClassicSettings(crf_epochs=2)).fit_seconds == first.fit_seconds
    train_classic(profile, data, settings=classic.ClassicSettings(crf_epochs=3))
    assert read_json(first.path / classic.MANIFEST)["settings"]["crf_epochs"] == 3
