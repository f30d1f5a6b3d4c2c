"""Sources: readers for each file type, row validation with file/line/field errors, row limits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from composer_remask.data.formats import ChatExample, CoTExample
from composer_remask.data.sources import (
    DataError,
    JsonArrayReader,
    JsonLinesReader,
    ParquetReader,
    SourceSpec,
    choose_rows,
    open_records,
    parse_record,
    parse_source_arg,
)
from composer_remask.tools.fixtures import oasst2_rows, reddit_rows, tinycot_rows, write_jsonl, write_parquet


def parse_all(kind: str, path) -> list:
    reader = open_records(str(path))
    return [parse_record(kind, record, path=str(path), unit=reader.unit) for record in reader]


def test_parse_source_arg_accepts_kind_names_and_explicit_kinds():
    assert parse_source_arg("tinycot=data/t.jsonl") == SourceSpec("tinycot", "tinycot", "data/t.jsonl")
    assert parse_source_arg("mine=jsonl:a:b.jsonl") == SourceSpec("mine", "jsonl", "a:b.jsonl")
    assert parse_source_arg("chat2=oasst2:x.parquet") == SourceSpec("chat2", "oasst2", "x.parquet")
    assert parse_source_arg("oasst2=sablo/oasst2_curated") == SourceSpec("oasst2", "oasst2", "sablo/oasst2_curated")
    with pytest.raises(ValueError, match="which kind"):
        parse_source_arg("mine=x.jsonl")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_source_arg("tinycot")
    with pytest.raises(ValueError, match="name"):
        parse_source_arg("a/b=jsonl:x.jsonl")


def test_tinycot_rows_become_cot_examples_with_their_origin(tmp_path):
    rows = tinycot_rows(5)
    parsed = parse_all("tinycot", write_jsonl(tmp_path / "t.jsonl", rows))
    assert [p[0] for p in parsed] == [CoTExample(r["prompt"], r["rationale"], r["target"]) for r in rows]
    assert [p[1] for p in parsed] == [r["source"] for r in rows]


def test_reddit_instruction_is_title_plus_text_when_there_is_text(tmp_path):
    rows = [{"post_title": "Why?", "post_text": "Really, why?", "comment_text": "Because.", "post_scores": 3,
             "comment_score": 1.5},
            {"post_title": "How?", "post_text": "  ", "comment_text": "Like this.", "post_scores": 0,
             "comment_score": 2}]
    parsed = parse_all("reddit", write_jsonl(tmp_path / "r.jsonl", rows))
    assert parsed[0][0] == ChatExample((("user", "Why?\n\nReally, why?"), ("assistant", "Because.")))
    assert parsed[1][0] == ChatExample((("user", "How?"), ("assistant", "Like this.")))


def test_generic_rows_are_detected_per_row_or_declared(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"prompt": "p", "response": "r"},
            {"prompt": "p", "rationale": "because", "answer": "42"}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    examples = [p[0] for p in parse_all("jsonl", path)]
    assert examples == [ChatExample((("user", "a"), ("assistant", "b"))),
                        ChatExample((("user", "p"), ("assistant", "r"))), CoTExample("p", "because", "42")]
    # Declared: a prompt/response file read as CoT names the missing field.
    with pytest.raises(DataError, match=r"g2\.jsonl, line 1, field 'rationale': missing field"):
        parse_all("jsonl-cot", write_jsonl(tmp_path / "g2.jsonl", rows[1:2]))


def test_json_parquet_and_jsonl_readers_give_the_same_examples(tmp_path):
    rows = oasst2_rows(6)
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    array = tmp_path / "c.json"
    array.write_text(json.dumps(rows, indent=1))
    lines_json = tmp_path / "lines.json"
    lines_json.write_bytes(jsonl.read_bytes())
    parquet = write_parquet(tmp_path / "c.parquet", rows)
    assert isinstance(open_records(str(array)), JsonArrayReader)
    assert isinstance(open_records(str(lines_json)), JsonLinesReader)
    assert isinstance(open_records(str(parquet)), ParquetReader)
    expected = parse_all("oasst2", jsonl)
    for path in (array, lines_json, parquet):
        assert parse_all("oasst2", path) == expected
    assert open_records(str(parquet)).total == 6 and open_records(str(jsonl)).total == 6


def test_jsonl_reader_skips_blank_lines_and_a_bom_but_keeps_line_numbers(tmp_path):
    path = tmp_path / "bom.jsonl"
    row = json.dumps({"prompt": "p", "response": "r"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + row + b"\n\n  \n" + row)
    assert [record.number for record in open_records(str(path))] == [1, 4]
    assert len(parse_all("jsonl", path)) == 2


def test_missing_local_file_is_an_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a,b\n")
        open_records(str(tmp_path / "x.csv"))


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": \n]')
    with pytest.raises(DataError, match=r"broken\.json, line 4: malformed JSON"):
        open_records(str(path))


def _bad(tmp_path, kind: str, line: bytes):
    path = tmp_path / f"bad-{kind}.jsonl"
    good = json.dumps({"tinycot": tinycot_rows(1)[0], "oasst2": oasst2_rows(1)[0],
                       "reddit": reddit_rows(1)[0], "jsonl": {"prompt": "p", "response": "r"}}[kind]).encode()
    path.write_bytes(good + b"\n" + line + b"\n")
    return path


BAD_ROWS = [  # (kind, line of the file's line 2, reason, field)
    ("tinycot", b'{"prompt": "a", "rationale": "b", ', "malformed_json", None),
    ("tinycot", b'[1, 2]', "not_an_object", None),
    ("tinycot", b'{"prompt": "a", "target": "1"}', "missing_field", "rationale"),
    ("tinycot", b'{"prompt": "a", "rationale": "b", "target": 72}', "wrong_type", "target"),
    ("tinycot", b'{"prompt": "  ", "rationale": "b", "target": "1"}', "empty_text", "prompt"),
    ("tinycot", b'{"prompt": "a", "rationale": "caf\xe9 \xff", "target": "1"}', "invalid_utf8", "rationale"),
    ("oasst2", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
               b'{"role": "user", "content": "c"}]}', "last_turn_not_assistant", "messages[2].role"),
    ("oasst2", b'{"messages": [{"role": "bot", "content": "a"}]}', "unknown_role", "messages[0].role"),
    ("oasst2", b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}',
     "empty_text", "messages[0].content"),
    ("oasst2", b'{"messages": "hello"}', "wrong_type", "messages"),
    ("oasst2", b'{"messages": [{"role": "user"}]}', "missing_field", "messages[0].content"),
    ("reddit", b'{"post_title": "t", "post_text": "", "comment_text": "c", "post_scores": "12", '
               b'"comment_score": 1}', "wrong_type", "post_scores"),
    ("reddit", b'{"post_title": "t", "post_text": "", "post_scores": 1, "comment_score": 1}',
     "missing_field", "comment_text"),
    ("jsonl", b'{"question": "q", "reply": "r"}', "unknown_shape", "messages|response|rationale"),
]


@pytest.mark.parametrize(("kind", "line", "reason", "field"), BAD_ROWS,
                         ids=[f"{kind}-{reason}" for kind, _, reason, _ in BAD_ROWS])
def test_bad_rows_name_file_line_and_field(tmp_path, kind, line, reason, field):
    path = _bad(tmp_path, kind, line)
    reader = open_records(str(path))
    records = list(reader)
    assert parse_record(kind, records[0], path=str(path), unit=reader.unit)  # the good first line
    with pytest.raises(DataError) as info:
        parse_record(kind, records[1], path=str(path), unit=reader.unit)
    error = info.value
    assert (error.reason, error.number, error.field) == (reason, 2, field)
    location = f"{path}, line 2" + (f", field '{field}'" if field else "")
    assert str(error).startswith(location + ": ")


def test_parquet_rows_are_numbered_as_rows(tmp_path):
    rows = [{"prompt": "a", "rationale": "b", "target": "1", "source": "x"},
            {"prompt": "a", "rationale": "", "target": "1", "source": "x"}]
    path = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(DataError, match=r"t\.parquet, row 2, field 'rationale': empty text"):
        parse_all("tinycot", path)


def test_choose_rows_is_deterministic_sorted_and_seed_dependent():
    first = choose_rows(100, 10, seed=0, source_name="oasst2")
    assert np.array_equal(first, choose_rows(100, 10, seed=0, source_name="oasst2"))
    assert np.all(np.diff(first) > 0) and len(first) == 10 and first.max() < 100
    assert not np.array_equal(first, choose_rows(100, 10, seed=1, source_name="oasst2"))
    assert not np.array_equal(first, choose_rows(100, 10, seed=0, source_name="reddit"))
    assert np.array_equal(choose_rows(5, 10, seed=0, source_name="x"), np.arange(5))
    assert np.array_equal(choose_rows(5, None, seed=0, source_name="x"), np.arange(5))
