"""Parsing MASSIVE's annot_utt and locale files; finding locale files on disk."""

from __future__ import annotations

import logging

import pytest

from compactnlu.massive import (
    AnnotationError, DroppedLine, MassiveFormatError, load_massive, parse_annotation, read_locale_file,
)
from compactnlu.massive_download import locate

from conftest import good_lines, jsonl_line, record, write_jsonl


# ---------------------------------------------------------------- parse_annotation, good inputs

def test_no_slots_gives_all_o():
    words, tags = parse_annotation("what is the weather")
    assert words == ["what", "is", "the", "weather"]
    assert tags == ["O", "O", "O", "O"]


@pytest.mark.parametrize("annotation, words, tags", [
    ("wake me at [time : five thirty am]", ["wake", "me", "at", "five", "thirty", "am"],
     ["O", "O", "O", "B-time", "I-time", "I-time"]),
    ("play [artist_name : adele]", ["play", "adele"], ["O", "B-artist_name"]),
    ("set alarm for [date : tomorrow] at [time : six am] please",
     ["set", "alarm", "for", "tomorrow", "at", "six", "am", "please"],
     ["O", "O", "O", "B-date", "O", "B-time", "I-time", "O"]),
    ("[date : today] [time : noon]", ["today", "noon"], ["B-date", "B-time"]),
    ("[date : next monday] wake me at [time : seven]", ["next", "monday", "wake", "me", "at", "seven"],
     ["B-date", "I-date", "O", "O", "O", "B-time"]),
], ids=["multi-word slot", "single-word slot", "two slots", "adjacent slots", "slots at start and end"])
def test_slots_become_bio_tags(annotation, words, tags):
    assert parse_annotation(annotation) == (words, tags)


def test_slot_words_may_contain_colons_and_script():
    words, tags = parse_annotation("मुझे [time : 5:00 बजे] उठाओ")
    assert words == ["मुझे", "5:00", "बजे", "उठाओ"]
    assert tags == ["O", "B-time", "I-time", "O"]


@pytest.mark.parametrize("annot, message", [
    ("wake me [time : five am", "never closed"),
    ("wake me five am]", "unbalanced ']'"),
    ("wake [time : [date : five] am]", "nested"),
    ("wake me [ : five]", "without a label"),
    ("wake me [time : ]", "no words"),
    ("wake me [time five am]", "expected ' : '"),
    ("wake me [time : five] am]", "unbalanced ']'"),
    ("wake me [time : fi]ve]", "stray bracket"),
    ("at [time : five] [time : six]", "two adjacent spans of slot 'time'"),
])
def test_parse_annotation_rejects_malformed(annot, message):
    with pytest.raises(AnnotationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_annotation(annot)


# ---------------------------------------------------------------- read_locale_file, strict

BAD_THIRD_LINES = {
    "broken_json": ('{"id": "3", "locale": "hi-IN", "partition": ', "broken JSON"),
    "not_an_object": ('["a", "list"]', "one JSON object"),
    "unbalanced_open": (record(id="3", utt="wake me five am", annot_utt="wake me [time : five am"),
                        "never closed"),
    "unbalanced_close": (record(id="3", utt="wake me five am", annot_utt="wake me five am]"),
                         "unbalanced ']'"),
    "nested": (record(id="3", utt="wake me five am", annot_utt="wake me [time : [date : five] am]"),
               "nested"),
    "slot_without_label": (record(id="3", utt="wake me five", annot_utt="wake me [ : five]"),
                           "without a label"),
    "slot_without_words": (record(id="3", utt="wake me", annot_utt="wake me [time : ]"), "no words"),
    "missing_colon": (record(id="3", utt="wake me five am", annot_utt="wake me [time five am]"),
                      "expected ' : '"),
    "annotation_utt_disagree": (record(id="3", utt="wake me at five am please",
                                       annot_utt="wake me at [time : five am]"), "disagree"),
    "other_locale": (record(id="3", locale="bn-BD"), "'bn-BD' in the file of 'hi-IN'"),
    "missing_field": ({k: v for k, v in record(id="3").items() if k != "intent"}, "lacks field(s) intent"),
    "unknown_partition": (record(id="3", partition="validation"), "unknown partition 'validation'"),
    "null_annotation": (record(id="3", annot_utt=None), "field 'annot_utt' is null, not a string"),
    "null_scenario": (record(id="3", scenario=None), "field 'scenario' is null, not a string"),
    "null_id": (record(id=None), "field 'id' is null, not a string"),
    "list_intent": (record(id="3", intent=["alarm_set"]), "field 'intent' is [\"alarm_set\"], not a string"),
    "empty_intent": (record(id="3", intent=""), "field 'intent' is empty"),
    "blank_scenario": (record(id="3", scenario="  "), "field 'scenario' is empty (only '  ')"),
    "empty_id": (record(id=""), "field 'id' is empty"),
    "empty_utterance": (record(id="3", utt="", annot_utt=""), "empty utterance: field 'utt' is empty"),
    "blank_annotation": (record(id="3", utt="five", annot_utt=" "), "empty utterance: field 'annot_utt'"),
    "same_id_in_two_partitions": (record(id="1", partition="test"),
                                  "id '1' is in both train (line 1) and test (line 3)"),
    "same_id_twice_in_a_partition": (record(id="2"), "id '2' is used twice in train: lines 2 and 3"),
    "same_id_as_number": (record(id=1, partition="dev"), "id '1' is in both train (line 1) and dev (line 3)"),
}


@pytest.mark.parametrize("case", sorted(BAD_THIRD_LINES))
def test_bad_line_raises_with_file_and_line(tmp_path, case):
    bad, reason = BAD_THIRD_LINES[case]
    path = write_jsonl(tmp_path / "hi-IN.jsonl", good_lines("hi-IN", 2) + [bad, record(id="4")])
    with pytest.raises(MassiveFormatError) as info:
        read_locale_file(path)
    err = info.value
    assert err.path == path
    assert err.line == 3
    assert reason in err.reason
    assert str(err).startswith(f"{path}:3: ")
    assert isinstance(err, ValueError)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", good_lines("hi-IN", 3))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"wake", b"w\xffke", 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(MassiveFormatError, match=r"hi-IN\.jsonl:2: invalid UTF-8 at byte \d+ of the line"):
        read_locale_file(path)
    dropped: list[DroppedLine] = []
    rows = read_locale_file(path, strict=False, dropped=dropped)
    assert [r["id"] for r in rows] == ["1", "3"]
    assert [(d.line, d.reason.startswith("invalid UTF-8")) for d in dropped] == [(2, True)]


@pytest.mark.parametrize("strict", [True, False])
def test_a_byte_order_mark_is_accepted(tmp_path, strict):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", good_lines("hi-IN", 2))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    dropped: list[DroppedLine] = []
    assert [r["id"] for r in read_locale_file(path, strict=strict, dropped=dropped)] == ["1", "2"]
    assert dropped == []


def test_a_byte_order_mark_after_the_first_line_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", [record(id="1"), "\ufeff" + jsonl_line(record(id="2"))])
    with pytest.raises(MassiveFormatError, match=r"jsonl:2: broken JSON"):
        read_locale_file(path)


def test_the_same_id_in_another_locale_file_is_fine(tmp_path):
    # MASSIVE ids are per-locale numbers: id 1 is the same request in every language.
    write_jsonl(tmp_path / "data" / "hi-IN.jsonl", [record(id="1", locale="hi-IN")])
    write_jsonl(tmp_path / "data" / "ta-IN.jsonl", [record(id="1", locale="ta-IN")])
    ds = load_massive(tmp_path, ["hi-IN", "ta-IN"], verify=False, allow_download=False)
    assert ds["id"] == ["1", "1"]


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "hi-IN.jsonl",
                       [record(id="1"), "", record(id="3", partition="nope")])
    with pytest.raises(MassiveFormatError) as info:
        read_locale_file(path)
    assert info.value.line == 3


def test_locale_defaults_to_file_stem_and_can_be_given(tmp_path):
    path = write_jsonl(tmp_path / "some-name.jsonl", [record(id="1", locale="ta-IN")])
    with pytest.raises(MassiveFormatError, match="in the file of 'some-name'"):
        read_locale_file(path)
    assert [r["locale"] for r in read_locale_file(path, locale="ta-IN")] == ["ta-IN"]


def test_good_file_parses_every_field(tmp_path):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", [
        record(id=7, partition="dev", scenario="alarm", intent="alarm_set"),
        record(id="8", partition="test", utt="hello", annot_utt="hello", scenario="general",
               intent="greet", extra_field="ignored"),
    ])
    rows = read_locale_file(path)
    assert rows == [
        {"id": "7", "locale": "hi-IN", "partition": "dev", "scenario": "alarm", "intent": "alarm_set",
         "utt": "wake me at five am", "words": ["wake", "me", "at", "five", "am"],
         "tags": ["O", "O", "O", "B-time", "I-time"]},
        {"id": "8", "locale": "hi-IN", "partition": "test", "scenario": "general", "intent": "greet",
         "utt": "hello", "words": ["hello"], "tags": ["O"]},
    ]


# ---------------------------------------------------------------- read_locale_file, lenient

def test_lenient_mode_keeps_good_records_and_reports_dropped_lines(tmp_path, caplog):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", [
        record(id="1"),
        record(id="2", annot_utt="wake me at [time : five am"),     # line 2: never closed
        record(id="3"),
        "{not json",                                               # line 4
        record(id="5", partition="validation"),                    # line 5
        record(id="6"),
    ])
    dropped: list[DroppedLine] = []
    with caplog.at_level(logging.WARNING, logger="compactnlu.massive"):
        rows = read_locale_file(path, strict=False, dropped=dropped)

    assert [r["id"] for r in rows] == ["1", "3", "6"]
    assert [d.line for d in dropped] == [2, 4, 5]
    assert all(d.path == path for d in dropped)
    assert "never closed" in dropped[0].reason
    assert "broken JSON" in dropped[1].reason
    assert "unknown partition 'validation'" in dropped[2].reason

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "compactnlu.massive"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(path) in message and "dropped 3 bad line(s)" in message and "2, 4, 5" in message
    # Each dropped line is named with its reason, not just counted.
    for d in dropped:
        assert f"{path}:{d.line}: {d.reason}" in message
    assert str(dropped[0]) == f"{path}:2: {dropped[0].reason}"


def test_lenient_mode_drops_the_second_use_of_an_id_and_says_so(tmp_path, caplog):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", [record(id="1"), record(id="2"), record(id="1", partition="test")])
    dropped: list[DroppedLine] = []
    with caplog.at_level(logging.WARNING, logger="compactnlu.massive"):
        rows = read_locale_file(path, strict=False, dropped=dropped)
    assert [(r["id"], r["partition"]) for r in rows] == [("1", "train"), ("2", "train")]
    assert [d.line for d in dropped] == [3]
    assert "in both train (line 1) and test (line 3)" in dropped[0].reason
    assert f"{path}:3: id '1' is in both train" in caplog.text


def test_lenient_mode_on_a_clean_file_warns_nothing(tmp_path, caplog):
    path = write_jsonl(tmp_path / "hi-IN.jsonl", good_lines("hi-IN", 3))
    dropped: list[DroppedLine] = []
    with caplog.at_level(logging.WARNING, logger="compactnlu.massive"):
        rows = read_locale_file(path, strict=False, dropped=dropped)
    assert len(rows) == 3
    assert dropped == []
    assert not [r for r in caplog.records if r.name == "compactnlu.massive"]


def test_load_massive_passes_lenient_mode_through(tmp_path):
    write_jsonl(tmp_path / "data" / "hi-IN.jsonl", [record(id="1"), "{broken", record(id="3")])
    dropped: list[DroppedLine] = []
    ds = load_massive(tmp_path, ["hi-IN"], verify=False, allow_download=False, strict=False,
                      dropped=dropped)
    assert ds["id"] == ["1", "3"]
    assert [(d.path.name, d.line) for d in dropped] == [("hi-IN.jsonl", 2)]
    with pytest.raises(MassiveFormatError):
        load_massive(tmp_path, ["hi-IN"], verify=False, allow_download=False)


# ---------------------------------------------------------------- locating locale files

def test_unknown_locale_lists_available_ones(tmp_path):
    write_jsonl(tmp_path / "data" / "hi-IN.jsonl", good_lines("hi-IN"))
    with pytest.raises(FileNotFoundError) as info:
        load_massive(tmp_path, ["xx-XX"], allow_download=False, verify=False)
    assert "xx-XX" in str(info.value)
    assert "available: hi-IN" in str(info.value)
    with pytest.raises(FileNotFoundError, match="available: hi-IN"):
        locate(tmp_path, ["hi-IN", "xx-XX"], allow_download=False, verify=False)


@pytest.mark.parametrize("layout", ["1.1/data", "data"])
def test_both_folder_layouts_work(tmp_path, layout):
    hi = write_jsonl(tmp_path / layout / "hi-IN.jsonl", good_lines("hi-IN", 2))
    ta = write_jsonl(tmp_path / layout / "ta-IN.jsonl", good_lines("ta-IN", 3))
    assert locate(tmp_path, ["hi-IN", "ta-IN"], allow_download=False, verify=False) == {"hi-IN": hi, "ta-IN": ta}
    ds = load_massive(tmp_path, ["hi-IN", "ta-IN"], allow_download=False, verify=False)
    assert ds["locale"] == ["hi-IN"] * 2 + ["ta-IN"] * 3
    assert ds[0]["tags"] == ["O", "O", "O", "B-time", "I-time"]


def test_max_per_partition_keeps_the_first_records_of_each_locale(tmp_path):
    write_jsonl(tmp_path / "data" / "hi-IN.jsonl", good_lines("hi-IN", 4))
    write_jsonl(tmp_path / "data" / "ta-IN.jsonl", good_lines("ta-IN", 4))
    ds = load_massive(tmp_path, ["hi-IN", "ta-IN"], allow_download=False, verify=False, max_per_partition=2)
    assert list(zip(ds["locale"], ds["id"])) == [("hi-IN", "1"), ("hi-IN", "2"), ("ta-IN", "1"), ("ta-IN", "2")]


def test_lenient_load_of_a_file_with_only_bad_lines_is_empty(tmp_path):
    write_jsonl(tmp_path / "data" / "hi-IN.jsonl", ["{broken", record(id="2", partition="nope")])
    dropped: list[DroppedLine] = []
    ds = load_massive(tmp_path, ["hi-IN"], verify=False, allow_download=False, strict=False, dropped=dropped)
    assert len(dropped) == 2
    assert len(ds) == 0
