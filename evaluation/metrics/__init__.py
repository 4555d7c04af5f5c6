"""lorafleet's own `evaluate` metric modules, loaded from this package so nothing touches the Hub.

`evaluate.load(<local path>)` copies the script into `$HF_MODULES_CACHE/evaluate_modules/metrics/
<name>/<sha256 of the script>/` (default `~/.cache/huggingface/modules`) and imports it from there.
The copy happens under a file lock (`.../metrics/<name>.lock`), so processes that load at the same
time wait for each other instead of importing a half-written file; a changed script gets a new hash
folder, never an overwrite. A local path never reaches the network, online or offline.

Modules are created with `keep_in_memory=True`: evaluate otherwise stages predictions in an Arrow
file named after a shared default experiment id, which makes concurrent processes contend for it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from lorafleet.evaluation.parsing import STRUCTURED_FORMATS, check_output_format

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("structured_match", "rouge_l")

_loaded: dict[str, tuple[Any, threading.Lock]] = {}
_loading = threading.Lock()


def metric_path(name: str) -> Path:
    """The folder `evaluate.load` accepts for metric `name`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; lorafleet ships {list(METRIC_NAMES)}")
    return METRICS_DIR / name


def load_metric(name: str) -> Any:
    """The `evaluate.EvaluationModule` for `name`, loaded once per process."""
    return _load(name)[0]


def _load(name: str) -> tuple[Any, threading.Lock]:
    with _loading:
        if name not in _loaded:
            import evaluate

            module = evaluate.load(str(metric_path(name)), keep_in_memory=True)
            # An evaluate module buffers inputs between add_batch and compute: one caller at a time.
            _loaded[name] = (module, threading.Lock())
        return _loaded[name]


def _compute(name: str, **kwargs: Any) -> dict[str, float]:
    module, lock = _load(name)
    with lock:
        return {key: float(value) for key, value in module.compute(**kwargs).items()}


def compute_quality(predictions: list[str], references: list[str], output_format: str) -> dict[str, float]:
    """Every quality metric for one set of outputs, as flat floats ready for MLflow.

    Keys: `exact_match`, `rouge_l`, and for structured formats `field_precision`, `field_recall`,
    `field_f1`, `set_match`, `parse_rate` (see structured_match.py for how unparsable outputs count).
    """
    output_format = check_output_format(output_format)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: "
                         "they must pair up one to one")
    if not predictions:
        raise ValueError("no predictions to score")
    for what, texts in (("prediction", predictions), ("reference", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{what} {index} is {type(text).__name__}, not str")
    metrics = _compute("structured_match", predictions=predictions, references=references,
                       output_format=output_format)
    metrics.update(_compute("rouge_l", predictions=predictions, references=references))
    if output_format not in STRUCTURED_FORMATS:
        metrics = {key: metrics[key] for key in ("exact_match", "rouge_l")}
    return metrics
