"""The one error type for bad input data, so a user can jump straight to the offending row."""

from __future__ import annotations

from typing import Literal

RowUnit = Literal["line", "row"]


class DataError(ValueError):
    """An input file (or generated source) that cannot be trained on.

    Attributes:
        file: the path as the user gave it (or a preset resolved it), e.g. `.../viggo/train.csv`.
        row: where the bad record is, or None when the problem concerns the whole file (a missing
            column, an empty split). For CSV and JSONL files it is the **1-based line number in the
            file where the record starts** (the CSV header is line 1, so the first data row is line 2;
            a quoted multi-line CSV field counts from its first line), which is what an editor or
            `sed -n Np` shows. Parquet files have no lines: there it is the 1-based data row.
        unit: "line" or "row", saying which of the two `row` is; the message uses this word.
        field: the column (or `messages[i].role`-style path inside a column), or None.
        problem: what is wrong, in words.

    The message reads `viggo/train.csv line 17, field 'mr': empty target`.
    """

    def __init__(self, file: str, problem: str, *, row: int | None = None, field: str | None = None,
                 unit: RowUnit = "line") -> None:
        self.file = str(file)
        self.row = row
        self.unit = unit
        self.field = field
        self.problem = problem
        where = self.file if row is None else f"{self.file} {unit} {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the attributes when the error crosses a process boundary (Prefect)
        return (_rebuild, (self.file, self.problem, self.row, self.field, self.unit))


def _rebuild(file: str, problem: str, row: int | None, field: str | None, unit: RowUnit) -> DataError:
    return DataError(file, problem, row=row, field=field, unit=unit)
