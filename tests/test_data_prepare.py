"""Presets and the prepared-data folder (tasks/data/presets.py, prepare.py). Runs in ~5 s: the two
preset preparations (ViGGO with limits, the full generated task) are done once per module on the
tiny tokenizer."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from lorafleet.models.prompting import IGNORE_INDEX
from lorafleet.sections.data import ColumnMapping, DataSettings
from lorafleet.tasks.data.errors import DataError
from lorafleet.tasks.data.loaders import read_examples
from lorafleet.tasks.data.prepare import REPORT_FILE, PreparedData, prepare_dataset, source_key
from lorafleet.tasks.data.presets import VIGGO_ACTS, VIGGO_SLOTS, resolve_data

# The tiny model's tokenizer is one token per byte, so the presets' system prompts need room.
ROOMY = 2048


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows(rows)
    return path


def qa_rows(n: int = 40) -> list[tuple[str, str]]:
    return [(f"What is {i} plus one?", str(i + 1)) for i in range(n)]


def qa_settings(path: Path, **overrides) -> DataSettings:
    fields = {"train_file": str(path), "columns": ColumnMapping(prompt="question", completion="answer"),
              "system_prompt": "Answer with a number.", "prompt_template": "Q: {prompt}"}
    return DataSettings(**{**fields, **overrides})


def prepare(data: DataSettings, tokenizer, out: Path, data_root: Path = Path("/nonexistent"), name="qa"):
    return prepare_dataset(data, tokenizer, name=name, out_root=out, data_root=data_root)


def built_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def viggo(data_root, tiny_tokenizer, tmp_path_factory):
    data = DataSettings(preset="viggo", max_length=ROOMY, limit_train=300, limit_validation=50, limit_test=50)
    return prepare(data, tiny_tokenizer, tmp_path_factory.mktemp("viggo"), data_root, name="viggo")


@pytest.fixture(scope="module")
def extraction(tiny_tokenizer, tmp_path_factory):
    return prepare(DataSettings(preset="extraction", max_length=ROOMY), tiny_tokenizer,
                   tmp_path_factory.mktemp("extraction"), name="extraction")


# --- presets --------------------------------------------------------------------------------------

def test_viggo_files_have_the_published_row_counts(data_root):
    columns = ColumnMapping(prompt="ref", completion="mr")
    counts = [len(read_examples(data_root / "viggo" / f, columns=columns)) for f in ("train.csv", "valid.csv",
                                                                                     "test.csv")]
    assert counts == [5103, 714, 1083]


def test_viggo_preset_reads_the_three_files(viggo, data_root):
    assert viggo.counts == {"train": 300, "validation": 50, "test": 50}
    assert {split: reasons["limit"] for split, reasons in viggo.dropped.items()} == {
        "train": 5103 - 300, "validation": 714 - 50, "test": 1083 - 50}
    assert viggo.sources == [f"{split}: {data_root / 'viggo' / name}" for split, name in
                             [("train", "train.csv"), ("validation", "valid.csv"), ("test", "test.csv")]]
    assert viggo.task.output_format == "viggo_mr"
    row = viggo.records("test")[0]
    assert row["id"].startswith("test.csv:") and re.fullmatch(r"\w+\(.*\)", row["completion"])
    assert row["messages"][0] == {"role": "system", "content": viggo.task.system_prompt}


def test_viggo_system_prompt_names_every_act_and_slot_in_the_data(viggo, data_root):
    columns = ColumnMapping(prompt="ref", completion="mr")
    mrs = [e.completion for f in ("train.csv", "valid.csv", "test.csv")
           for e in read_examples(data_root / "viggo" / f, columns=columns)]
    acts = {mr.split("(")[0] for mr in mrs}
    slots = {slot for mr in mrs for slot in re.findall(r"(\w+)\[", mr)}
    assert acts == set(VIGGO_ACTS) and slots == set(VIGGO_SLOTS)
    assert all(name in viggo.task.system_prompt for name in acts | slots)


def test_extraction_preset_splits_the_generated_task_without_overlap(extraction):
    settings = DataSettings(preset="extraction")
    assert sum(extraction.counts.values()) == settings.generated_size
    assert extraction.counts["validation"] == extraction.counts["test"] == round(settings.generated_size * 0.1)
    assert extraction.task.output_format == "json"
    records = {split: extraction.records(split) for split in ("train", "validation", "test")}
    for column in ("prompt", "completion"):
        seen = [{row[column] for row in rows} for rows in records.values()]
        assert sum(map(len, seen)) == len(set.union(*seen)) == settings.generated_size
    assert extraction.sources == ["generated:extraction (size=4000, seed=0)"]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown data preset 'vigo'; known presets: extraction, viggo"):
        DataSettings(preset="vigo")


def test_explicit_fields_win_over_the_preset(tmp_path):
    path = write_csv(tmp_path / "mine.csv", qa_rows())
    data = DataSettings(preset="viggo", system_prompt="mine", train_file=str(path))
    resolved = resolve_data(data, tmp_path).settings
    assert resolved.system_prompt == "mine" and resolved.output_format == "viggo_mr"
    # the user's file replaces all of the preset's files, it is not mixed with ViGGO's valid/test
    assert (resolved.train_file, resolved.validation_file, resolved.test_file) == (str(path), None, None)


# --- prepared rows --------------------------------------------------------------------------------

def test_prepared_rows_have_the_documented_columns_and_masking(tiny_tokenizer, tmp_path):
    prepared = prepare(qa_settings(write_csv(tmp_path / "qa.csv", qa_rows())), tiny_tokenizer, tmp_path / "out")
    assert prepared.counts == {"train": 32, "validation": 4, "test": 4}
    assert prepared.path.parent == tmp_path / "out" / "qa" and prepared.path.name == prepared.fingerprint[:16]
    dataset = prepared.load_split("train")
    assert set(dataset.column_names) == {"id", "messages", "prompt", "completion", "input_ids", "labels",
                                         "prompt_length"}
    for row in dataset:
        n = row["prompt_length"]
        assert row["labels"][:n] == [IGNORE_INDEX] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert tiny_tokenizer.decode(row["input_ids"][n:]) == row["completion"] + tiny_tokenizer.eos_token
        assert row["messages"] == [{"role": "system", "content": "Answer with a number."},
                                   {"role": "user", "content": f"Q: {row['prompt']}"}]
    assert PreparedData.from_dir(prepared.path) == prepared


def test_chat_rows_get_the_task_system_prompt(tiny_tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(12)), encoding="utf-8")
    data = DataSettings(train_file=str(path), columns=ColumnMapping(messages="messages"), system_prompt="S")
    row = prepare(data, tiny_tokenizer, tmp_path / "out").records("train")[0]
    assert row["messages"] == [{"role": "system", "content": "S"}, turns[0]]
    assert row["completion"] == "hello" and row["prompt"] == "hi"


def test_length_filter_drops_and_reports_by_split(tiny_tokenizer, tmp_path):
    rows = qa_rows(40)
    long_ids = {3, 7, 11}
    rows = [(q + " padding" * 40 if i in long_ids else q, a) for i, (q, a) in enumerate(rows)]
    prepared = prepare(qa_settings(write_csv(tmp_path / "qa.csv", rows), max_length=150), tiny_tokenizer,
                       tmp_path / "out")
    dropped = {split: reasons["too_long"] for split, reasons in prepared.dropped.items()}
    assert sum(dropped.values()) == len(long_ids)
    assert sum(prepared.counts.values()) == 40 - len(long_ids)
    assert all(len(row["input_ids"]) <= 150 for split in prepared.counts for row in prepared.records(split))
    assert prepared.report()["dropped"] == prepared.dropped


def test_limits_are_seeded_and_reported(tiny_tokenizer, tmp_path):
    path = write_csv(tmp_path / "qa.csv", qa_rows(60))
    first = prepare(qa_settings(path, limit_train=5), tiny_tokenizer, tmp_path / "a")
    again = prepare(qa_settings(path, limit_train=5), tiny_tokenizer, tmp_path / "b")
    other_seed = prepare(qa_settings(path, limit_train=5, seed=1), tiny_tokenizer, tmp_path / "c")
    assert first.counts["train"] == 5 and first.dropped["train"]["limit"] == 48 - 5
    ids = [row["id"] for row in first.records("train")]
    assert ids == [row["id"] for row in again.records("train")]
    assert ids != [row["id"] for row in other_seed.records("train")]


def test_split_emptied_by_the_length_filter_fails_cleanly(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="longer than max_length=16"):
        prepare(qa_settings(write_csv(tmp_path / "qa.csv", qa_rows()), max_length=16), tiny_tokenizer,
                tmp_path / "out")
    assert built_folders(tmp_path / "out") == []


# --- fingerprint, idempotence, atomicity ----------------------------------------------------------

def test_fingerprint_is_stable_and_tracks_content(tiny_tokenizer, tmp_path):
    rows = qa_rows()
    path = write_csv(tmp_path / "qa.csv", rows)
    first = prepare(qa_settings(path), tiny_tokenizer, tmp_path / "a")
    second = prepare(qa_settings(path), tiny_tokenizer, tmp_path / "b")
    assert first.fingerprint == second.fingerprint

    rows[17] = (rows[17][0], "wrong")
    (tmp_path / "v2").mkdir()  # same file name: row ids stay equal, only one completion differs
    changed = prepare(qa_settings(write_csv(tmp_path / "v2" / "qa.csv", rows)), tiny_tokenizer, tmp_path / "c")
    assert [r["id"] for r in changed.records("train")] == [r["id"] for r in first.records("train")]
    assert changed.fingerprint != first.fingerprint
    assert changed.counts == first.counts


def test_second_prepare_reuses_the_folder(tiny_tokenizer, tmp_path):
    data = qa_settings(write_csv(tmp_path / "qa.csv", qa_rows()))
    first = prepare(data, tiny_tokenizer, tmp_path / "out")
    marker = first.path / "marker"
    marker.write_text("kept")  # a rebuilt folder would lose this file
    assert prepare(data, tiny_tokenizer, tmp_path / "out") == first
    shutil.rmtree(tmp_path / "out" / "qa" / ".by-source")  # the slow path also finds and keeps it
    assert prepare(data, tiny_tokenizer, tmp_path / "out") == first
    assert marker.read_text() == "kept"
    assert built_folders(tmp_path / "out") == [first.path]


def test_bad_row_leaves_no_folder(tiny_tokenizer, tmp_path):
    rows = qa_rows() + [("a question with no answer", "")]
    path = write_csv(tmp_path / "qa.csv", rows)
    with pytest.raises(DataError, match=r"qa.csv line 42, field 'answer': empty target"):
        prepare(qa_settings(path), tiny_tokenizer, tmp_path / "out")
    assert built_folders(tmp_path / "out") == []
    assert not list((tmp_path / "out").rglob(REPORT_FILE))


def test_source_key_follows_bytes_and_settings_not_location(tmp_path):
    path = write_csv(tmp_path / "qa.csv", qa_rows())
    key = source_key(qa_settings(path), tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(path, moved / "qa.csv")
    assert source_key(qa_settings(moved / "qa.csv"), tmp_path) == key
    assert source_key(qa_settings(path, max_length=100), tmp_path) != key
    write_csv(path, qa_rows()[:-1])
    assert source_key(qa_settings(path), tmp_path) != key
    with pytest.raises(DataError, match="no such file"):
        source_key(qa_settings(tmp_path / "absent.csv"), tmp_path)


def test_generated_preset_rejects_evaluation_files_without_a_train_file(tmp_path):
    with pytest.raises(ValueError, match="needs a train_file"):
        resolve_data(DataSettings(preset="extraction", test_file=str(tmp_path / "t.csv")), tmp_path)


def test_a_config_saved_whole_resolves_its_preset_files_like_the_config_it_came_from(data_root):
    """An adapter's manifest stores every DataSettings field, files included as null: reading it back
    must not count those nulls as 'the user chose files' and drop the preset's (bench scoring read
    the ViGGO preset back as 'no training data')."""
    from lorafleet.tasks.data.presets import resolve_data

    written = DataSettings(preset="viggo")
    saved = DataSettings.model_validate(written.model_dump())  # every field set, train_file: None
    assert "train_file" in saved.model_fields_set
    assert resolve_data(saved, data_root).settings.model_dump() == resolve_data(written, data_root).settings.model_dump()
    assert resolve_data(saved, data_root).settings.train_file is not None
    assert resolve_data(saved, data_root).settings.columns is not None  # the preset's ref/mr mapping
