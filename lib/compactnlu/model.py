"""The multitask model: an XLM-R encoder with ID, DC and SF heads (SF with a CRF).

One class serves the baseline (all three tasks) and the task-pair teachers: ``tasks``
says which heads exist. ID and DC are multi-label over the composed utterances (one
sigmoid per label); SF tags the first subword of each word, decoded by a CRF whose
forbidden BIO transitions (O -> I-x, B-x -> I-y, start -> I-x) are masked out.

Saved as ``model.safetensors`` plus ``config.json``; loading runs no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel

TASKS = ("id", "dc", "sf")
FORBIDDEN = -1e4


@dataclass
class NLUConfig:
    n_intents: int
    n_domains: int
    tags: tuple[str, ...]
    tasks: tuple[str, ...] = TASKS
    loss_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    pooling: str = "mean"  # "mean" or "max" over tokens, or "cls" (XLM-R's pooler on <s>)
    encoder: dict = field(default_factory=dict)  # XLMRobertaConfig fields
    pretrained: str | None = None  # load the encoder with from_pretrained (name or path)

    def __post_init__(self):
        self.tasks = tuple(t for t in TASKS if t in self.tasks)
        self.tags = tuple(self.tags)
        if not self.tasks:
            raise ValueError("a model needs at least one of the tasks id, dc, sf")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "NLUConfig":
        return cls(**json.loads(text))


def bio_transition_mask(tags: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (allowed) matrices: ``[from, to]`` transitions and start -> tag."""
    n = len(tags)
    allowed = torch.ones(n, n, dtype=torch.bool)
    start = torch.ones(n, dtype=torch.bool)
    for j, to in enumerate(tags):
        if not to.startswith("I-"):
            continue
        start[j] = False
        for i, frm in enumerate(tags):
            allowed[i, j] = frm[2:] == to[2:] and frm != "O"
    return allowed, start


class BIOCRF(nn.Module):
    """A linear-chain CRF over BIO tags; transitions that break BIO are fixed at -1e4.

    pytorch-crf has no way to constrain transitions, and the constraint is what makes
    every decoded sequence BIO-consistent, so the few lines are written here.
    """

    def __init__(self, tags: tuple[str, ...]):
        super().__init__()
        n = len(tags)
        self.transitions = nn.Parameter(torch.zeros(n, n))
        self.start_transitions = nn.Parameter(torch.zeros(n))
        self.end_transitions = nn.Parameter(torch.zeros(n))
        allowed, start = bio_transition_mask(tags)
        self.register_buffer("transition_penalty", (~allowed).float() * FORBIDDEN, persistent=False)
        self.register_buffer("start_penalty", (~start).float() * FORBIDDEN, persistent=False)

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transitions + self.transition_penalty, self.start_transitions + self.start_penalty

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each sequence: emissions ``[B, W, T]``, tags and mask ``[B, W]``."""
        trans, start = self._scores()
        emissions = emissions.float()
        on = mask.to(emissions.dtype)
        # Score of the gold path, all positions at once.
        emitted = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)
        moved = trans[tags[:, :-1], tags[:, 1:]]
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        gold = start[tags[:, 0]] + (emitted * on).sum(1) + (moved * on[:, 1:]).sum(1) + self.end_transitions[last]
        # Log-partition by the forward algorithm; each step is a matrix product in exp space,
        # far cheaper than a [B, T, T] logsumexp. Shifting alpha by its row maximum and the
        # transitions by their column maximum keeps every exponent at most 0.
        column_top = trans.max(dim=0, keepdim=True).values
        exp_trans = (trans - column_top).exp()
        tiny = torch.finfo(emissions.dtype).tiny
        alpha = start + emissions[:, 0]
        for t in range(1, tags.shape[1]):
            top = alpha.max(dim=1, keepdim=True).values
            nxt = torch.log(((alpha - top).exp() @ exp_trans).clamp_min(tiny)) + top + column_top + emissions[:, t]
            alpha = torch.where(mask[:, t].unsqueeze(1), nxt, alpha)
        return torch.logsumexp(alpha + self.end_transitions, dim=1) - gold

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi: the best tag sequence of each row, as many tags as the row has words."""
        trans, start = self._scores()
        emissions = emissions.float()
        score = start + emissions[:, 0]
        history = []
        for t in range(1, emissions.shape[1]):
            best, idx = (score.unsqueeze(2) + trans.unsqueeze(0)).max(dim=1)
            nxt = best + emissions[:, t]
            on = mask[:, t].unsqueeze(1)
            score = torch.where(on, nxt, score)
            history.append(torch.where(on, idx, torch.arange(score.shape[1], device=score.device)))
        score = score + self.end_transitions
        best_last = score.argmax(1)
        lengths = mask.sum(1).tolist()
        paths = [[int(b)] for b in best_last]
        for idx in reversed(history):  # steps past a row's end point back to the same tag
            prev = idx.gather(1, torch.tensor([p[-1] for p in paths], device=idx.device).unsqueeze(1)).squeeze(1)
            for row, tag in enumerate(prev.tolist()):
                paths[row].append(tag)
        return [list(reversed(p))[:n] for p, n in zip(paths, lengths)]


def pack_words(token_values: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the first-subword positions of each row to the front: ``[B, W, ...]`` and a mask."""
    lengths = word_mask.sum(1)
    width = max(int(lengths.max()), 1)
    order = torch.argsort((~word_mask).to(torch.int8), dim=1, stable=True)[:, :width]
    index = order.view(*order.shape, *([1] * (token_values.dim() - 2))).expand(-1, -1, *token_values.shape[2:])
    packed = token_values.gather(1, index)
    mask = torch.arange(width, device=word_mask.device)[None, :] < lengths[:, None]
    return packed, mask


class MultiTaskNLU(nn.Module):
    def __init__(self, config: NLUConfig):
        super().__init__()
        self.config = config
        if config.pretrained:
            self.encoder = XLMRobertaModel.from_pretrained(config.pretrained, add_pooling_layer=config.pooling == "cls")
            config.encoder = self.encoder.config.to_diff_dict()
        else:
            self.encoder = XLMRobertaModel(XLMRobertaConfig(**config.encoder), add_pooling_layer=config.pooling == "cls")
        hidden = self.encoder.config.hidden_size
        drop = self.encoder.config.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        if "id" in config.tasks:
            self.id_head = nn.Linear(hidden, config.n_intents)
        if "dc" in config.tasks:
            self.dc_head = nn.Linear(hidden, config.n_domains)
        if "sf" in config.tasks:
            self.sf_head = nn.Linear(hidden, len(config.tags))
            self.crf = BIOCRF(config.tags)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.config.tasks

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pooler_output) -> torch.Tensor:
        if self.config.pooling == "cls":
            return pooler_output
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.config.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids, attention_mask, word_mask=None, intent_labels=None, domain_labels=None,
                slot_labels=None, **_):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        pooled = self.dropout(self.pooled(hidden, attention_mask, out.pooler_output))
        result = {"hidden": hidden, "pooled": pooled}
        losses = {}
        weights = self.config.loss_weights
        if "id" in self.tasks:
            result["intent_logits"] = self.id_head(pooled)
            if intent_labels is not None:
                losses["id"] = nn.functional.binary_cross_entropy_with_logits(result["intent_logits"], intent_labels)
        if "dc" in self.tasks:
            result["domain_logits"] = self.dc_head(pooled)
            if domain_labels is not None:
                losses["dc"] = nn.functional.binary_cross_entropy_with_logits(result["domain_logits"], domain_labels)
        if "sf" in self.tasks:
            emissions = self.sf_head(self.dropout(hidden))
            result["slot_logits"] = emissions
            if slot_labels is not None:
                if word_mask is None:
                    word_mask = slot_labels != -100
                packed, mask = pack_words(emissions, word_mask)
                gold, _ = pack_words(slot_labels.clamp(min=0), word_mask)
                losses["sf"] = self.crf.nll(packed, gold, mask).sum() / mask.sum()
        if losses:
            result["losses"] = losses
            result["loss"] = sum(weights.get(t, 1.0) * v for t, v in losses.items())
        return result

    def decode_slots(self, slot_logits: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        """Viterbi tag ids of each example's words."""
        packed, mask = pack_words(slot_logits, word_mask)
        return self.crf.decode(packed, mask=mask)

    # ------------------------------------------------------------ persistence
    def save(self, folder: Path | str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(self.config.to_json())

    @classmethod
    def load(cls, folder: Path | str) -> "MultiTaskNLU":
        folder = Path(folder)
        config = NLUConfig.from_json((folder / "config.json").read_text())
        config.pretrained = None  # the weights below replace whatever from_pretrained would load
        model = cls(config)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval()
