"""Turn a `data` config section into a prepared, tokenized, fingerprinted dataset folder.

The folder (`<out_root>/<name>/<fingerprint[:16]>/`: a `DatasetDict` saved with `save_to_disk` plus
`prepare_report.json`) is the hand-off to training and evaluation, so it is written atomically and
never rewritten: the same data gives the same fingerprint, and a second call returns the existing
folder. A small pointer file keyed by `source_key` (file bytes + settings) and the tokenizer lets that
second call skip reading and tokenizing altogether.

The fingerprint is a sha256 over the task info, the tokenizer's fingerprint and every split's
(id, messages, completion) after filtering. The tokenizer is part of it because the folder stores
token ids: two base models with different vocabularies must not share a folder.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.base import tokenizer_fingerprint
from lorafleet.models.cache import atomic_directory, atomic_write_text, file_lock, sha256_file, sha256_text
from lorafleet.models.prompting import build_messages, encode_example
from lorafleet.sections.data import DataSettings

from .errors import DataError
from .examples import SPLITS, Example
from .generated import GENERATOR_VERSION
from .loaders import load_source_splits
from .presets import FILE_FIELDS, ResolvedData, resolve_data

PREPARE_VERSION = 1  # bump when the same inputs would give different rows (invalidates source keys)
REPORT_FILE = "prepare_report.json"
_POINTERS = ".by-source"


def _features():
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "prompt": Value("string"),  # raw input before the template (chat rows: the last user turn)
        "completion": Value("string"),
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "prompt_length": Value("int32"),
    })


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset folder, as read back from its report."""

    path: Path
    fingerprint: str
    task: TaskInfo
    counts: dict[str, int]
    dropped: dict[str, dict[str, int]]
    sources: list[str]

    @classmethod
    def from_dir(cls, path: Path) -> PreparedData:
        path = Path(path)
        report_path = path / REPORT_FILE
        if not report_path.is_file():
            raise FileNotFoundError(f"{path} is not a prepared dataset: {REPORT_FILE} is missing")
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return cls(path=path, fingerprint=report["fingerprint"], task=TaskInfo.model_validate(report["task"]),
                   counts=dict(report["counts"]), dropped={k: dict(v) for k, v in report["dropped"].items()},
                   sources=list(report["sources"]))

    def report(self) -> dict[str, Any]:
        return json.loads((self.path / REPORT_FILE).read_text(encoding="utf-8"))

    def load_split(self, split: str):
        """The split as a memory-mapped `datasets.Dataset`."""
        from datasets import load_from_disk

        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return load_from_disk(str(self.path / split))

    def records(self, split: str) -> list[dict[str, Any]]:
        return self.load_split(split).to_list()


def task_info(name: str, data: DataSettings) -> TaskInfo:
    """The prompting recipe stored with the data and, later, in the adapter manifest."""
    return TaskInfo(name=name, output_format=data.output_format or "text", system_prompt=data.system_prompt,
                    prompt_template=data.prompt_template or "{prompt}")


def source_key(data: DataSettings, data_root: Path) -> str:
    """A cheap hash of everything the prepared rows depend on except the tokenizer: the resolved
    settings (without file paths, so moving the data keeps the key), each source file's bytes, and
    the code versions. Use it, with the base model, as a Prefect cache key for the prepare task."""
    resolved = resolve_data(data, data_root)
    settings = resolved.settings.model_dump(mode="json", exclude=set(FILE_FIELDS))
    parts = [f"prepare-v{PREPARE_VERSION}", json.dumps(settings, sort_keys=True)]
    if resolved.generated:
        parts.append(f"generator-v{GENERATOR_VERSION}")
    for field in FILE_FIELDS:
        file = getattr(resolved.settings, field)
        if file is not None:
            path = Path(file)
            if not path.is_file():
                raise DataError(str(path), f"no such file (data.{field})")
            parts.append(f"{field}={sha256_file(path)}")
    return sha256_text(*parts)


def prepare_dataset(data: DataSettings, tokenizer: Any, *, name: str, out_root: Path,
                    data_root: Path) -> PreparedData:
    """Validate, prompt, tokenize, filter and save the data; return the (possibly reused) folder.

    Every row is validated before anything is written, so a DataError leaves no folder behind.
    Rows longer than `max_length` tokens (prompt + completion + EOS) are dropped and counted; then
    `limit_*` keeps the first N of each split in a seeded shuffle (rows past the limit are counted
    as dropped by `limit` and are not tokenized).
    """
    resolved = resolve_data(data, data_root)
    task = task_info(name, resolved.settings)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    base = Path(out_root) / name
    key = source_key(data, data_root)
    pointer = base / _POINTERS / f"{sha256_text(key, tokenizer_hash, task.model_dump_json())[:32]}.json"
    reused = _follow(pointer)
    if reused is not None:
        return reused

    splits, sources = load_source_splits(resolved)
    rows: dict[str, list[dict[str, Any]]] = {}
    dropped: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows[split], dropped[split] = _encode_split(split, splits[split], task, tokenizer, resolved)
        if not rows[split]:
            raise DataError(f"{split} split", _empty_reason(dropped[split], resolved.settings.max_length))
    fingerprint = _fingerprint(task, tokenizer_hash, rows)
    report = {
        "fingerprint": fingerprint,
        "task": task.model_dump(mode="json"),
        "counts": {split: len(rows[split]) for split in SPLITS},
        "dropped": dropped,
        "sources": sources,
        "token_lengths": {split: _length_stats(rows[split]) for split in SPLITS},
        "tokenizer": tokenizer_hash,
        "source_key": key,
        "settings": resolved.settings.model_dump(mode="json"),
        "prepare_version": PREPARE_VERSION,
    }
    target = base / fingerprint[:16]
    with file_lock(base / f".{fingerprint[:16]}.lock"):
        if not (target / REPORT_FILE).is_file():
            _write(target, rows, report)
    atomic_write_text(pointer, json.dumps({"fingerprint": fingerprint, "folder": target.name}))
    return PreparedData.from_dir(target)


def _follow(pointer: Path) -> PreparedData | None:
    """The folder a previous call made from the same sources, if it is still there."""
    if not pointer.is_file():
        return None
    try:
        folder = pointer.parent.parent / json.loads(pointer.read_text(encoding="utf-8"))["folder"]
    except (json.JSONDecodeError, KeyError):
        return None
    return PreparedData.from_dir(folder) if (folder / REPORT_FILE).is_file() else None


def _encode_split(split: str, examples: list[Example], task: TaskInfo, tokenizer: Any,
                  resolved: ResolvedData) -> tuple[list[dict[str, Any]], dict[str, int]]:
    data = resolved.settings
    limit = {"train": data.limit_train, "validation": data.limit_validation, "test": data.limit_test}[split]
    order = list(examples)
    random.Random(f"{data.seed}:{split}").shuffle(order)
    kept: list[dict[str, Any]] = []
    dropped = {"too_long": 0, "limit": 0}
    for position, example in enumerate(tqdm(order, desc=f"tokenizing {split}", unit="ex", leave=False)):
        if limit is not None and len(kept) >= limit:
            dropped["limit"] = len(order) - position
            break
        row = _row(example, task, tokenizer)
        if len(row["input_ids"]) > data.max_length:
            dropped["too_long"] += 1
            continue
        kept.append(row)
    return kept, dropped


def _row(example: Example, task: TaskInfo, tokenizer: Any) -> dict[str, Any]:
    if example.messages is not None:
        messages = [dict(turn) for turn in example.messages]
        if task.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        prompt = next(turn["content"] for turn in reversed(messages) if turn["role"] == "user")
    else:
        messages = build_messages(task, example.prompt or "")
        prompt = example.prompt or ""
    encoded = encode_example(tokenizer, messages, example.completion)
    return {"id": example.id, "messages": messages, "prompt": prompt, "completion": example.completion,
            "input_ids": encoded.input_ids, "labels": encoded.labels, "prompt_length": encoded.prompt_length}


def _fingerprint(task: TaskInfo, tokenizer_hash: str, rows: dict[str, list[dict[str, Any]]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"task": task.model_dump(mode="json"), "tokenizer": tokenizer_hash},
                             sort_keys=True).encode())
    for split in SPLITS:
        digest.update(f"\n#split {split}\n".encode())
        for row in rows[split]:
            line = json.dumps([row["id"], row["messages"], row["completion"]], ensure_ascii=False, sort_keys=True)
            digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _length_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    lengths = [len(row["input_ids"]) for row in rows]
    completions = [len(row["input_ids"]) - row["prompt_length"] for row in rows]
    return {"mean": round(statistics.fmean(lengths), 1), "max": max(lengths),
            "completion_mean": round(statistics.fmean(completions), 1), "completion_max": max(completions)}


def _empty_reason(dropped: dict[str, int], max_length: int) -> str:
    if dropped["too_long"]:
        return (f"no examples left: all {dropped['too_long']} are longer than max_length={max_length} tokens "
                f"(raise data.max_length)")
    return "no examples"


def _write(target: Path, rows: dict[str, list[dict[str, Any]]], report: dict[str, Any]) -> None:
    from datasets import Dataset, DatasetDict

    features = _features()
    dataset = DatasetDict({
        split: Dataset.from_dict({column: [row[column] for row in rows[split]] for column in features},
                                 features=features)
        for split in SPLITS
    })
    with atomic_directory(target, overwrite=target.exists()) as staging:
        dataset.save_to_disk(str(staging))
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
