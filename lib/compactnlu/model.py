"""The multitask model: an XLM-R (or BERT, for e5) encoder with ID, DC and SF heads (SF with a CRF).

One class serves the baseline (all three tasks) and the task-pair teachers: ``tasks``
says which heads exist. ID and DC are multi-label over the composed utterances (one
sigmoid per label); SF tags the first subword of each word, decoded by a CRF whose
forbidden BIO transitions (start or O -> I-x; B-y or I-y -> I-x for another type y; B-x or
I-x -> B-x, as MASSIVE keeps one slot label per word and reads two adjacent spans of one type
as one) are masked out.

Saved as ``model.safetensors`` plus ``config.json`` (label names, the weights' SHA-256 and its
own); loading runs no pickle, verifies both checksums and validates the config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

from .artifacts import (RERUN, assert_finite, read_json, read_safetensors, verify_checksums,  # noqa: F401
                        with_checksums, without_seal, write_json)
from .interface import IGNORE, NLUOutput

TASKS = ("id", "dc", "sf")
POOLINGS = ("mean", "max", "cls")
WEIGHTS = "model.safetensors"
FORBIDDEN = -1e4
BERT_CHOSEN = ("num_hidden_layers", "hidden_dropout_prob", "attention_probs_dropout_prob")  # the rest: e5's


@dataclass
class NLUConfig:
    n_intents: int
    n_domains: int
    tags: tuple[str, ...]
    tasks: tuple[str, ...] = TASKS
    loss_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    pooling: str = "mean"  # "mean" or "max" over tokens, or "cls" (XLM-R's pooler on <s>)
    encoder: dict = field(default_factory=dict)  # XLMRobertaConfig fields; BertConfig's with "model_type": "bert"
    pretrained: str | None = None  # load the encoder with from_pretrained (name or path)
    # The names behind the intent and domain outputs, in output order (empty: not recorded), so
    # a saved model maps its outputs to labels without the data beside it.
    intents: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        self.tasks = tuple(t for t in TASKS if t in self.tasks)
        if unknown or not self.tasks:
            raise ValueError(f"a model needs one or more of the tasks {TASKS}, got {unknown or 'none'}")
        if isinstance(self.tags, str):
            raise ValueError(f"tags must be a list of BIO tags, got the string {self.tags!r}")
        self.tags = tuple(self.tags)
        _check_bio(self.tags)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("n_intents", "n_domains"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, count in (("intents", self.n_intents), ("domains", self.n_domains)):
            names = getattr(self, name)
            if isinstance(names, str) or not all(isinstance(n, str) for n in names) or \
                    names and (len(names) != count or len(set(names)) != count):
                raise ValueError(f"{name} must name each of the {count} outputs once, got {names!r}")
            setattr(self, name, tuple(names))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "NLUConfig":
        return cls(**without_seal(json.loads(text)))  # a saved config.json also records SHA-256s

    @classmethod
    def read(cls, path: Path | str) -> "NLUConfig":
        """The config saved in ``path``; invalid JSON, a missing or unknown field or a bad value
        is a ValueError naming the file."""
        fields = read_json(path)
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: a model config is a JSON object, not {type(fields).__name__}")
        try:
            return cls(**without_seal(fields))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: invalid model config: {error}") from None

    def check_labels(self, labels, source: Path | str) -> None:
        """Refuse a model for another label space: ``labels`` (the data's ``LabelSpace``) must give
        the same tags in the same order, as many intents and domains and, where the config
        records their names, the same names in the same order. ``source`` names the config."""
        problems = []
        if self.tags != tuple(labels.tags):
            problems.append(f"tags {list(self.tags)}, the data's are {list(labels.tags)}")
        for name, data_labels in (("intents", labels.intents), ("domains", labels.scenarios)):
            count, names = getattr(self, f"n_{name}"), getattr(self, name)
            if count != len(data_labels):
                problems.append(f"n_{name}={count}, the data has {len(data_labels)}")
            elif names and names != tuple(data_labels):
                i = next(i for i, (a, b) in enumerate(zip(names, data_labels)) if a != b)
                problems.append(f"{name} differ from the data's at position {i} ({names[i]!r}, the data's {data_labels[i]!r})")
        if problems:
            raise ValueError(f"{source} does not fit the data's labels: {'; '.join(problems)}; {RERUN}")


def _check_bio(tags: tuple[str, ...]) -> None:
    """BIO tags are one "O" plus a B-x and an I-x for each slot type x, nothing repeated."""
    if any(not isinstance(t, str) for t in tags) or len(set(tags)) != len(tags) or tags.count("O") != 1:
        raise ValueError(f"tags must hold \"O\" once and no tag twice, got {list(tags)}")
    slots = [t for t in tags if t != "O"]
    malformed = [t for t in slots if t[:2] not in ("B-", "I-") or len(t) == 2]
    begins, insides = {t[2:] for t in slots if t.startswith("B-")}, {t[2:] for t in slots if t.startswith("I-")}
    unpaired = sorted(begins ^ insides)
    if malformed or unpaired:
        raise ValueError(f"tags must be \"O\" plus B-x/I-x pairs: malformed {malformed}, unpaired slot types "
                         f"{unpaired}")


def bio_transition_mask(tags: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (allowed) matrices: ``[from, to]`` transitions and start -> tag.

    After B-x or I-x a word of type x must be I-x: MASSIVE's official scoring keeps one label
    per word, so it would read B-x B-x as one span where seqeval reads two.
    """
    n = len(tags)
    allowed = torch.ones(n, n, dtype=torch.bool)
    start = torch.ones(n, dtype=torch.bool)
    for j, to in enumerate(tags):
        if to == "O":
            continue
        start[j] = to.startswith("B-")
        for i, frm in enumerate(tags):
            same_type = frm != "O" and frm[2:] == to[2:]
            allowed[i, j] = same_type if to.startswith("I-") else not same_type
    return allowed, start


def viterbi_order(tags: tuple[str, ...]) -> torch.Tensor:
    """The tag order ``BIOCRF.decode`` computes in: O, then every B-x, then every I-x in the
    same order as its B-x, so that each I-x sits ``n`` places after its B-x (``n`` slot types)."""
    begins = [j for j, tag in enumerate(tags) if tag.startswith("B-")]
    inside = {tag[2:]: j for j, tag in enumerate(tags) if tag.startswith("I-")}
    return torch.tensor([tags.index("O")] + begins + [inside[tags[j][2:]] for j in begins], dtype=torch.long)


class BIOCRF(nn.Module):
    """A linear-chain CRF over BIO tags; transitions that break BIO (``bio_transition_mask``)
    are fixed at -1e4.

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
        self.register_buffer("viterbi_order", viterbi_order(tags), persistent=False)

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
        # transitions by their column maximum keeps every exponent at most 0. A tag whose every
        # allowed way in is over ~87 below the row's best underflows that product to 0; such a
        # step (never seen with the study's trained emissions) is redone by the logsumexp.
        column_top = trans.max(dim=0, keepdim=True).values
        exp_trans = (trans - column_top).exp()
        tiny = torch.finfo(emissions.dtype).tiny
        alpha = start + emissions[:, 0]
        for t in range(1, tags.shape[1]):
            top = alpha.max(dim=1, keepdim=True).values
            summed = (alpha - top).exp() @ exp_trans
            nxt = torch.log(summed.clamp_min(tiny)) + top + column_top + emissions[:, t]
            underflow = summed < tiny
            if underflow.any():
                exact = torch.logsumexp(alpha.unsqueeze(2) + trans, dim=1) + emissions[:, t]
                nxt = torch.where(underflow, exact, nxt)
            alpha = torch.where(mask[:, t].unsqueeze(1), nxt, alpha)
        return torch.logsumexp(alpha + self.end_transitions, dim=1) - gold

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi: the best tag sequence of each row, as many tags as the row has words.

        The forward pass keeps only the best score of each tag at each word, ``[B, W, T]``: the
        indices of a max over ``[B, T, T]`` cost as much again as its values. BIO makes half the
        tags cheap: an I-x follows only B-x or I-x (``bio_transition_mask``), so its best score is
        the larger of two sums, and only O and the B-x take a max over every tag, over the last,
        contiguous axis. In ``viterbi_order`` those two predecessors are two slices. The
        backtrace recovers each row's best previous tag from those scores, one ``[B, T]`` argmax
        per word over every tag in the tags' own order, so it picks the same tag as a full max
        would (the first best).
        """
        trans, start = self._scores()
        emissions = emissions.float()
        batch, width, n_tags = emissions.shape
        order = self.viterbi_order
        n = (n_tags - 1) // 2  # slot types: O, then n B-x, then n I-x
        moves = trans[order][:, order]
        into_dense = moves[:, :n + 1].t().contiguous()  # [1 + n, T]: every move into O and each B-x
        from_begin, from_inside = moves[1:n + 1, n + 1:].diagonal(), moves[n + 1:, n + 1:].diagonal()
        ordered = emissions.index_select(2, order)
        scores = torch.empty(batch, width, n_tags, dtype=emissions.dtype, device=emissions.device)
        scores[:, 0] = start[order] + ordered[:, 0]
        for t in range(1, width):
            before = scores[:, t - 1]
            best = torch.cat(((before.unsqueeze(1) + into_dense).amax(2),
                              torch.maximum(before[:, 1:n + 1] + from_begin, before[:, n + 1:] + from_inside)), dim=1)
            # past a row's end its scores stay as they were at its last word
            scores[:, t] = torch.where(mask[:, t].unsqueeze(1), best + ordered[:, t], before)
        scores = scores.index_select(2, torch.argsort(order))  # back to the tags' order for the backtrace
        into = trans.t().contiguous()  # into[j]: the score of every move into tag j
        path = torch.empty(batch, width, dtype=torch.long, device=emissions.device)
        path[:, -1] = (scores[:, -1] + self.end_transitions).argmax(1)
        for t in range(width - 1, 0, -1):
            tag = path[:, t]
            before = (scores[:, t - 1] + into.index_select(0, tag)).argmax(1)
            path[:, t - 1] = torch.where(mask[:, t], before, tag)  # past a row's end: its last tag
        # one transfer to Python for the whole batch, not one per word
        return [row[:n] for row, n in zip(path.tolist(), mask.sum(1).tolist())]


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
        if config.encoder.get("model_type") == "bert":  # e5 (pretrain.e5_encoder): the folder's first layers
            pooler, chosen = config.pooling == "cls", {k: config.encoder[k] for k in BERT_CHOSEN if k in config.encoder}
            self.encoder = BertModel.from_pretrained(config.pretrained, add_pooling_layer=pooler, **chosen) \
                if config.pretrained else BertModel(BertConfig(**config.encoder), add_pooling_layer=pooler)
            config.encoder = self.encoder.config.to_diff_dict()
        elif config.pretrained:
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
                slot_labels=None, **_) -> NLUOutput:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        pooled = self.dropout(self.pooled(hidden, attention_mask, out.pooler_output))
        result = NLUOutput(hidden=hidden, pooled=pooled)
        losses = {}
        if "id" in self.tasks:
            result.intent_logits = self.id_head(pooled)
            if intent_labels is not None:
                losses["id"] = nn.functional.binary_cross_entropy_with_logits(result.intent_logits, intent_labels)
        if "dc" in self.tasks:
            result.domain_logits = self.dc_head(pooled)
            if domain_labels is not None:
                losses["dc"] = nn.functional.binary_cross_entropy_with_logits(result.domain_logits, domain_labels)
        if "sf" in self.tasks:
            emissions = self.sf_head(self.dropout(hidden))
            result.slot_logits = emissions
            if slot_labels is not None:
                if word_mask is None:
                    word_mask = slot_labels != IGNORE
                packed, mask = pack_words(emissions, word_mask)
                gold, _ = pack_words(slot_labels.clamp(min=0), word_mask)
                losses["sf"] = self.crf.nll(packed, gold, mask).sum() / mask.sum()
        if losses:
            result.losses = losses
            result.loss = sum(self.config.loss_weights.get(t, 1.0) * v for t, v in losses.items())
        return result

    def decode_slots(self, slot_logits: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        """Viterbi tag ids of each example's words."""
        packed, mask = pack_words(slot_logits, word_mask)
        return self.crf.decode(packed, mask=mask)

    # ------------------------------------------------------------ persistence
    def save(self, folder: Path | str) -> None:
        """``model.safetensors`` and ``config.json``, which records the weights' SHA-256."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        assert_finite(state, f"saving {folder}")  # never write what load would refuse
        save_file(state, folder / WEIGHTS)
        write_json(folder / "config.json", with_checksums(asdict(self.config), folder, [WEIGHTS]))

    @classmethod
    def load(cls, folder: Path | str, labels=None) -> "MultiTaskNLU":
        """The model saved in ``folder``, its config and weights checked against the recorded SHA-256
        and its weights for NaN/inf. ``labels``, the data's ``LabelSpace``, makes a model for other labels an error."""
        folder = Path(folder)
        config_file = folder / "config.json"
        verify_checksums(config_file, [WEIGHTS])  # the config too: an edited one is refused before it is read
        config = NLUConfig.read(config_file)
        if labels is not None:
            config.check_labels(labels, config_file)
        state = read_safetensors(folder / WEIGHTS)
        assert_finite(state, str(folder / WEIGHTS))
        config.pretrained = None  # the weights below replace whatever from_pretrained would load
        model = cls(config)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{folder / WEIGHTS} does not fit {config_file}: {error}") from None
        return model.eval()
