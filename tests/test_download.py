"""Download, extract and verify MASSIVE, against a small tarball made by the test."""

from __future__ import annotations

import io
import re
import tarfile
import urllib.error

import pytest

from compactnlu.config import GLOSS_LOCALE, LOCALES
from compactnlu.massive_download import (
    MASSIVE_LOCALES, OFFICIAL_SHA256, TARBALL_NAME, ArchiveError, download, locate, safe_extract,
)

from conftest import files_under, locale_bytes, make_tarball, sha256_bytes

HI = locale_bytes("hi-IN", 3)
BN = locale_bytes("bn-BD", 4)
CHECKSUMS = {"hi-IN": sha256_bytes(HI), "bn-BD": sha256_bytes(BN)}


@pytest.fixture
def tarball(tmp_path):
    """``amazon-massive-dataset-1.1.tar.gz`` with two locales, in a folder of its own."""
    return make_tarball(tmp_path / "release" / TARBALL_NAME,
                        {"1.1/data/hi-IN.jsonl": HI, "1.1/data/bn-BD.jsonl": BN})


def test_locate_extracts_the_tarball_and_verifies(tarball):
    root = tarball.parent
    paths = locate(root, ["hi-IN"], checksums=CHECKSUMS)
    assert paths == {"hi-IN": root / "1.1" / "data" / "hi-IN.jsonl"}
    assert paths["hi-IN"].read_bytes() == HI
    # Only the requested locale is extracted.
    assert not (root / "1.1" / "data" / "bn-BD.jsonl").exists()


def test_locate_extracts_a_second_locale_later(tarball):
    root = tarball.parent
    locate(root, ["hi-IN"], checksums=CHECKSUMS)
    paths = locate(root, ["hi-IN", "bn-BD"], checksums=CHECKSUMS)
    assert paths["bn-BD"].read_bytes() == BN
    assert paths["hi-IN"].read_bytes() == HI


def test_locate_downloads_when_nothing_is_there(tarball, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    paths = locate(root, ["hi-IN", "bn-BD"], url="file://" + str(tarball), checksums=CHECKSUMS)
    assert (root / TARBALL_NAME).read_bytes() == tarball.read_bytes()
    assert not list(root.rglob("*.part"))
    assert paths == {"hi-IN": root / "1.1" / "data" / "hi-IN.jsonl",
                     "bn-BD": root / "1.1" / "data" / "bn-BD.jsonl"}
    assert paths["bn-BD"].read_bytes() == BN


def test_download_of_a_missing_url_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / TARBALL_NAME
    with pytest.raises(urllib.error.URLError):
        download("file://" + str(tmp_path / "no-such-file.tar.gz"), dest)
    assert not dest.exists()
    assert not list((tmp_path / "out").glob("*.part"))


def test_wrong_checksum_names_the_file(tarball):
    root = tarball.parent
    wrong = dict(CHECKSUMS, **{"hi-IN": "0" * 64})
    with pytest.raises(ValueError) as info:
        locate(root, ["hi-IN"], checksums=wrong)
    message = str(info.value)
    assert str(root / "1.1" / "data" / "hi-IN.jsonl") in message
    assert CHECKSUMS["hi-IN"] in message and "0" * 64 in message


def test_official_checksums_are_the_default(tarball):
    # Our made-up file cannot match the official sum of hi-IN.
    with pytest.raises(ValueError, match="does not match"):
        locate(tarball.parent, ["hi-IN"])
    assert locate(tarball.parent, ["hi-IN"], verify=False)["hi-IN"].is_file()


def test_verify_without_a_known_checksum_warns(tarball, caplog):
    with caplog.at_level("WARNING", logger="compactnlu.massive_download"):
        paths = locate(tarball.parent, ["hi-IN"], checksums={})
    assert paths["hi-IN"].is_file()
    assert any("no known SHA-256" in r.getMessage() for r in caplog.records)


def test_unknown_locale_in_the_tarball_lists_the_available_ones(tarball):
    with pytest.raises(ValueError, match=re.escape("unknown locale(s) xx-XX")) as info:
        locate(tarball.parent, ["hi-IN", "xx-XX"], checksums=CHECKSUMS)
    assert "available: bn-BD, hi-IN" in str(info.value)
    assert not (tarball.parent / "1.1").exists()


@pytest.mark.parametrize("name, hint", [("xx-XX", ""), ("hi-in", " (did you mean hi-IN?)"),
                                        ("ta_IN", " (did you mean ta-IN?)")])
def test_unknown_locale_is_refused_before_any_download(tmp_path, monkeypatch, name, hint):
    def no_download(*args):
        raise AssertionError("download attempted")

    monkeypatch.setattr("compactnlu.massive_download.download", no_download)
    with pytest.raises(ValueError) as info:
        locate(tmp_path, ["hi-IN", name])
    message = str(info.value)
    assert message.startswith(f"unknown locale(s) {name}{hint}; not downloading")
    assert ", ".join(MASSIVE_LOCALES) in message
    assert list(tmp_path.iterdir()) == []


def test_massive_locales_hold_the_study_locales():
    assert len(MASSIVE_LOCALES) == len(set(MASSIVE_LOCALES)) == 52
    assert set(OFFICIAL_SHA256) <= set(MASSIVE_LOCALES)


def test_a_locale_with_the_wrong_case_gets_a_hint(tarball, tmp_path):
    with pytest.raises(ValueError, match=re.escape("unknown locale(s) hi-in (did you mean hi-IN?) in ")):
        locate(tarball.parent, ["hi-in"], checksums=CHECKSUMS)
    with pytest.raises(FileNotFoundError, match=re.escape("hi-in (did you mean hi-IN?)")):
        locate(tmp_path / "nothing", ["hi-in"], allow_download=False)


def test_no_download_and_nothing_there_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="hi-IN"):
        locate(tmp_path, ["hi-IN"], allow_download=False)
    assert list(tmp_path.iterdir()) == []


def test_a_short_download_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    class ShortResponse(io.BytesIO):
        headers = {"Content-Length": "100"}

    monkeypatch.setattr("urllib.request.urlopen", lambda url: ShortResponse(b"only 20 bytes here.."))
    dest = tmp_path / TARBALL_NAME
    with pytest.raises(ArchiveError, match=r"https://example\.org/m\.tar\.gz stopped after 20 of 100 bytes"):
        download("https://example.org/m.tar.gz", dest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_a_truncated_tarball_is_an_error_naming_it(tarball, cut):
    data = tarball.read_bytes()
    tarball.write_bytes(data[:int(len(data) * cut)])
    root = tarball.parent
    with pytest.raises(ArchiveError, match=re.escape(f"{tarball}: truncated or corrupt archive")):
        locate(root, ["hi-IN"], checksums=CHECKSUMS)
    with pytest.raises(ArchiveError, match=re.escape(f"{tarball}: truncated or corrupt archive")):
        safe_extract(tarball, root)
    # Nothing half-extracted is left to count as extracted next time.
    assert list(root.iterdir()) == [tarball]


def test_a_file_that_is_no_archive_is_an_error_naming_it(tmp_path):
    bogus = tmp_path / TARBALL_NAME
    bogus.write_bytes(b"<html>503 Service Unavailable</html>")
    with pytest.raises(ArchiveError, match=re.escape(f"{bogus}: truncated or corrupt archive")):
        locate(tmp_path, ["hi-IN"])


def test_official_checksum_table():
    assert set(OFFICIAL_SHA256) == set(LOCALES) | {GLOSS_LOCALE}
    assert len(OFFICIAL_SHA256) == 7
    for locale, digest in OFFICIAL_SHA256.items():
        assert re.fullmatch(r"[0-9a-f]{64}", digest), locale
    assert len(set(OFFICIAL_SHA256.values())) == 7


# ---------------------------------------------------------------- safe_extract

def _tar_with(path, *infos):
    """A tarball of the given TarInfo members (regular files get a short content)."""
    with tarfile.open(path, "w:gz") as archive:
        for info in infos:
            if info.isfile():
                data = b"evil\n"
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return path


def _symlink(name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def _hardlink(name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "symlink_inside", "hardlink"])
def test_safe_extract_refuses_unsafe_members(tmp_path, kind):
    sandbox = tmp_path / "sandbox"
    target = sandbox / "target"
    target.mkdir(parents=True)
    outside = tmp_path / "abs-evil.txt"
    bad = {
        "parent": tarfile.TarInfo("../evil.txt"),
        "absolute": tarfile.TarInfo(str(outside)),
        "symlink": _symlink("1.1/data/link.jsonl", "/etc/passwd"),
        "symlink_inside": _symlink("1.1/data/link.jsonl", "hi-IN.jsonl"),
        "hardlink": _hardlink("1.1/data/link.jsonl", "1.1/data/hi-IN.jsonl"),
    }[kind]
    tarball = _tar_with(tmp_path / "bad.tar.gz", bad)
    before = files_under(tmp_path)

    with pytest.raises(ValueError, match="refusing|outside") as info:
        safe_extract(tarball, target)

    assert str(tarball) in str(info.value)
    assert files_under(tmp_path) == before
    assert not outside.exists()
    assert not (sandbox / "evil.txt").exists()


def test_safe_extract_checks_every_member_before_writing_any(tmp_path):
    good = tarfile.TarInfo("1.1/data/hi-IN.jsonl")
    tarball = _tar_with(tmp_path / "bad.tar.gz", good, tarfile.TarInfo("../evil.txt"))
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match="outside"):
        safe_extract(tarball, target)
    assert files_under(target) == set()


def test_safe_extract_of_a_member_that_breaks_midway_writes_nothing(tmp_path, monkeypatch):
    tarball = make_tarball(tmp_path / "ok.tar.gz", {"1.1/data/hi-IN.jsonl": HI, "1.1/data/bn-BD.jsonl": BN})
    real_extract = tarfile.TarFile.extract

    def extract_then_fail(self, member, path="", **kwargs):
        if member.name.endswith("bn-BD.jsonl"):
            raise tarfile.ReadError("unexpected end of data")
        return real_extract(self, member, path, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_then_fail)
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=re.escape(f"{tarball}: truncated or corrupt archive")):
        safe_extract(tarball, target)
    assert files_under(target) == set()


def test_safe_extract_writes_only_requested_regular_files(tmp_path):
    tarball = make_tarball(tmp_path / "ok.tar.gz",
                           {"1.1/data/hi-IN.jsonl": HI, "1.1/data/bn-BD.jsonl": BN, "1.1/README": b"x"})
    target = tmp_path / "target"
    written = safe_extract(tarball, target, members={"1.1/data/bn-BD.jsonl"})
    assert written == [(target / "1.1" / "data" / "bn-BD.jsonl").resolve()]
    assert {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} == {"1.1/data/bn-BD.jsonl"}

    written = safe_extract(tarball, target)
    assert len(written) == 3
    assert (target / "1.1" / "README").read_bytes() == b"x"
