"""One call on a lent GPU: the `gpu`-marked tests, then the engine's figures on a random model of a real
shape, printed as one table and written as JSON (issue 15's GPU targets side by side).

Needs only torch, transformers, peft, pydantic and this checkout (the GPU machine has no typer, MLflow,
Prefect or BentoML; see ../shared/ENVIRONMENT.md for carrying pydantic). Dry-run it on a CPU first:
    python scripts/gpu_check.py --base random:tiny --device cpu --dtype float32 --skip-tests
Figures:
  * batch-1 decode, ms per token after the first: the engine and transformers `generate`;
  * the Turbo verification step: a 1+4-token forward over a 1-token one at batch 1 (target <= 1.2x);
  * N concurrent requests spread over K random r=16 adapters, and the same N on one adapter: tokens/s
    (targets on an H200, random Llama-1B in bf16: >= 20,000 tok/s for 128 over 8, >= 0.9x one adapter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorafleet.evaluation.engine_bench import engine_decode_ms_per_token, hf_decode_ms_per_token, run_engine
from lorafleet.models.base import load_base_model
from lorafleet.models.lora_weights import LORA_MODULES, random_lora
from lorafleet.serving.engine.adapter_cache import AdapterCache, LoadedAdapter, ResolvedAdapter
from lorafleet.serving.engine.attention import ForwardBatch
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_tests() -> dict[str, object]:
    """`pytest -m gpu`: its summary line and exit code."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"exit_code": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}


def random_adapter_engine(model: CompactLlama, names: list[str], config: EngineConfig) -> Engine:
    """An engine whose adapters are random r=16 LoRAs on every projection, made in memory by name."""
    weight = model.lm_head_weight
    slots = LoraSlots(model.shape, len(names), 16, dtype=weight.dtype, device=weight.device)

    def read(path: Path, shape: object) -> LoadedAdapter:
        seed = names.index(path.name)
        return LoadedAdapter(random_lora(model.shape, 16, LORA_MODULES, seed=seed), None)

    cache = AdapterCache(slots, model.shape, lambda name: ResolvedAdapter(name, "random", Path(name)), reader=read)
    for name in names:
        cache.request(name)
    cache.wait_loading()
    cache.install_ready()
    return Engine(model, config, adapters=cache)


def verification_ratio(model: CompactLlama, context: int, chain: int, repeats: int = 30) -> float:
    """Median time of a (1+chain)-token forward + logits over a 1-token one, one sequence at `context`."""
    device = model.lm_head_weight.device
    block = 16
    blocks = -(-(context + chain + 1) // block)
    kv = model.new_kv_pool(blocks, block)
    table = [list(range(blocks))]
    prefill = ForwardBatch.build([list(range(1, context + 1))], [0], table, block, [0], device=device)
    model.logits(model(prefill, kv)[-1:])

    def timed(tokens: int) -> float:
        batch = ForwardBatch.build([[5] * tokens], [context], table, block, [0], device=device)
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model.logits(model(batch, kv))
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    timed(1), timed(1 + chain)  # warm-up: kernels, plans
    return timed(1 + chain) / timed(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="random:llama-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".lorafleet" / "models")
    parser.add_argument("--json", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    report: dict[str, object] = {"base": args.base, "device": args.device, "dtype": args.dtype}
    if not args.skip_tests:
        report["gpu_tests"] = gpu_tests()
    loaded = load_base_model(args.base, args.cache, device=args.device, dtype=args.dtype)
    device = loaded.device
    model = CompactLlama.from_hf(loaded.model)
    names = [f"rand-{i}" for i in range(args.adapters)]
    config = EngineConfig(max_num_seqs=max(args.requests, 1), max_tokens_per_step=max(2048, args.requests),
                          adapter_slots=args.adapters, kv_cache_mb=8192 if device.type == "cuda" else 256)
    engine = random_adapter_engine(model, names, config)
    vocab = min(loaded.model.config.vocab_size, 50000)
    prompts = [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(args.prompt_tokens)] for i in range(args.requests)]

    engine_decode_ms_per_token(engine, prompts[0], 8)
    report["batch1_engine_ms"] = statistics.median(
        engine_decode_ms_per_token(engine, prompts[i], args.max_new_tokens) for i in range(3))
    hf_decode_ms_per_token(loaded.model, prompts[0], 8, pad_id=0)
    report["batch1_hf_generate_ms"] = statistics.median(
        hf_decode_ms_per_token(loaded.model, prompts[i], args.max_new_tokens, pad_id=0) for i in range(3))
    report["verify_1plus4_over_plain"] = verification_ratio(model, args.prompt_tokens, 4)
    mixed = [names[i % len(names)] for i in range(args.requests)]
    run_engine(engine, prompts[:4], mixed[:4], 4)
    rates = {"mixed": [], "single": []}
    for _ in range(2):
        engine.allocator.forget_cached()
        rates["mixed"].append(run_engine(engine, prompts, mixed, args.max_new_tokens)[0])
        engine.allocator.forget_cached()
        rates["single"].append(run_engine(engine, prompts, [names[0]] * args.requests, args.max_new_tokens)[0])
    report["mixed_tokens_per_s"] = statistics.median(rates["mixed"])
    report["single_adapter_tokens_per_s"] = statistics.median(rates["single"])
    report["mixed_vs_single"] = report["mixed_tokens_per_s"] / report["single_adapter_tokens_per_s"]

    print(f"{'figure':<52}{'value':>14}")
    for key, value in report.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<52}{shown:>14}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
