"""Shared by the eager quantization tests (``test_quant``, ``test_static``, ``test_dynamic``) and
others that need a tiny model: the model and batch builders, a method-dispatching ``quantize``,
the logits compared, a one-linear module, and the checks on scales and error bounds."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd

from compactnlu.model import MultiTaskNLU, NLUConfig
from compactnlu.quant import quantize_dynamic, quantize_static


ENCODER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
TAGS = ("O", "B-a", "I-a", "B-b", "I-b")
LOGITS = ("intent_logits", "domain_logits", "slot_logits")
METHODS = ("static", "dynamic")
SPIKE_TOKEN = 45  # its embedding row is made a spike so that a batch holding it has extreme activations


def make_model(seed=0, **encoder) -> MultiTaskNLU:
    torch.manual_seed(seed)
    config = NLUConfig(n_intents=4, n_domains=3, tags=TAGS, tasks=("id", "dc", "sf"), encoder={**ENCODER, **encoder})
    return MultiTaskNLU(config).eval()


def make_batch(seed: int, rows=3, length=7, vocab=ENCODER["vocab_size"]) -> dict[str, torch.Tensor]:
    """``<s> tokens </s> <pad>...`` rows of different lengths (token ids 3..vocab-1, never the spike)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), 1)
    for r in range(rows):
        n = length - r  # row r has r pads
        ids[r, 0], ids[r, n - 1] = 0, 2
        body = torch.randint(3, vocab, (n - 2,), generator=g)
        body[body == SPIKE_TOKEN] = 3
        ids[r, 1:n - 1] = body
    return dict(input_ids=ids, attention_mask=(ids != 1).long())


def make_batches(k: int, seed=100, **kw) -> list[dict[str, torch.Tensor]]:
    return [make_batch(seed + i, **kw) for i in range(k)]


def quantize(model, method: str, batches=None, n=2):
    if method == "static":
        quantized, used = quantize_static(model, iter(batches if batches is not None else make_batches(n)), n)
        assert used == n
        return quantized
    return quantize_dynamic(model)


def outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: out[k] for k in LOGITS}


class OneLinear(nn.Module):
    """Calls like MultiTaskNLU (``input_ids``, ``attention_mask``) but is one ``nn.Linear`` on float input."""

    def __init__(self, d_in=16, d_out=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, input_ids, attention_mask=None, **_):
        return self.lin(input_ids)


def check_bound(err: torch.Tensor, bound: torch.Tensor) -> None:
    ratio = err / bound
    assert torch.all(err <= bound), f"error exceeds its bound by up to {float(ratio.max()):.3f}x"
    assert ratio.max() >= 0.01, f"bound too loose to catch anything (max error/bound {float(ratio.max()):.4f})"


def finite_scales(model):
    for name, module in model.named_modules():
        if isinstance(module, nnq.Quantize):
            assert torch.isfinite(module.scale).all() and (module.scale > 0).all(), name
        if isinstance(module, (nnq.Linear, nnqd.Linear)):
            s = module.weight().q_scale()
            assert s > 0 and s == s and s != float("inf"), name
        if isinstance(module, nnq.Linear):
            assert module.scale > 0 and module.scale != float("inf"), name
