"""Read local CSV / JSONL / Parquet files into validated `Example`s, with errors that point at a row.

The files are read here rather than through `datasets.load_dataset` because every problem must be
reported with the file, the line (or row) and the column, before any training starts; the prepared
output is a `datasets.DatasetDict` (see prepare.py). Text is decoded with `surrogateescape` so a bad
byte does not abort reading: it survives as a lone surrogate and is reported in the field it sits in.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafleet.sections.data import ColumnMapping

from .errors import DataError, RowUnit
from .examples import SPLITS, Example, carve_splits
from .generated import SOURCE_NAME, generate_examples
from .presets import ResolvedData

ROLES = ("system", "user", "assistant")
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    fmt = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(str(path), f"cannot tell the format from the suffix {Path(path).suffix!r}; "
                                   f"set data.format to csv, jsonl or parquet")
    return fmt


def read_examples(path: Path, *, fmt: str = "auto", columns: ColumnMapping | None = None) -> list[Example]:
    """Every row of one file as an Example; the first bad row raises DataError."""
    path = Path(path)
    columns = columns or ColumnMapping()
    if not path.is_file():
        raise DataError(str(path), "no such file")
    fmt = detect_format(path, fmt)
    needed = [columns.messages] if columns.messages else [columns.prompt, columns.completion]
    rows = {"csv": _csv_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}[fmt](path, needed)
    examples = [_example(path, number, unit, row, columns) for number, unit, row in rows]
    if not examples:
        raise DataError(str(path), "no data rows")
    return examples


def load_source_splits(resolved: ResolvedData) -> tuple[dict[str, list[Example]], list[str]]:
    """All three splits, validated, and a description of each source for the report.

    Splits without a file of their own are carved out of train with the seed and fractions.
    """
    data = resolved.settings
    if resolved.generated:
        pool = generate_examples(data.generated_size, data.seed)
        splits = carve_splits(pool, validation_fraction=data.validation_fraction,
                              test_fraction=data.test_fraction, seed=data.seed)
        return splits, [f"{SOURCE_NAME} (size={data.generated_size}, seed={data.seed})"]
    if data.train_file is None:
        raise ValueError("data: no training data; set data.train_file or a preset")
    files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    read = {split: read_examples(Path(file), fmt=data.format, columns=data.columns)
            for split, file in files.items() if file is not None}
    splits = carve_splits(read["train"], validation_fraction=data.validation_fraction,
                          test_fraction=data.test_fraction, seed=data.seed,
                          need_validation="validation" not in read, need_test="test" not in read)
    splits.update({split: examples for split, examples in read.items() if split != "train"})
    sources = [f"{split}: {files[split]}" for split in SPLITS if files[split] is not None]
    return {split: splits[split] for split in SPLITS}, sources


# --- readers: yield (number, unit, row dict) ------------------------------------------------------

def _decode(path: Path) -> str:
    # utf-8-sig drops a BOM that spreadsheet exports add; surrogateescape keeps bad bytes locatable.
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _csv_rows(path: Path, needed: list[str]) -> Iterator[tuple[int, RowUnit, dict[str, Any]]]:
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(str(path), "empty file (no header row)") from None
    _require_columns(path, header, needed)
    start = reader.line_num + 1
    try:
        for values in reader:
            if values:  # csv yields [] for blank lines
                if len(values) != len(header):
                    raise DataError(str(path), f"has {len(values)} fields, the header has {len(header)}",
                                    row=start)
                yield start, "line", dict(zip(header, values))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(str(path), f"not valid CSV: {error}", row=start) from None


def _jsonl_rows(path: Path, needed: list[str]) -> Iterator[tuple[int, RowUnit, dict[str, Any]]]:
    for number, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problem = "not valid UTF-8" if _has_bad_bytes(line) else f"not valid JSON: {error.msg}"
            raise DataError(str(path), f"{problem} (column {error.colno})", row=number) from None
        if not isinstance(row, dict):
            raise DataError(str(path), f"expected a JSON object, got {_kind(row)}", row=number)
        for column in needed:
            if column not in row:
                raise DataError(str(path), f"missing column (keys in this row: {sorted(row)})",
                                row=number, field=column)
        yield number, "line", row


def _parquet_rows(path: Path, needed: list[str]) -> Iterator[tuple[int, RowUnit, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(str(path), f"not a readable Parquet file: {error}") from None
    _require_columns(path, table.column_names, needed)
    table = table.select(needed)
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, "row", row


def _require_columns(path: Path, found: list[str], needed: list[str]) -> None:
    for column in needed:
        if column not in found:
            raise DataError(str(path), f"missing column (columns found: {', '.join(found) or 'none'})",
                            field=column)


# --- validation -----------------------------------------------------------------------------------

def _example(path: Path, number: int, unit: RowUnit, row: dict[str, Any], columns: ColumnMapping) -> Example:
    def fail(problem: str, field: str) -> DataError:
        return DataError(str(path), problem, row=number, field=field, unit=unit)

    row_id = f"{path.name}:{number}"
    if columns.messages:
        turns = _messages(row[columns.messages], columns.messages, fail)
        return Example(id=row_id, completion=turns[-1]["content"], messages=tuple(turns[:-1]))
    prompt = _text(row[columns.prompt], columns.prompt, fail, empty="empty input")
    completion = _text(row[columns.completion], columns.completion, fail, empty="empty target")
    return Example(id=row_id, prompt=prompt, completion=completion)


def _text(value: Any, field: str, fail, *, empty: str) -> str:
    if value is None:
        raise fail("missing value (null)", field)
    if not isinstance(value, str):
        raise fail(f"expected text, got {_kind(value)} {_preview(value)}", field)
    if _has_bad_bytes(value):
        raise fail(f"not valid UTF-8 ({_bad_bytes(value)})", field)
    if not value.strip():
        raise fail(empty, field)
    return value


def _messages(value: Any, field: str, fail) -> list[dict[str, str]]:
    """A chat row: a list of {role, content} (or its JSON text, as CSV stores it) ending with the answer."""
    if isinstance(value, str):
        if _has_bad_bytes(value):
            raise fail(f"not valid UTF-8 ({_bad_bytes(value)})", field)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise fail(f"expected a JSON list of messages: {error.msg}", field) from None
    if not isinstance(value, list):
        raise fail(f"expected a list of {{role, content}} messages, got {_kind(value)}", field)
    if len(value) < 2:
        raise fail(f"needs at least a user message and the assistant's answer, got {len(value)} message(s)",
                   field)
    turns = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise fail(f"expected a {{role, content}} object, got {_kind(message)}", where)
        if message.get("role") not in ROLES:
            raise fail(f"role must be one of {', '.join(ROLES)}, got {_preview(message.get('role'))}",
                       f"{where}.role")
        is_answer = index == len(value) - 1
        content = _text(message.get("content"), f"{where}.content", fail,
                        empty="empty target" if is_answer else "empty message")
        turns.append({"role": message["role"], "content": content})
    if turns[-1]["role"] != "assistant":
        raise fail(f"the last message must be the assistant's answer, got role {turns[-1]['role']!r}",
                   f"{field}[{len(turns) - 1}].role")
    if not any(turn["role"] == "user" for turn in turns[:-1]):
        raise fail("no user message before the answer", field)
    return turns


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


def _bad_bytes(text: str) -> str:
    offset = next(i for i, char in enumerate(text) if "\udc80" <= char <= "\udcff")
    return f"byte 0x{ord(text[offset]) - 0xDC00:02x} at character {offset + 1}"


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
