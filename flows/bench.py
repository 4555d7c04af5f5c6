"""`lorafleet bench …`: benchmark commands that print a table and write JSON.

`bench speculative` runs a Turbo adapter's heads against our plain decoding, Hugging Face `generate`
and `generate` with prompt-lookup decoding, on the same prompts in the same process
(evaluation/speculative.py), at batch 1 with greedy decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafleet.evaluation.speculative import SpeculativeReport, measure_speculative
from lorafleet.models.adapter_dir import has_lora, read_manifest
from lorafleet.models.base import load_base_model
from lorafleet.models.lora import load_adapter
from lorafleet.models.prompting import encode_prompt
from lorafleet.models.turbo_heads import has_heads, load_heads
from lorafleet.settings import Settings
from lorafleet.tasks.adapter_sources import resolve_model_reference
from lorafleet.tasks.data.prepare import prepare_dataset
from lorafleet.tasks.data.settings import DataSettings


def speculative_bench(model: str, settings: Settings, *, data: str | None, n: int, max_new_tokens: int,
                      prompt_lookup_num_tokens: int, console: Console) -> SpeculativeReport:
    folder, pinned = resolve_model_reference(model, settings)
    if not has_heads(folder):
        raise ValueError(f"{model} ({pinned}) has no Turbo heads: train it with method turbo_lora or turbo")
    manifest = read_manifest(folder)
    loaded = load_base_model(manifest.base_model.id, settings.model_cache_dir)
    network = load_adapter(loaded.model, folder) if has_lora(folder) else loaded.model
    network.eval()
    heads = load_heads(folder, device=loaded.device)
    # Same prompts as the adapter saw in training, unless another preset is asked for.
    data_settings = (DataSettings(preset=data) if data else
                     DataSettings.model_validate(manifest.training_config.get("data") or {"preset": "extraction"}))
    prepared = prepare_dataset(data_settings, loaded.tokenizer, name=f"bench-{manifest.name}",
                               out_root=settings.prepared_data_dir, data_root=settings.data_root)
    rows = prepared.records("test")[:n]
    console.print(f"benchmarking {pinned} ({manifest.method}, {heads.num_heads} heads) on {len(rows)} "
                  f"{data_settings.preset or 'test'} prompts, batch 1, greedy, max {max_new_tokens} new tokens")
    return measure_speculative(network, heads, loaded.tokenizer,
                               [encode_prompt(loaded.tokenizer, row["messages"]) for row in rows],
                               max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=prompt_lookup_num_tokens)


def print_speculative(report: SpeculativeReport, console: Console) -> None:
    table = Table(title=f"speculative decoding: {report.n_prompts} prompts, {report.device}")
    for column in ("decoder", "tokens/s", "vs plain"):
        table.add_column(column, justify="right" if column != "decoder" else "left")
    for label, rate in (("ours, plain", report.tokens_per_s_plain),
                        ("ours, speculative", report.tokens_per_s_speculative),
                        ("HF generate", report.tokens_per_s_hf_generate),
                        (f"HF prompt lookup ({report.prompt_lookup_num_tokens})", report.tokens_per_s_hf_prompt_lookup)):
        table.add_row(label, f"{rate:.1f}", f"{rate / report.tokens_per_s_plain:.2f}x")
    console.print(table)
    heads = ", ".join(f"{rate:.2f}" for rate in report.per_head_acceptance)
    console.print(f"τ = {report.tau:.2f}  per-head acceptance [{heads}]  greedy identical "
                  f"{report.greedy_identical_fraction:.0%}  heads {report.head_params:,} parameters = "
                  f"{report.head_params_fraction_of_medusa1:.1%} of Medusa-1 ({report.medusa1_equivalent_params:,})")


def write_json(report: SpeculativeReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2))
