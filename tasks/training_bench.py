"""`lorafleet bench training`: the same fine-tune trained as LoRA and as QLoRA (or any methods), side by side.

Each method trains in a fresh subprocess (`python -m lorafleet.tasks.training_bench SPEC.json`) so that
its peak memory is its own: on CUDA the allocator's high-water mark (`torch.cuda.max_memory_allocated`),
on CPU the process's peak resident set (`ru_maxrss`, which never goes down, so two methods in one
process could not be told apart). Every variant trains the same rows for the same number of steps in a
throw-away home (nothing is registered, no checkpoint of the user's home is reused), and the report
gives each one's tokens/s, seconds per step, peak memory and losses, plus ratios against the first.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafleet.config import FinetuneConfig, parse_config
from lorafleet.settings import Settings

BENCH_METHODS = ("lora", "qlora", "turbo_lora")  # methods that train on rows as they are (turbo distils first)
RESULT_PREFIX = "TRAINING_BENCH_RESULT "  # the worker's one machine-readable line on stdout


class TrainingBenchError(RuntimeError):
    """A variant failed to train; the message quotes the end of its output."""


@dataclass
class TrainingRow:
    method: str
    device: str
    precision: str
    steps: int
    tokens_per_s: float
    seconds_per_step: float
    peak_memory_mb: float
    memory_measure: str  # "cuda max allocated" or "process peak RSS"
    trainable_params: int
    first_train_loss: float
    last_train_loss: float
    best_val_loss: float | None


@dataclass
class TrainingBenchReport:
    config_name: str
    base_model: str
    steps: int
    batch_size: int
    rows: list[TrainingRow]

    @property
    def ratios(self) -> dict[str, dict[str, float]]:
        """Each method against the first: speed (>1 faster) and peak memory (<1 smaller)."""
        first = self.rows[0]
        return {row.method: {"tokens_per_s_vs_" + first.method: row.tokens_per_s / first.tokens_per_s,
                             "peak_memory_vs_" + first.method: row.peak_memory_mb / first.peak_memory_mb}
                for row in self.rows[1:]}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios}


def variant(config: FinetuneConfig, method: str, steps: int) -> FinetuneConfig:
    """`config` trained as `method` for `steps` optimizer steps in this process (no launcher)."""
    if method not in BENCH_METHODS:
        raise ValueError(f"--methods: {method!r} is not one of {', '.join(BENCH_METHODS)}")
    raw = config.model_dump(mode="json", exclude_unset=True)  # unset: a data preset still fills them
    raw["method"] = method
    raw["training"] = {**raw.get("training", {}), "max_steps": steps, "distributed": {},
                       "eval_every": min(config.training.eval_every, steps)}
    return parse_config(raw, source=f"{config.name} as {method}")


def training_bench(config: FinetuneConfig, settings: Settings, *, methods: Sequence[str], steps: int,
                   on_line: Callable[[str], None] = print) -> TrainingBenchReport:
    """Train `config` once per method, each in its own process, and collect the rows (in `methods` order)."""
    if not methods:
        raise ValueError("--methods: name at least one method")
    variants = [variant(config, method, steps) for method in methods]  # every name checked before any run
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-training-") as scratch:
        for spec in variants:
            home = Path(scratch) / spec.method
            spec_path = Path(scratch) / f"{spec.method}.json"
            spec_path.write_text(json.dumps({
                "config": spec.model_dump(mode="json", exclude_unset=True), "home": str(home),
                "model_cache_dir": str(settings.model_cache_dir), "data_root": str(settings.data_root)}))
            on_line(f"training {spec.name} as {spec.method} for {steps} steps in a fresh process")
            rows.append(_run_variant(spec_path, on_line))
    return TrainingBenchReport(config_name=config.name, base_model=config.base_model, steps=steps,
                               batch_size=config.training.batch_size, rows=rows)


def _run_variant(spec_path: Path, on_line: Callable[[str], None]) -> TrainingRow:
    process = subprocess.run([sys.executable, "-m", __name__, str(spec_path)], capture_output=True, text=True,
                             errors="replace", check=False)
    lines = process.stdout.splitlines()
    found = [line[len(RESULT_PREFIX):] for line in lines if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not found:
        tail = "\n".join((process.stdout + process.stderr).splitlines()[-20:])
        raise TrainingBenchError(f"the {spec_path.stem} variant failed (exit code {process.returncode}):\n{tail}")
    row = TrainingRow(**json.loads(found[-1]))
    on_line(f"{row.method}: {row.tokens_per_s:,.0f} tokens/s, {row.seconds_per_step:.3f} s/step, "
            f"peak {row.peak_memory_mb:,.0f} MB ({row.memory_measure})")
    return row


def measure(spec: dict[str, Any]) -> TrainingRow:
    """Train one variant in this process and measure it (the worker's body)."""
    import torch

    from lorafleet.models.base import load_tokenizer, resolve_base_model
    from lorafleet.tasks.data.prepare import prepare_dataset
    from lorafleet.tasks.train import train_from_config, training_key

    config = FinetuneConfig.model_validate(spec["config"])
    settings = Settings.for_home(Path(spec["home"]), model_cache_dir=Path(spec["model_cache_dir"]),
                                 data_root=Path(spec["data_root"])).ensure()
    tokenizer = load_tokenizer(resolve_base_model(config.base_model, settings.model_cache_dir))
    prepared = prepare_dataset(config.data, tokenizer, name=config.name, out_root=settings.prepared_data_dir,
                               data_root=settings.data_root)
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trained = train_from_config(config, prepared, settings, key=training_key(config, prepared, settings),
                                progress=False)
    if cuda:
        peak_mb, measure_name = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    else:  # Linux reports ru_maxrss in KiB
        peak_mb, measure_name = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    losses = [loss for _, loss in trained.train_history]
    return TrainingRow(method=config.method, device="cuda" if cuda else "cpu", precision=trained.precision,
                       steps=trained.steps, tokens_per_s=trained.tokens_seen / trained.train_seconds,
                       seconds_per_step=trained.train_seconds / trained.steps, peak_memory_mb=peak_mb,
                       memory_measure=measure_name, trainable_params=trained.trainable_params,
                       first_train_loss=losses[0], last_train_loss=losses[-1], best_val_loss=trained.best_val_loss)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m lorafleet.tasks.training_bench SPEC.json (written by `lorafleet bench training`)")
    row = measure(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    print(RESULT_PREFIX + json.dumps(asdict(row)), flush=True)


if __name__ == "__main__":
    main()
