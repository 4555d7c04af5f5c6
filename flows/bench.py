"""`lorafleet bench …`: benchmark commands that print a table and write JSON.

`bench engine` runs the multi-adapter engine against transformers + PEFT (evaluation/engine_bench.py).
`bench serving` (flows/serving_bench.py) is a closed-loop HTTP load on the service.
`bench speculative` runs a Turbo adapter's heads against our plain decoding, Hugging Face `generate`
and `generate` with prompt-lookup decoding, on the same prompts in the same process
(evaluation/speculative.py), at batch 1 with greedy decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from lorafleet.evaluation.engine_bench import EngineBenchReport, measure_engine
from lorafleet.evaluation.speculation_bench import MODES, SpeculationModesReport, measure_speculation_modes
from lorafleet.evaluation.speculative import SpeculativeReport, measure_speculative
from lorafleet.evaluation.weight_bench import FORMATS, WeightBenchReport, measure_weight_formats
from lorafleet.models.adapter_dir import has_lora, read_manifest
from lorafleet.models.base import load_base_model
from lorafleet.models.lora import load_adapter
from lorafleet.models.prompting import encode_prompt
from lorafleet.models.turbo_heads import has_heads, load_heads
from lorafleet.sections.data import DataSettings
from lorafleet.settings import Settings
from lorafleet.tasks.adapter_sources import resolve_model_reference
from lorafleet.tasks.data.prepare import prepare_dataset


def speculative_bench(model: str, settings: Settings, *, data: str | None, n: int, max_new_tokens: int,
                      prompt_lookup_num_tokens: int, console: Console) -> SpeculativeReport:
    folder, pinned = resolve_model_reference(model, settings)
    if not has_heads(folder):
        raise ValueError(f"{model} ({pinned}) has no Turbo heads: train it with method turbo_lora or turbo")
    manifest = read_manifest(folder)
    loaded = load_base_model(manifest.base_model.id, settings.model_cache_dir)
    engine = _engine_for(loaded, folder, console)  # copies the base before PEFT wraps it
    network = load_adapter(loaded.model, folder) if has_lora(folder) else loaded.model
    network.eval()
    heads = load_heads(folder, device=loaded.device)
    # Same prompts as the adapter saw in training, unless another preset is asked for.
    data_settings = DataSettings(preset=data) if data else adapter_data(manifest)
    prompts = split_prompts(loaded.tokenizer, settings, data_settings, name=f"bench-{manifest.name}", n=n)
    console.print(f"benchmarking {pinned} ({manifest.method}, {heads.num_heads} heads) on {len(prompts)} "
                  f"{data_settings.preset or 'test'} prompts, batch 1, greedy, max {max_new_tokens} new tokens")
    try:
        return measure_speculative(network, heads, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   prompt_lookup_num_tokens=prompt_lookup_num_tokens, engine=engine)
    finally:
        if engine is not None:
            engine.close()


def speculation_modes_bench(model: str, settings: Settings, *, concurrency: Sequence[int], max_new_tokens: int,
                            rounds: int, compile_decode: bool, console: Console) -> SpeculationModesReport:
    """An adapter with Turbo heads on the engine, N requests at once for each N, speculation off /
    adaptive / on in interleaved rounds (evaluation/speculation_bench.py)."""
    from lorafleet.evaluation.engine_generation import EngineScorer
    from lorafleet.models.sampling_rules import eos_token_ids
    from lorafleet.serving.engine.config import EngineConfig

    folder, pinned = resolve_model_reference(model, settings)
    if not has_heads(folder):
        raise ValueError(f"{model} ({pinned}) has no Turbo heads: train it with method turbo_lora or turbo")
    manifest = read_manifest(folder)
    loaded = load_base_model(manifest.base_model.id, settings.model_cache_dir)
    data = adapter_data(manifest)
    prompts = split_prompts(loaded.tokenizer, settings, data, name=f"bench-{manifest.name}", n=max(concurrency))
    console.print(f"{pinned}: {len(prompts)} {data.preset or 'test'} prompts, N = {list(concurrency)} at once, "
                  f"greedy, {max_new_tokens} new tokens, speculation off / adaptive / on, {rounds} rounds")
    stops = sorted(eos_token_ids(loaded.model, loaded.tokenizer, required=True))
    config = EngineConfig(max_num_seqs=max(32, max(concurrency)), compile_decode=compile_decode)
    with EngineScorer(loaded.model, loaded.tokenizer, folder, eos_token_ids=stops, config=config) as scorer:
        return measure_speculation_modes(scorer, prompts, adapter=pinned, concurrency=concurrency,
                                         max_new_tokens=max_new_tokens, rounds=rounds, progress=console.print)


def print_speculation_modes(report: SpeculationModesReport, console: Console) -> None:
    table = Table(title=f"{report.adapter}: tokens/s by speculation mode and concurrency")
    for column in ("N", *(f"{mode} tok/s" for mode in MODES), "adaptive / off", "on / off", "adaptive drafted"):
        table.add_column(column, justify="right")
    for n in report.concurrency:
        adaptive = report.figure("adaptive", n)
        steps = adaptive.drafting_steps + adaptive.plain_steps
        table.add_row(str(n), *(f"{report.figure(mode, n).tokens_per_s:.1f}" for mode in MODES),
                      f"{report.ratios[f'adaptive_vs_off_at_{n}']:.2f}x", f"{report.ratios[f'on_vs_off_at_{n}']:.2f}x",
                      f"{adaptive.drafting_steps}/{steps} steps" if steps else "-")
    console.print(table)
    console.print("greedy outputs identical across modes: " + ("yes" if report.identical_outputs else "NO"))


def _engine_for(loaded: Any, folder: Path, console: Console) -> Any:
    """The serving engine over the base and this adapter, or None (named) when it cannot take the model."""
    from lorafleet.evaluation.engine_generation import EngineScorer
    from lorafleet.models.sampling_rules import eos_token_ids

    try:
        return EngineScorer(loaded.model, loaded.tokenizer, folder,
                            eos_token_ids=sorted(eos_token_ids(loaded.model, loaded.tokenizer, required=True)))
    except ValueError as error:
        console.print(f"the engine cannot take {loaded.resolved.model_id} ({error}): HF loop figures only")
        return None


def adapter_data(manifest: Any) -> DataSettings:
    """The data settings an adapter was trained on (its manifest's config), extraction for a manifest
    without any: where every bench takes its prompts and test rows from."""
    return DataSettings.model_validate(manifest.training_config.get("data") or {"preset": "extraction"})


def split_prompts(tokenizer: Any, settings: Settings, data: DataSettings, *, name: str, n: int) -> list[list[int]]:
    """The first `n` test-split prompts of `data`, chat-formatted and tokenized as in training."""
    return [encode_prompt(tokenizer, messages)
            for messages in split_messages(tokenizer, settings, data, name=name, n=n)]


def split_messages(tokenizer: Any, settings: Settings, data: DataSettings, *, name: str,
                   n: int) -> list[list[dict[str, str]]]:
    """The prompt turns (system, user) of the first `n` test-split rows of `data`, before tokenizing."""
    prepared = prepare_dataset(data, tokenizer, name=name, out_root=settings.prepared_data_dir,
                               data_root=settings.data_root)
    return [row["messages"] for row in prepared.records("test")[:n]]


def print_speculative(report: SpeculativeReport, console: Console) -> None:
    table = Table(title=f"speculative decoding: {report.n_prompts} prompts, {report.device}")
    for column in ("decoder", "tokens/s", "vs plain"):
        table.add_column(column, justify="right" if column != "decoder" else "left")
    plain = report.tokens_per_s_engine_plain or report.tokens_per_s_plain  # the served decoder's, when measured
    engine_rows = [] if report.tokens_per_s_engine_plain is None else [
        ("engine, plain", report.tokens_per_s_engine_plain),
        ("engine, speculative", report.tokens_per_s_engine_speculative)]
    for label, rate in (*engine_rows, ("HF-model loop, plain", report.tokens_per_s_plain),
                        ("HF-model loop, speculative", report.tokens_per_s_speculative),
                        ("HF generate", report.tokens_per_s_hf_generate),
                        (f"HF prompt lookup ({report.prompt_lookup_num_tokens})", report.tokens_per_s_hf_prompt_lookup)):
        table.add_row(label, f"{rate:.1f}", f"{rate / plain:.2f}x")
    console.print(table)
    heads = ", ".join(f"{rate:.2f}" for rate in report.per_head_acceptance)
    console.print(f"τ = {report.tau:.2f} and speed-up {report.speedup:.2f}x on the {report.decoder} (HF loop: τ "
                  f"{report.tau_hf_loop:.2f}, {report.speedup_hf_loop:.2f}x)")
    console.print(f"per-head acceptance [{heads}]  greedy identical "
                  f"{report.greedy_identical_fraction:.0%}  heads {report.head_params:,} parameters = "
                  f"{report.head_params_fraction_of_medusa1:.1%} of Medusa-1 ({report.medusa1_equivalent_params:,})")


class JsonReport(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def write_json(report: JsonReport, path: Path, console: Console) -> None:
    """Every bench command's last step: the report as JSON at `path`, and where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2))
    console.print(f"wrote {path}")


def random_adapters(base: Any, folder: Path, count: int, *, rank: int = 16) -> dict[str, Path]:
    """`count` r=`rank` LoRA adapters of `base` with random A and B (PEFT starts B at zero, which
    would make every adapter the base model), written once under `folder` and reused."""
    return write_random_adapters(base, folder, [f"rand-{i:03d}" for i in range(count)], rank=rank)


def write_random_adapters(base: Any, folder: Path, names: Sequence[str], *, rank: int = 16) -> dict[str, Path]:
    """Random r=`rank` adapters named `names` (each `PREFIX-NUMBER`; the number seeds its weights)
    under `folder`; directories already written are reused as they are."""
    import torch

    from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo
    from lorafleet.models.base import tokenizer_fingerprint
    from lorafleet.models.lora import LoraSettings, apply_lora, save_adapter

    dirs = {name: folder / name for name in names}
    missing = [name for name, path in dirs.items() if not (path / "adapter_model.safetensors").exists()]
    if not missing:
        return dirs
    peft_model = apply_lora(base.model, LoraSettings(r=rank, alpha=2 * rank, dropout=0.0))
    for name in tqdm(missing, desc="writing random adapters", unit="adapter", disable=len(missing) < 2):
        generator = torch.Generator().manual_seed(int(name.rsplit("-", 1)[1]))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        manifest = AdapterManifest(name=name, method="lora", tokenizer_hash=tokenizer_fingerprint(base.tokenizer),
                                   task=TaskInfo(name=name),
                                   base_model=BaseModelRef(id=base.resolved.model_id, revision=base.resolved.revision))
        save_adapter(peft_model, dirs[name], manifest)
    peft_model.unload()  # give the base model back without LoRA layers
    return dirs


def engine_bench(settings: Settings, *, n_adapters: int, n_requests: int, max_new_tokens: int, rounds: int,
                 console: Console, base: str = "smollm2-135m-instruct", device: str = "auto",
                 dtype: str = "auto") -> EngineBenchReport:
    """`base` may be a random model of a real shape (`random:llama-1b`): speed is a matter of shapes."""
    from peft import PeftModel

    loaded = load_base_model(base, settings.model_cache_dir, device=device, dtype=dtype)  # type: ignore[arg-type]
    console.print(f"preparing {n_adapters} random r=16 adapters of {loaded.resolved.model_id} "
                  f"({loaded.model.dtype} on {loaded.device})")
    folder = settings.home / "bench" / "adapters" / loaded.resolved.revision  # one set per base model
    dirs = random_adapters(loaded, folder, n_adapters)
    prompts = bench_prompts(loaded.tokenizer, settings, 2 * n_requests)
    prompts, warm_prompts = prompts[:n_requests], prompts[n_requests:]
    names = list(dirs)

    def make_peft() -> Any:
        peft_model = PeftModel.from_pretrained(loaded.model, str(dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(dirs[name]), adapter_name=name)
        return peft_model.eval()

    console.print(f"{n_requests} ViGGO-like prompts, greedy, {max_new_tokens} new tokens each")
    return measure_engine(loaded.model, make_peft, dirs, prompts, warm_prompts=warm_prompts,
                          max_new_tokens=max_new_tokens, pad_id=loaded.tokenizer.pad_token_id or 0,
                          rounds=rounds, progress=console.print)


def weights_bench(settings: Settings, *, formats: Sequence[str], n_prompts: int, max_new_tokens: int, rounds: int,
                  adapter: str | None, score_rows: int, console: Console,
                  compile_decode: bool = False) -> WeightBenchReport:
    """Each weight format of the embedded base: batch-1 decode, greedy agreement with fp32, llama.cpp on
    the GGUF beside them; with `adapter`, its task metrics on `score_rows` test rows under each format."""
    from lorafleet.evaluation.engine_generation import EngineScorer
    from lorafleet.evaluation.quality import evaluate_quality
    from lorafleet.models.embedded import EMBEDDED_MODEL_ID, EmbeddedModelMissing, find_gguf
    from lorafleet.models.sampling_rules import eos_token_ids
    from lorafleet.sections.evaluation import EvaluationSettings

    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ValueError(f"--formats: unknown {unknown} (choose from {', '.join(FORMATS)})")
    folder = None
    if adapter is not None:
        folder, adapter = resolve_model_reference(adapter, settings)
        if not has_lora(folder):
            raise ValueError(f"{adapter} has no LoRA weights to score")
    loaded = load_base_model(EMBEDDED_MODEL_ID, settings.model_cache_dir)
    prompts = bench_prompts(loaded.tokenizer, settings, n_prompts)
    try:
        gguf = find_gguf()
    except EmbeddedModelMissing:
        gguf = None
    console.print(f"{len(prompts)} {bench_preset(settings)} prompts, {max_new_tokens} greedy tokens; formats "
                  f"{', '.join(formats)}; {rounds} interleaved rounds")
    report = measure_weight_formats(loaded.model, formats, decode_prompt=prompts[0], agreement_prompts=prompts,
                                    max_new_tokens=max_new_tokens, rounds=rounds, gguf=gguf,
                                    compile_decode=compile_decode, progress=console.print)
    if folder is None:
        return report
    manifest = read_manifest(folder)
    prepared = prepare_dataset(adapter_data(manifest), loaded.tokenizer, name=f"bench-{manifest.name}",
                               out_root=settings.prepared_data_dir, data_root=settings.data_root)
    rows = prepared.records("test")[:score_rows]
    trained = EvaluationSettings.model_validate(manifest.training_config.get("evaluation") or {})
    opts = EvaluationSettings(max_examples=None, max_new_tokens=trained.max_new_tokens)  # as its evaluation did
    stops = eos_token_ids(loaded.model, loaded.tokenizer, required=True)
    report.adapter = adapter
    for name in formats:
        dtype, weight_format = FORMATS[name]
        with EngineScorer(loaded.model, loaded.tokenizer, folder, eos_token_ids=stops, weight_format=weight_format,
                          dtype=dtype) as scorer:  # type: ignore[arg-type]
            quality = evaluate_quality(None, loaded.tokenizer, rows, prepared.task, opts, label=f"{adapter} {name}",
                                       generate=lambda batch, desc, s=scorer: s.generate(
                                           batch, max_new_tokens=opts.max_new_tokens, adapter=True, desc=desc))
        report.adapter_scores[name] = quality.metrics
        console.print(f"{adapter} under {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in quality.metrics.items()))
    return report


def scoring_bench(settings: Settings, adapter: str, *, rows: int | None, console: Console) -> Any:
    """Score `adapter` on its own test split with the engine and with `generate` (evaluation/scoring_bench.py),
    at its own evaluation settings (max_new_tokens, batch size)."""
    from lorafleet.config import FinetuneConfig
    from lorafleet.evaluation.scoring_bench import measure_scoring

    folder, pinned = resolve_model_reference(adapter, settings)
    if not has_lora(folder):
        raise ValueError(f"{adapter} has no LoRA weights: scoring it is scoring the base model")
    manifest = read_manifest(folder)
    config = FinetuneConfig.model_validate(manifest.training_config)
    loaded = load_base_model(manifest.base_model.id, settings.model_cache_dir)
    prepared = prepare_dataset(config.data, loaded.tokenizer, name=f"bench-{manifest.name}",
                               out_root=settings.prepared_data_dir, data_root=settings.data_root)
    test = prepared.records("test")
    test = test[:rows] if rows else test
    console.print(f"scoring {pinned} on {len(test)} test rows: engine, then transformers generate "
                  f"(batch {config.evaluation.batch_size}), max {config.evaluation.max_new_tokens} new tokens")
    return measure_scoring(loaded, folder, pinned, test, prepared.task,
                           max_new_tokens=config.evaluation.max_new_tokens, hf_batch_size=config.evaluation.batch_size)


def structured_bench(settings: Settings, adapter: str, *, rows: int, decode_prompts: int, console: Console) -> Any:
    """`adapter`'s test rows with and without a JSON schema derived from its training answers
    (evaluation/structured_bench.py), base model and adapter, at the adapter's max_new_tokens."""
    from lorafleet.config import FinetuneConfig
    from lorafleet.evaluation.structured_bench import measure_structured

    folder, pinned = resolve_model_reference(adapter, settings)
    manifest = read_manifest(folder)
    if manifest.task.output_format != "json":
        raise ValueError(f"{adapter}'s task writes {manifest.task.output_format!r}, not JSON: no schema to enforce")
    config = FinetuneConfig.model_validate(manifest.training_config)
    loaded = load_base_model(manifest.base_model.id, settings.model_cache_dir)
    prepared = prepare_dataset(config.data, loaded.tokenizer, name=f"bench-{manifest.name}",
                               out_root=settings.prepared_data_dir, data_root=settings.data_root)
    test = prepared.records("test")[:rows]
    answers = [record["completion"] for record in prepared.records("train")]
    console.print(f"{pinned}: {len(test)} test rows, base and adapter, without and with a schema of "
                  f"{len(answers)} training answers")
    return measure_structured(loaded, folder, pinned, test, prepared.task, answers,
                              max_new_tokens=config.evaluation.max_new_tokens, decode_prompts=decode_prompts)


def print_structured(report: Any, console: Console) -> None:
    table = Table(title=f"structured output on {report.rows} test rows ({report.adapter})")
    for column in ("model", "schema", "parse rate", "field F1", "tokens/s"):
        table.add_column(column, justify="left" if column in ("model", "schema") else "right")
    for variant in report.variants:
        table.add_row(variant.model, "yes" if variant.schema else "no", f"{variant.metrics.get('parse_rate', 0):.3f}",
                      f"{variant.metrics.get('field_f1', 0):.4f}", f"{variant.tokens_per_s:.1f}")
    console.print(table)
    for key, figures in report.decode.items():
        tau = "" if figures["tau"] is None else f", tau {figures['tau']:.2f}"
        console.print(f"batch 1, {key}: {figures['ms_per_token']:.2f} ms/token ({figures['tokens_per_s']:.1f} "
                      f"tokens/s){tau}")


def print_scoring(report: Any, console: Console) -> None:
    console.print(f"engine {report.engine_seconds:.1f} s (setup {report.engine_setup_seconds:.1f} s), "
                  f"generate {report.hf_seconds:.1f} s: "
                  f"{report.speedup:.2f}x ({report.speedup_after_setup:.2f}x after setup); "
                  f"identical predictions {report.identical_predictions}/{report.rows}")
    for name in sorted(set(report.engine_metrics) & {"field_f1", "exact_match", "parse_rate"}):
        console.print(f"  {name}: engine {report.engine_metrics[name]:.4f}, generate {report.hf_metrics[name]:.4f}")


def print_weights(report: WeightBenchReport, console: Console) -> None:
    table = Table(title=f"batch-1 decode by weight format ({report.threads} threads, {report.decode_tokens} tokens)")
    for column in ("decoder", "ms/token", "weights MB", "greedy agreement with fp32", "adapter F1"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for fig in report.formats:
        f1 = report.adapter_scores.get(fig.weights, {}).get("field_f1")
        agreement = f"{fig.greedy_agreement:.2%} of {fig.agreement_tokens}"
        if fig.decode_agreement is not None:
            agreement += f" ({fig.decode_agreement:.2%} token by token)"
        table.add_row(f"engine {fig.label} ({fig.dtype})", f"{fig.decode_ms_per_token:.2f}",
                      f"{fig.weight_bytes / 1e6:.0f}", agreement,
                      "-" if f1 is None else f"{f1:.4f}")
    llama = report.llama_cpp_decode_ms_per_token
    table.add_row(f"llama.cpp ({report.llama_cpp_file or 'not run'})", "-" if llama is None else f"{llama:.2f}",
                  "-", "-", "-")
    console.print(table)
    console.print(report.llama_cpp_note)
    console.print("  ".join(f"{key} {value:.2f}x" for key, value in report.ratios.items()))


def bench_prompts(tokenizer: Any, settings: Settings, n: int) -> list[list[int]]:
    """ViGGO test prompts when the shared data is there, else the built-in extraction task's."""
    preset = bench_preset(settings)
    return split_prompts(tokenizer, settings, DataSettings(preset=preset), name=f"bench-{preset}", n=n)


def bench_messages(tokenizer: Any, settings: Settings, n: int) -> list[list[dict[str, str]]]:
    """The prompt turns behind `bench_prompts` (same preset, same rows), for clients that send text."""
    preset = bench_preset(settings)
    return split_messages(tokenizer, settings, DataSettings(preset=preset), name=f"bench-{preset}", n=n)


def bench_preset(settings: Settings) -> str:
    return "viggo" if (settings.data_root / "viggo").exists() else "extraction"


def print_engine(report: EngineBenchReport, console: Console) -> None:
    table = Table(title=f"engine: {report.n_requests} requests, {report.n_adapters} adapters, {report.device} {report.dtype}")
    for column in ("decoder", "tokens/s"):
        table.add_column(column, justify="right" if column != "decoder" else "left")
    for label, rate in (("transformers generate, batch 1", report.hf_generate_tokens_per_s),
                        ("engine, batch 1", report.batch1_tokens_per_s),
                        (f"engine, {report.n_requests} on one adapter", report.single_adapter_tokens_per_s),
                        (f"engine, {report.n_requests} on one adapter, no prefix cache",
                         report.single_adapter_no_prefix_cache_tokens_per_s),
                        (f"engine, {report.n_requests} over {report.n_adapters} adapters",
                         report.mixed_adapters_tokens_per_s),
                        (f"engine, {report.n_requests} over {report.n_adapters} adapters, no prefix cache",
                         report.mixed_adapters_no_prefix_cache_tokens_per_s),
                        (f"engine, {report.n_requests} on one adapter, warm prefix cache",
                         report.single_adapter_warm_prefix_tokens_per_s),
                        (f"engine, {report.n_requests} over {report.n_adapters} adapters, warm prefix cache",
                         report.mixed_adapters_warm_prefix_tokens_per_s),
                        ("PEFT static mixed batch (adapter_names=)", report.peft_mixed_batch_tokens_per_s),
                        ("serial, transformers + PEFT", report.serial_tokens_per_s)):
        table.add_row(label, f"{rate:.1f}")
    console.print(table)
    console.print(f"decode alone, batch 1 (ms per token after the first): transformers generate "
                  f"{report.hf_decode_ms_per_token:.1f}, engine {report.batch1_decode_ms_per_token:.1f}")
    console.print("  ".join(f"{key} {value:.2f}x" for key, value in report.ratios.items())
                  + f"  cold load p50 {report.cold_load_p50_ms:.1f} ms"
                  + f"  prefix-cache hit rate (mixed) {report.mixed_prefix_cache_hit_rate:.0%}"
                  + f" (warm {report.mixed_warm_prefix_cache_hit_rate:.0%})")
