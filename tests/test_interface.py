"""``compactnlu.interface``: the written model interface and the one decision rule.

Every runnable variant (float, static, dynamic, precision-controlled on the fast path, ONNX
Runtime) is an ``NLUModel`` and returns an ``NLUOutput``, which reads like the dict it
replaced; ``decide`` chooses labels with the argmax fallback, and ``infer`` answers a batch
with it: ``metrics.predict``, the benchmark, ``inference.predict`` and ``quant.fast.agreement``
decide alike, also where no label reaches 0.5.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from compactnlu import bench, features, inference, interface, metrics
from compactnlu.compose import LabelSpace
from compactnlu.features import MultiTaskCollator
from compactnlu.interface import (IGNORE, Decisions, NLUModel, NLUOutput, choose_labels, decide, decide_sets, infer,
                                  label_sets)
from compactnlu.metrics import predict
from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.onnx_runtime import OnnxNLU, export_onnx
from compactnlu.quant import apply_policy, precision_groups, quantize_dynamic, quantize_static
from compactnlu.quant.fast import agreement, to_fast

ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
LABELS = LabelSpace(intents=("i0", "i1", "i2", "i3"), scenarios=("d0", "d1", "d2"), slot_types=("a", "b"))
COLLATOR = MultiTaskCollator(pad_token_id=1, n_intents=len(LABELS.intents), n_scenarios=len(LABELS.scenarios))


def make_model() -> MultiTaskNLU:
    """A toy model whose intent logits are spread and shifted down so that some examples have
    no intent at 0.5 (the fallback decides them) and others have one or more."""
    torch.manual_seed(0)
    model = MultiTaskNLU(NLUConfig(n_intents=len(LABELS.intents), n_domains=len(LABELS.scenarios),
                                   tags=LABELS.tags, encoder=dict(ENCODER))).eval()
    with torch.no_grad():
        model.id_head.weight *= 10
        model.id_head.bias -= 1.0
        for p in model.crf.parameters():  # trained-looking transitions: Viterbi is not the argmax path
            p.copy_(torch.randn(p.shape) * 2)
    return model


def tiny_dataset(n: int = 24) -> datasets.Dataset:
    """Study-style examples of 2-8 words, some words of two subwords."""
    rng = np.random.default_rng(5)
    rows = []
    for k in range(n):
        ids, slot_labels, tags = [0], [IGNORE], []
        for _ in range(int(rng.integers(2, 9))):
            tag, pieces = int(rng.integers(len(LABELS.tags))), int(rng.integers(1, 3))
            tags.append(LABELS.tags[tag])
            ids += rng.integers(3, ENCODER["vocab_size"], pieces).tolist()
            slot_labels += [tag] + [IGNORE] * (pieces - 1)
        ids, slot_labels = ids + [2], slot_labels + [IGNORE]
        rows.append(dict(uid=str(k), locale="hi-IN", n_parts=1, intents=["i0"], scenarios=["d0"], tags=tags,
                         input_ids=ids, slot_labels=slot_labels, n_subwords=len(ids), intent_ids=[0],
                         scenario_ids=[0]))
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


def batch_of(dataset, rows) -> dict:
    return COLLATOR([dataset[int(i)] for i in rows])


# ---------------------------------------------------------------- the typed output

def test_output_reads_like_the_dict_it_replaced(model, dataset):
    batch = batch_of(dataset, range(4))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert isinstance(out, NLUOutput) and isinstance(out, dict)  # the Trainer takes outputs["loss"] of a dict
    assert set(out) == {"intent_logits", "domain_logits", "slot_logits", "hidden", "pooled"}
    assert "loss" not in out and out.loss is None and out.losses is None
    assert out["intent_logits"] is out.intent_logits and out.intent_logits.shape == (4, len(LABELS.intents))
    trained = model(**batch)
    assert set(trained.losses) == {"id", "dc", "sf"} and trained["loss"] is trained.loss
    assert trained.loss.item() == pytest.approx(sum(v.item() for v in trained.losses.values()), rel=1e-6)


def test_a_task_pair_model_leaves_the_missing_logits_out(dataset):
    torch.manual_seed(0)
    pair = MultiTaskNLU(NLUConfig(n_intents=4, n_domains=3, tags=LABELS.tags, tasks=("id", "sf"),
                                  encoder=dict(ENCODER))).eval()
    batch = batch_of(dataset, range(3))
    out = pair(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.domain_logits is None and "domain_logits" not in out
    decisions = decide(out, batch["slot_labels"] != IGNORE, pair)
    assert decisions.domains is None and decisions.intents.shape == (3, 4) and len(decisions.slots) == 3


# ---------------------------------------------------------------- every variant satisfies the protocol

def variants(model, dataset, tmp_path) -> dict:
    batches = [batch_of(dataset, range(0, 8))]
    groups = precision_groups(model, per_layer=True, embedding=True)
    precision = apply_policy(model, {g: 8 for g in groups}, groups).eval()
    return {"float": model, "dynamic": quantize_dynamic(model), "static": quantize_static(model, batches, 1)[0],
            "precision": precision, "fast": to_fast(precision, "dequant"),
            "onnx": OnnxNLU.load(export_onnx(model, tmp_path / "onnx"), threads=1)}


def test_every_variant_is_an_nlu_model_returning_an_nlu_output(model, dataset, tmp_path):
    batch = batch_of(dataset, range(8, 16))
    word_mask = batch["slot_labels"] != IGNORE
    for name, variant in variants(model, dataset, tmp_path).items():
        assert isinstance(variant, NLUModel), name
        assert variant.eval() is variant and variant.tasks == ("id", "dc", "sf"), name
        out = variant(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert isinstance(out, NLUOutput), name
        assert out.slot_logits.shape[:2] == batch["input_ids"].shape, name
        assert [len(p) for p in variant.decode_slots(out.slot_logits, word_mask)] == word_mask.sum(1).tolist()


def test_an_object_without_decode_slots_is_not_an_nlu_model():
    class LogitsOnly(torch.nn.Module):
        tasks = ("id",)

        def forward(self, input_ids, attention_mask):
            return NLUOutput(intent_logits=torch.zeros(len(input_ids), 2))

    assert not isinstance(LogitsOnly(), NLUModel)


# ---------------------------------------------------------------- one decision rule

def test_choose_labels_falls_back_to_the_first_most_probable_label():
    probs = torch.tensor([[0.2, 0.4, 0.4], [0.6, 0.1, 0.5], [0.1, 0.1, 0.1]])
    assert choose_labels(probs).tolist() == [[False, True, False], [True, False, True], [True, False, False]]
    assert label_sets(choose_labels(probs, 0.55)) == [[1], [0], [0]]
    assert probs[0].tolist() == pytest.approx([0.2, 0.4, 0.4])  # the input is left as it is
    assert decide_sets(probs.double().numpy(), 0.5) == [[1], [0, 2], [0]]


def test_every_caller_makes_the_same_decisions(model, dataset):
    """``metrics.predict`` (what is scored) and the benchmark's pass (what is timed) give
    ``decide``'s decisions, on examples that reach 0.5 and on examples that do not."""
    rows = list(range(len(dataset)))
    batch = batch_of(dataset, rows)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = decide(out, batch["slot_labels"] != IGNORE, model)
    below = (torch.sigmoid(out.intent_logits) < 0.5).all(1)
    assert below.any() and not below.all(), "the test needs examples decided by the fallback and by 0.5"

    # one batch each, so that every caller pads as ``want``'s batch does
    scored = predict(model, dataset, COLLATOR, LABELS, batch_size=len(rows))
    assert [[LABELS.intents.index(x) for x in r] for r in scored.intents_pred] == label_sets(want.intents)
    assert [[LABELS.scenarios.index(x) for x in r] for r in scored.scenarios_pred] == label_sets(want.domains)
    assert [[LABELS.tags.index(t) for t in r] for r in scored.tags_pred] == want.slots

    order = np.argsort(np.asarray(dataset["n_subwords"]), kind="stable")  # prepared_batches' order
    timed = [infer(model, b)[1] for b in bench.prepared_batches(dataset, COLLATOR, len(rows))]
    intents = torch.cat([d.intents for d in timed])
    assert torch.equal(intents, want.intents[order])
    assert torch.equal(torch.cat([d.domains for d in timed]), want.domains[order])
    assert [p for d in timed for p in d.slots] == [want.slots[i] for i in order]


def with_intent_bias(model, bias) -> MultiTaskNLU:
    """A copy whose intent logits are ``bias`` for every example (no label reaches 0.5)."""
    copy = make_model()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.id_head.weight.zero_()
        copy.id_head.bias.copy_(torch.tensor(bias))
    return copy


def test_agreement_compares_the_fallback_decisions(model, dataset):
    """Two models with no intent at 0.5 anywhere: the same top intent agrees, another top
    intent does not (comparing thresholded sets alone, both would be empty and "agree")."""
    batches = [batch_of(dataset, range(s, s + 8)) for s in (0, 8, 16)]
    reference = with_intent_bias(model, [-3.0, -1.0, -2.0, -2.0])
    same_top = agreement(reference, with_intent_bias(model, [-3.0, -1.0, -2.0, -2.5]), batches)
    other_top = agreement(reference, with_intent_bias(model, [-3.0, -2.0, -1.0, -2.0]), batches)
    assert same_top["same_id"] == 1.0 and other_top["same_id"] == 0.0
    assert same_top["max_abs_diff:intent_logits"] == pytest.approx(0.5)
    assert same_top["same_dc"] == other_top["same_dc"] == 1.0 and same_top["same_sf"] == 1.0


# ---------------------------------------------------------------- one way from a batch to its answers

def test_every_prediction_path_answers_through_infer():
    """Scoring, timing and the one-utterance helper share one engine, so none can drift."""
    assert metrics.infer is bench.infer is inference.infer is infer


def test_infer_passes_labels_for_the_loss_and_nothing_else(model, dataset):
    batch = batch_of(dataset, range(6))
    batch["word_mask"] = batch["slot_labels"] != IGNORE
    timed, decisions = infer(model, batch)
    scored, same = infer(model, batch, slot_labels=batch["slot_labels"], intent_labels=batch["intent_labels"],
                         domain_labels=batch["domain_labels"])
    assert timed.loss is None and scored.loss.item() == pytest.approx(model(**batch).loss.item())
    assert torch.equal(decisions.intents, same.intents) and decisions.slots == same.slots
    assert decisions.slots == decide(timed, batch["word_mask"], model).slots


def test_named_decisions_read_label_names_and_count_cut_words_as_o():
    decisions = Decisions(intents=torch.tensor([[True, False, True], [False, True, False]]),
                          slots=[[1, 2], [0]])
    rows = decisions.named(("a", "b", "c"), ("x", "y"), ("O", "B-t", "I-t"), n_words=[2, 3])
    assert rows == [{"intents": ["a", "c"], "tags": ["B-t", "I-t"]},
                    {"intents": ["b"], "tags": ["O", "O", "O"]}]  # no domains head: no domains


def test_ignore_is_the_label_the_features_write():
    assert interface.IGNORE == features.IGNORE
