"""Every requested locale is accounted for, a synthetic profile says it ignores MASSIVE_DIR,
and a MASSIVE folder that cannot be used is named with what was expected there."""

from __future__ import annotations

import functools
import io
import logging
import re
import socket
import tarfile
import urllib.error

import pytest

import compactnlu.features as features
import compactnlu.synthetic as synthetic
from compactnlu.config import load_profile
from compactnlu.massive import PARTITIONS, IncompleteLocaleError, load_massive
from compactnlu.massive_download import OFFICIAL_URL, TARBALL_NAME, ArchiveError, DownloadError, locate

from conftest import good_lines, make_tarball, record, write_jsonl


def all_partitions(locale: str) -> list[dict]:
    return [record(id=str(i), locale=locale, partition=p) for i, p in enumerate(PARTITIONS, start=1)]


@pytest.fixture
def smoke(artifacts_dir, tmp_path):
    """The smoke profile with its synthetic corpus already written under tmp_path."""
    folder = synthetic.write_corpus(tmp_path / "synthetic-massive")
    return load_profile("smoke", {"massive_dir": str(folder)})


def smoke_file(profile, locale: str):
    return profile.data_dir / "1.1" / "data" / f"{locale}.jsonl"


# ---------------------------------------------------------------- 1. every locale accounted for

def test_an_empty_locale_file_is_an_error_naming_it(tmp_path):
    empty = write_jsonl(tmp_path / "data" / "hi-IN.jsonl", [])
    write_jsonl(tmp_path / "data" / "ta-IN.jsonl", all_partitions("ta-IN"))
    with pytest.raises(IncompleteLocaleError) as info:
        load_massive(tmp_path, ["hi-IN", "ta-IN"], verify=False, allow_download=False)
    assert isinstance(info.value, ValueError)
    assert info.value.path == empty and info.value.locale == "hi-IN"
    assert str(info.value).startswith(f"{empty}: the file is empty: no hi-IN records")


def test_a_locale_without_a_required_partition_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "data" / "hi-IN.jsonl", all_partitions("hi-IN")[:2])  # no test record
    expected = f"{path}: no hi-IN records in test (needed: train, dev, test)"
    with pytest.raises(IncompleteLocaleError, match="^" + re.escape(expected)):
        load_massive(tmp_path, ["hi-IN"], verify=False, allow_download=False, require_partitions=PARTITIONS)


def test_lenient_load_leaves_an_incomplete_locale_out_naming_its_file(tmp_path, caplog):
    empty = write_jsonl(tmp_path / "data" / "hi-IN.jsonl", [])
    no_dev = write_jsonl(tmp_path / "data" / "bn-BD.jsonl", [record(id="1", locale="bn-BD", partition="train"),
                                                             record(id="2", locale="bn-BD", partition="test")])
    write_jsonl(tmp_path / "data" / "ta-IN.jsonl", all_partitions("ta-IN"))
    with caplog.at_level(logging.WARNING, logger="compactnlu.massive"):
        ds = load_massive(tmp_path, ["hi-IN", "bn-BD", "ta-IN"], verify=False, allow_download=False,
                          strict=False, require_partitions=PARTITIONS)
    assert set(ds["locale"]) == {"ta-IN"}
    messages = [r.getMessage() for r in caplog.records if r.name == "compactnlu.massive"]
    assert len(messages) == 2
    assert messages[0].startswith(f"{empty}: the file is empty") and "leaving hi-IN out" in messages[0]
    assert messages[1].startswith(f"{no_dev}: no bn-BD records in dev") and "leaving bn-BD out" in messages[1]


def test_the_study_refuses_a_locale_without_test_records(smoke):
    path = smoke_file(smoke, "hi-IN")
    path.write_text("".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                            if '"partition": "test"' not in line), encoding="utf-8")
    with pytest.raises(IncompleteLocaleError, match="^" + re.escape(f"{path}: no hi-IN records in test")):
        features.build_study_data(smoke)


def test_the_study_report_says_which_locales_it_ran_on(smoke, monkeypatch):
    smoke_file(smoke, "hi-IN").write_text("", encoding="utf-8")
    monkeypatch.setattr(features, "load_massive", functools.partial(load_massive, strict=False))
    built = features.build_study_data(smoke)
    ran_on = [loc for loc in smoke.locales if loc != "hi-IN"]
    assert built.report["locales"] == ran_on
    assert built.report["left_out_locales"] == ["hi-IN"]
    assert {row["locale"] for row in built.report["counts"]} == set(ran_on)
    assert features.load_study_data(smoke).report == built.report


# ---------------------------------------------------------------- 2. a synthetic profile ignores MASSIVE_DIR

def test_a_synthetic_profile_says_once_that_it_ignores_massive_dir(smoke, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(synthetic, "_said_massive_dir_ignored", False)
    monkeypatch.setenv("MASSIVE_DIR", str(tmp_path / "real-massive"))
    with caplog.at_level(logging.WARNING, logger="compactnlu.synthetic"):
        features.load_records(smoke)
        features.load_records(smoke, ["ta-IN"])
    said = [r.getMessage() for r in caplog.records if r.name == "compactnlu.synthetic"]
    assert said == [f"MASSIVE_DIR={tmp_path / 'real-massive'} is ignored: this profile reads the synthetic "
                    f"stand-in corpus in {smoke.data_dir}, not MASSIVE (use the default or paper profile for MASSIVE)"]


def test_a_synthetic_profile_says_nothing_without_massive_dir(smoke, monkeypatch, caplog):
    monkeypatch.setattr(synthetic, "_said_massive_dir_ignored", False)
    monkeypatch.delenv("MASSIVE_DIR", raising=False)
    with caplog.at_level(logging.WARNING, logger="compactnlu.synthetic"):
        features.load_records(smoke, ["ta-IN"])
    assert not [r for r in caplog.records if r.name == "compactnlu.synthetic"]


# ---------------------------------------------------------------- 3. errors name the folder and the way out

@pytest.mark.parametrize("allow_download", [True, False])
def test_massive_dir_at_a_regular_file_says_a_folder_was_expected(tmp_path, allow_download):
    file = tmp_path / "massive.txt"
    file.write_text("not a folder\n")
    with pytest.raises(NotADirectoryError) as info:
        load_massive(file, ["hi-IN"], verify=False, allow_download=allow_download)
    message = str(info.value)
    assert message.startswith(f"the MASSIVE folder {file} is a file, not a folder: expected a folder holding "
                              f"1.1/data/<locale>.jsonl or the official tarball {TARBALL_NAME}")
    assert "Errno" not in message
    assert file.read_text() == "not a folder\n"


def test_massive_dir_at_the_tarball_itself_points_at_its_folder(tmp_path):
    tarball = make_tarball(tmp_path / TARBALL_NAME, {"1.1/data/hi-IN.jsonl": b""})
    hint = f"set MASSIVE_DIR to the folder that holds it, {tmp_path}"
    with pytest.raises(NotADirectoryError, match=re.escape(hint) + "$"):
        locate(tarball, ["hi-IN"], verify=False)


def _offline(url):
    raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


def _forbidden(url):
    raise urllib.error.HTTPError(url, 403, "Forbidden", {}, None)


@pytest.mark.parametrize("urlopen, why", [(_offline, "Name or service not known"), (_forbidden, "HTTP 403 Forbidden")])
def test_a_failed_download_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch, urlopen, why):
    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DownloadError) as info:
        load_massive(root, ["hi-IN"])
    err = info.value
    assert isinstance(err, OSError)
    assert str(err) == (f"MASSIVE 1.1 is not in {root} (no 1.1/data/<locale>.jsonl, no {TARBALL_NAME}) and "
                        f"downloading {OFFICIAL_URL} failed ({why}); download it by hand to {root / TARBALL_NAME}, "
                        f"or set MASSIVE_DIR to a folder that holds 1.1/data/<locale>.jsonl")
    assert err.__cause__ is None and err.__suppress_context__
    assert list(root.iterdir()) == []


def _link(name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "1.1/data/bn-BD.jsonl"
    return info


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_a_tarball_whose_locale_is_a_link_says_links_are_refused(tmp_path, kind):
    tarball = tmp_path / TARBALL_NAME
    with tarfile.open(tarball, "w:gz") as archive:
        archive.addfile(_link("1.1/data/hi-IN.jsonl", kind))
    with pytest.raises(ArchiveError) as info:
        locate(tmp_path, ["hi-IN"], verify=False)
    message = str(info.value)
    assert message == (f"{tarball}: member '1.1/data/hi-IN.jsonl' is a link or device; refusing it: the official "
                       f"{TARBALL_NAME} holds 1.1/data/<locale>.jsonl as regular files, so replace this archive "
                       f"with the one from {OFFICIAL_URL}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [TARBALL_NAME]


def test_a_tarball_without_locale_files_says_what_it_should_hold(tmp_path):
    tarball = make_tarball(tmp_path / TARBALL_NAME, {"README.txt": b"hello\n"})
    with pytest.raises(ValueError) as info:
        locate(tmp_path, ["hi-IN"], verify=False)
    assert str(info.value) == (f"unknown locale(s) hi-IN in {tarball}; it holds no <locale>.jsonl at all "
                               f"(the official one holds 1.1/data/<locale>.jsonl)")


def test_load_massive_checks_partitions_only_when_asked(tmp_path):
    # load_massive's own default checks emptiness only: a train-only file still loads.
    write_jsonl(tmp_path / "data" / "hi-IN.jsonl", good_lines("hi-IN", 2))
    assert len(load_massive(tmp_path, ["hi-IN"], verify=False, allow_download=False)) == 2
