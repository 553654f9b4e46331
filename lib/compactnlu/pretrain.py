"""Masked-language-model pre-training of the from-scratch encoder on the training text.

No pretrained weights can be downloaded here, so the default profile gives its encoder a
short MLM phase on the composed training utterances (the same text the tokenizer was
trained on; no dev or test text) before any task training. Baseline, teachers and
student all start from this one encoder, so the comparison between them stays fair.

The prediction head scores only the masked positions, which is where a small model's
time would otherwise go (the vocabulary projection dwarfs a 128-wide encoder).

The pretrained profile's encoder is multilingual-e5-small instead (``compactnlu.e5``): no MLM
phase; ``e5_encoder`` saves its 12 layers with the embedding rows of the study's trimmed tokenizer
once, and each task model loads its first layers from there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (BertConfig, DataCollatorForLanguageModeling, Trainer, XLMRobertaConfig, XLMRobertaModel,
                          set_seed)

from . import e5
from .artifacts import atomic_dir, read_json, seal_folder
from .cachekeys import artifact_dir
from .config import E5_SHAPE, Profile, uses_e5, uses_mlm
from .features import E5_IDS, IGNORE, StudyData
from .trainer import fit_and_save, training_arguments

log = logging.getLogger(__name__)


class MaskedLM(nn.Module):
    """An XLM-R encoder with a tied-embedding MLM head evaluated on masked positions only."""

    def __init__(self, config: XLMRobertaConfig):
        super().__init__()
        self.encoder = XLMRobertaModel(config, add_pooling_layer=False)
        self.transform = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.GELU(),
                                       nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, input_ids, attention_mask, labels=None, **_):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        masked = labels != IGNORE
        scores = self.transform(hidden[masked]) @ self.encoder.embeddings.word_embeddings.weight.T + self.bias
        return {"loss": nn.functional.cross_entropy(scores, labels[masked])}


def encoder_config(profile: Profile, data: StudyData, layers: int | None = None) -> XLMRobertaConfig | BertConfig:
    """The task models' encoder config (e5's, a BertConfig, for the pretrained profile);
    ``layers``: a layer count other than ``num_layers`` (the teachers' ``teacher_layers``)."""
    tok = data.tokenizer
    if uses_e5(profile):  # e5's BERT (compactnlu.e5.build_model) over the trimmed vocabulary
        hidden, heads, ffn, _ = E5_SHAPE
        return BertConfig(
            vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers or profile.num_layers,
            num_attention_heads=heads, intermediate_size=ffn, hidden_act="gelu",
            hidden_dropout_prob=profile.dropout, attention_probs_dropout_prob=profile.dropout,
            max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=tok.pad_token_id)
    return XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=profile.hidden_size, num_hidden_layers=layers or profile.num_layers,
        num_attention_heads=profile.num_heads, intermediate_size=profile.intermediate_size,
        hidden_dropout_prob=profile.dropout, attention_probs_dropout_prob=profile.dropout,
        max_position_embeddings=profile.max_length + tok.pad_token_id + 1,  # XLM-R counts positions from pad + 1
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        type_vocab_size=1)


def pretrained_encoder_dir(profile: Profile) -> Path:
    return artifact_dir(profile, "encoder", "mlm")


def pretrain_encoder(profile: Profile, data: StudyData, retrain: bool = False, **argument_overrides) -> Path:
    """Run (or reuse) the MLM phase; returns a folder ``XLMRobertaModel.from_pretrained`` reads."""
    final = pretrained_encoder_dir(profile)
    if final.exists() and not retrain:
        return final
    set_seed(profile.train_seed)
    model = MaskedLM(encoder_config(profile, data))
    texts = data.features["train"].select_columns(["input_ids", "attention_mask", "n_subwords"])
    args = training_arguments(
        profile, profile.artifacts_dir / "checkpoints" / final.name,
        num_train_epochs=profile.mlm_epochs, learning_rate=profile.mlm_learning_rate,
        per_device_train_batch_size=profile.mlm_batch_size, eval_strategy="no", save_strategy="epoch",
        load_best_model_at_end=False, metric_for_best_model=None, label_names=["labels"],
        **argument_overrides)
    collator = DataCollatorForLanguageModeling(data.tokenizer, mlm_probability=0.15)
    trainer = Trainer(model=model, args=args, train_dataset=texts,
                      data_collator=lambda rows: collator([{k: r[k] for k in ("input_ids", "attention_mask")}
                                                           for r in rows]))
    fit_and_save(trainer, final, model.encoder.save_pretrained)
    return final


def e5_encoder_dir(profile: Profile) -> Path:
    return artifact_dir(profile, "encoder", "e5")


def e5_encoder(profile: Profile, data: StudyData, rebuild: bool = False, path: Path | str | None = None,
               **checks) -> Path:
    """Save (or reuse) e5's 12 layers with the rows of ``data``'s trimmed tokenizer (its E5_IDS) in a
    folder ``BertModel.from_pretrained`` reads; ``path``, ``checks``: another file, as ``e5.read_e5``."""
    final = e5_encoder_dir(profile)
    if final.exists() and not rebuild:
        return final
    old_ids = read_json(Path(data.tokenizer_path) / E5_IDS)["old_ids"]
    if len(old_ids) != len(data.tokenizer):
        raise ValueError(f"{data.tokenizer_path / E5_IDS}: {len(old_ids)} rows for a {len(data.tokenizer)}-id tokenizer")
    model = e5.encoder_from_rows(e5.read_e5(path, **checks), old_ids, data.tokenizer.pad_token_id)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        seal_folder(tmp)
    return final


def prepare_encoder(profile: Profile, data: StudyData) -> None:
    """Make what every task model of ``profile`` starts from, where that is cached: the MLM phase or e5."""
    if uses_mlm(profile):
        pretrain_encoder(profile, data)  # cached: run once, shared by every model of the profile
    elif uses_e5(profile):
        e5_encoder(profile, data)
