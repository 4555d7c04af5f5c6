"""`lorafleet bench adalora`: AdaLoRA against fixed-rank LoRA at the same rank budget, on the same config.

Both variants train the config's rows for the same number of optimizer steps with the same seed,
learning rate, `lora.alpha`, dropout and target modules: LoRA at r = `adalora.target_r` everywhere,
AdaLoRA from `adalora.init_r` pruned to an average of `target_r` (so the total rank is at most LoRA's).
They are scored by the finetune flow's own evaluation (`tasks/evaluate.py`) on the same test rows, in
one process and a throw-away home: nothing is registered and no checkpoint of the user's home is reused.

Parameters are counted three ways, since "equal parameters" is a budget on ranks: `trainable_params`
while training (AdaLoRA trains init_r triplets, E included), `final_params` of the adapter that ships
(LoRA: r·(in + out) per projection; AdaLoRA: kept rank·(in + out), E folded into A) and `stored_params`
(AdaLoRA's file is zero-padded to its largest kept rank, see `models/adalora.py`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lorafleet.config import FinetuneConfig, parse_config
from lorafleet.evaluation.report import comparison_markdown
from lorafleet.models.adalora_settings import AdaLoraSettings
from lorafleet.models.adapter_dir import PEFT_WEIGHTS_FILE, adapter_file, read_manifest
from lorafleet.settings import Settings

QUALITY = ("exact_match", "field_f1", "set_match", "rouge_l", "parse_rate")


@dataclass
class AdaLoraBenchRow:
    method: str
    rank: int  # LoRA's r; AdaLoRA's largest kept rank (what the saved file is padded to)
    total_rank: int  # summed over the adapted projections
    trainable_params: int
    final_params: int
    stored_params: int
    val_loss: float | None
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class AdaLoraBenchReport:
    config_name: str
    base_model: str
    steps: int
    init_r: int
    target_r: int
    projections: int
    n_test_rows: int
    base: dict[str, float]
    rows: list[AdaLoraBenchRow]
    rank_pattern: dict[str, int]

    @property
    def ratios(self) -> dict[str, float]:
        """AdaLoRA over LoRA: shipped parameters, and each quality metric both have."""
        lora, ada = self.rows
        out = {"final_params": ada.final_params / lora.final_params}
        out.update({name: ada.metrics[name] / lora.metrics[name] for name in QUALITY
                    if lora.metrics.get(name) and name in ada.metrics})
        return out

    def markdown(self) -> str:
        rows = [("base (zero-shot)", {k: v for k, v in self.base.items() if k in QUALITY})]
        for row in self.rows:
            label = (f"LoRA r={row.rank}" if row.method == "lora"
                     else f"AdaLoRA {self.init_r}→{self.target_r} (max kept {row.rank})")
            quality = {k: v for k, v in row.metrics.items() if k in QUALITY}
            rows.append((label, {"total_rank": row.total_rank, "final_params": row.final_params,
                                 "val_loss": row.val_loss, **quality}))
        return comparison_markdown(rows, columns=["total_rank", "final_params", "val_loss", *QUALITY],
                                   label_header="variant")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios}


def variants(config: FinetuneConfig, steps: int) -> tuple[FinetuneConfig, FinetuneConfig]:
    """(LoRA at r = target_r, AdaLoRA init_r → target_r) of `config`, `steps` optimizer steps, one process."""
    if config.method not in ("lora", "adalora"):
        raise ValueError(f"bench adalora compares LoRA and AdaLoRA: the config's method must be lora or "
                         f"adalora, not {config.method!r}")
    adalora = config.adalora or AdaLoraSettings()
    raw = config.model_dump(mode="json", exclude_unset=True)  # unset: a data preset still fills them
    raw.pop("adalora", None)
    raw["training"] = {**raw.get("training", {}), "max_steps": steps, "distributed": {},
                       "eval_every": min(config.training.eval_every, steps)}
    lora = {**raw, "method": "lora", "lora": {**raw.get("lora", {}), "r": adalora.target_r}}
    ada = {**raw, "method": "adalora", "adalora": adalora.model_dump(mode="json"),
           "lora": {k: v for k, v in raw.get("lora", {}).items() if k != "r"}}
    return (parse_config(lora, source=f"{config.name} as LoRA r={adalora.target_r}"),
            parse_config(ada, source=f"{config.name} as AdaLoRA"))


def adalora_bench(config: FinetuneConfig, settings: Settings, *, steps: int | None = None,
                  on_line: Callable[[str], None] = print) -> AdaLoraBenchReport:
    """Train and evaluate both variants of `config` (see the module docstring); `steps` defaults to the
    config's own count (`training.max_steps`, else its epochs over the training rows)."""
    from lorafleet.models.base import load_tokenizer, resolve_base_model
    from lorafleet.models.training import total_optimizer_steps
    from lorafleet.tasks.data.prepare import prepare_dataset
    from lorafleet.tasks.evaluate import evaluate_adapter, evaluate_on_rows
    from lorafleet.tasks.train import train_from_config, training_key

    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-adalora-") as scratch:
        home = Settings.for_home(Path(scratch), model_cache_dir=settings.model_cache_dir,
                                 data_root=settings.data_root).ensure()
        tokenizer = load_tokenizer(resolve_base_model(config.base_model, home.model_cache_dir))
        prepared = prepare_dataset(config.data, tokenizer, name=config.name, out_root=home.prepared_data_dir,
                                   data_root=home.data_root)
        steps = steps or total_optimizer_steps(prepared.counts["train"], config.training)
        lora_spec, ada_spec = variants(config, steps)
        rows, base, n_test, pattern = [], {}, 0, {}
        for spec in (lora_spec, ada_spec):
            on_line(f"training {spec.name} as {spec.method} for {steps} steps")
            key = training_key(spec, prepared, home)
            trained = train_from_config(spec, prepared, home, key=key, progress=False)
            on_line(f"evaluating {spec.method} (best validation loss {trained.best_val_loss})")
            if spec.method == "lora":  # the base model once, on the rows both adapters are scored on
                outcome = evaluate_adapter(spec, prepared, trained.adapter_dir, home, progress=False)
                metrics, base, n_test = outcome.adapter, outcome.variants["base"], outcome.n_examples
            else:
                metrics = evaluate_on_rows(spec, prepared, trained.adapter_dir, home, progress=False)
                pattern = read_manifest(trained.adapter_dir).rank_pattern or {}
            rows.append(_row(spec, trained, metrics))
    adalora = ada_spec.adalora
    return AdaLoraBenchReport(config_name=config.name, base_model=config.base_model, steps=steps,
                              init_r=adalora.init_r, target_r=adalora.target_r, projections=len(pattern),
                              n_test_rows=n_test, base=base, rows=rows, rank_pattern=pattern)


def _row(spec: FinetuneConfig, trained: Any, metrics: dict[str, float]) -> AdaLoraBenchRow:
    stored, final, ranks = adapter_params(trained.adapter_dir)
    return AdaLoraBenchRow(method=spec.method, rank=max(ranks.values()), total_rank=sum(ranks.values()),
                           trainable_params=trained.trainable_params, final_params=final, stored_params=stored,
                           val_loss=trained.best_val_loss, train_seconds=trained.train_seconds, metrics=metrics)


def adapter_params(adapter_dir: Path) -> tuple[int, int, dict[str, int]]:
    """(stored, final, rank per projection) of an adapter folder: stored = every LoRA tensor's size,
    final = the ranks that carry weight × (in + out) (the manifest's rank pattern, else the file's rank)."""
    pattern = read_manifest(adapter_dir).rank_pattern
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(adapter_file(adapter_dir, PEFT_WEIGHTS_FILE)), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
            module, which = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            shapes.setdefault(module, {})[which.split(".")[0]] = tuple(weights.get_slice(key).get_shape())
    stored = sum(a[0] * a[1] + b[0] * b[1] for a, b in ((s["A"], s["B"]) for s in shapes.values()))
    ranks = {module: (pattern[module] if pattern else s["A"][0]) for module, s in shapes.items()}
    final = sum(ranks[module] * (s["A"][1] + s["B"][0]) for module, s in shapes.items())
    return stored, final, ranks
