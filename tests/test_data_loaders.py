"""Reading and validating local CSV / JSONL / Parquet files (tasks/data/loaders.py). Runs in ~1 s."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafleet.sections.data import ColumnMapping
from lorafleet.tasks.data.errors import DataError
from lorafleet.tasks.data.examples import carve_splits
from lorafleet.tasks.data.loaders import read_examples

PC = ColumnMapping(prompt="text", completion="target")
CHAT = ColumnMapping(messages="messages")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# --- happy paths ----------------------------------------------------------------------------------

def test_csv_with_column_mapping_and_multiline_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,target,extra\nhello,world,x\n"two\nlines",answer,y\n', encoding="utf-8")
    examples = read_examples(path, columns=PC)
    assert [(e.id, e.prompt, e.completion) for e in examples] == [
        ("d.csv:2", "hello", "world"), ("d.csv:3", "two\nlines", "answer")]


def test_jsonl_chat_rows_keep_prompt_turns_and_split_off_the_answer(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": chat(("system", "S"), ("user", "hi"), ("assistant", "hello"))}])
    (example,) = read_examples(path, columns=CHAT)
    assert example.completion == "hello"
    assert list(example.messages) == chat(("system", "S"), ("user", "hi"))
    assert example.prompt is None


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "target": ["x", "y"]}), path)
    assert [e.id for e in read_examples(path, columns=PC)] == ["p.parquet:1", "p.parquet:2"]


def test_carved_splits_are_disjoint_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    examples = read_examples(path)
    first = carve_splits(examples, validation_fraction=0.2, test_fraction=0.1, seed=3)
    again = carve_splits(examples, validation_fraction=0.2, test_fraction=0.1, seed=3)
    assert {k: len(v) for k, v in first.items()} == {"test": 5, "validation": 10, "train": 35}
    assert first == again
    ids = [{e.id for e in split} for split in first.values()]
    assert set.union(*ids) == {e.id for e in examples} and sum(map(len, ids)) == 50


# --- every DataError names file, row and field ----------------------------------------------------

def expect_error(match: str, path: Path, columns: ColumnMapping, *, row: int | None, field: str | None):
    with pytest.raises(DataError, match=match) as caught:
        read_examples(path, columns=columns)
    error = caught.value
    assert error.file == str(path) and error.row == row and error.field == field
    assert str(path) in str(error)
    if row is not None:
        assert f"{error.unit} {row}" in str(error)
    if field is not None:
        assert repr(field) in str(error)
    return error


def test_missing_column_in_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,answer\na,b\n", encoding="utf-8")
    error = expect_error("missing column", path, PC, row=None, field="target")
    assert "text, answer" in str(error)


def test_missing_key_in_a_jsonl_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "target": "b"}, {"text": "c"}])
    expect_error("missing column", path, PC, row=2, field="target")


def test_missing_column_in_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    expect_error("missing column", path, PC, row=None, field="target")


def test_empty_target_reports_the_line_of_the_row(tmp_path):
    path = tmp_path / "viggo.csv"
    # line 1 header, lines 2-3 a quoted two-line field, line 4 the bad row
    path.write_text('text,target\n"a\nb",ok\nc,   \n', encoding="utf-8")
    error = expect_error("empty target", path, PC, row=4, field="target")
    assert str(error) == f"{path} line 4, field 'target': empty target"


def test_empty_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "", "target": "b"}])
    expect_error("empty input", path, PC, row=1, field="text")


def test_non_utf8_bytes_in_csv_name_the_field(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,target\nok,fine\ncaf\xe9,good\n".encode("latin-1"))
    expect_error(r"not valid UTF-8 \(byte 0xe9 at character 4\)", path, PC, row=3, field="text")


def test_non_utf8_bytes_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a", "target": "b"}\n\n{"text": "x", "target": "\xff\xfe"}\n')
    expect_error("not valid UTF-8", path, PC, row=3, field="target")


def test_number_where_text_is_expected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "target": 42}])
    expect_error("expected text, got a number 42", path, PC, row=1, field="target")


def test_wrong_type_in_parquet_reports_the_data_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "target": [1.5, 2.5]}), path)
    error = expect_error("expected text", path, PC, row=1, field="target")
    assert error.unit == "row" and "row 1" in str(error)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "target": "b"}\n{"text": "a", \n', encoding="utf-8")
    expect_error("not valid JSON", path, PC, row=2, field=None)


@pytest.mark.parametrize(("messages", "field", "match"), [
    ("not a list", "messages", "expected a JSON list"),
    ({"role": "user"}, "messages", "expected a list"),
    (chat(("user", "only a question")), "messages", "at least a user message"),
    (["hi", "there"], "messages[0]", "expected a {role, content} object"),
    ([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[0].role", "role must be"),
    ([{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}], "messages[0].content",
     "expected text"),
    (chat(("user", "q"), ("assistant", "a"), ("user", "q2")), "messages[2].role", "last message must be"),
    (chat(("user", "q"), ("assistant", " ")), "messages[1].content", "empty target"),
    (chat(("system", "s"), ("assistant", "a")), "messages", "no user message"),
])
def test_bad_messages(tmp_path, messages, field, match):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat(("user", "q"), ("assistant", "a"))},
                                                 {"messages": messages}])
    expect_error(match, path, CHAT, row=2, field=field)


def test_messages_column_in_csv_is_json_text(tmp_path):
    good = json.dumps(chat(("user", "q"), ("assistant", "a"))).replace('"', '""')
    (tmp_path / "good.csv").write_text(f'messages\n"{good}"\n', encoding="utf-8")
    assert read_examples(tmp_path / "good.csv", columns=CHAT)[0].completion == "a"
    path = tmp_path / "chat.csv"
    path.write_text(f'messages\n"{good}"\n"[{{""role"": ""user""}}"\n', encoding="utf-8")
    expect_error("expected a JSON list", path, CHAT, row=3, field="messages")


def test_ragged_csv_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,target\na,b,c\n", encoding="utf-8")
    expect_error("has 3 fields, the header has 2", path, PC, row=2, field=None)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="set data.format"):
        read_examples(tmp_path / "d.txt", columns=PC)
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "absent.csv", columns=PC)


def test_data_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(DataError("f.csv", "empty target", row=3, field="mr")))
    assert (error.file, error.row, error.field, str(error)) == ("f.csv", 3, "mr",
                                                                "f.csv line 3, field 'mr': empty target")
