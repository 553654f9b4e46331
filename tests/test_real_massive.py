"""The real MASSIVE 1.1 files, when MASSIVE_DIR points at a copy (CI sets it); skipped otherwise."""

import os

import pytest

from compactnlu.config import LOCALES
from compactnlu.massive import load_massive

MASSIVE_DIR = os.environ.get("MASSIVE_DIR")
pytestmark = pytest.mark.skipif(not MASSIVE_DIR or not os.path.isdir(MASSIVE_DIR),
                                reason="MASSIVE_DIR does not point at a MASSIVE copy")


@pytest.fixture(scope="module")
def records():
    # verify=True: every locale file must match the official SHA-256
    return load_massive(MASSIVE_DIR, LOCALES, verify=True, allow_download=False).to_pandas()


def test_official_partition_sizes(records):
    sizes = records.groupby(["locale", "partition"]).size().unstack()
    assert set(sizes.index) == set(LOCALES)
    assert (sizes["train"] == 11514).all() and (sizes["dev"] == 2033).all() and (sizes["test"] == 2974).all()


def test_label_spaces(records):
    slot_types = {t[2:] for tags in records["tags"] for t in tags if t != "O"}
    assert records["intent"].nunique() == 60
    assert records["scenario"].nunique() == 18
    assert len(slot_types) == 55


def test_every_record_parses_into_words_that_rebuild_the_utterance(records):
    assert (records["words"].map(" ".join) == records["utt"]).all()
    assert (records["words"].map(len) == records["tags"].map(len)).all()
