"""Plain Hugging Face `generate` throughput and latency at batch 1: the baseline faster paths must beat.

It is "the obvious alternative" of the design brief, so it is measured the way a careful user would
run it, not a strawman: warm-up requests first (allocator, kernels and lazy init are paid untimed),
`torch.inference_mode`, greedy decoding with the KV cache, one request at a time, and nothing but
`generate` (plus a device sync on CUDA) between the two clock reads. The progress bar advances
outside the timed region.

tokens/s = all generated tokens (including the EOS that ended a request) / the summed request times.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from lorafleet.models.sampling_rules import eos_token_ids


@dataclass(frozen=True)
class SpeedReport:
    tokens_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    n_requests: int
    generated_tokens: int
    label: str = ""

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat floats for MLflow / `comparison_markdown` (`prefix` e.g. "base_")."""
        return {f"{prefix}tokens_per_s": self.tokens_per_s, f"{prefix}latency_p50_ms": self.latency_p50_ms,
                f"{prefix}latency_p95_ms": self.latency_p95_ms}


def measure_speed(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    warmup: int = 1,
    label: str = "",
    generate_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> SpeedReport:
    """Time greedy `generate` on each prompt alone; `warmup` untimed requests cycle through `prompts`.

    `generate_kwargs` reach `generate` unchanged, so the same harness times variants of the baseline
    (`prompt_lookup_num_tokens=10`, or `min_new_tokens=max_new_tokens` for fixed-length runs).
    """
    import torch

    if not prompts:
        raise ValueError("measure_speed: no prompts to time")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
    stops = list(eos_token_ids(model, tokenizer, required=True))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": stops, "use_cache": True,
               "pad_token_id": pad_id, **(generate_kwargs or {})}
    inputs = [torch.tensor([[int(t) for t in prompt]], dtype=torch.long, device=device) for prompt in prompts]

    def run(input_ids: Any) -> Any:
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)

    latencies: list[float] = []
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for step in range(warmup):
                run(inputs[step % len(inputs)])
            bar = tqdm(inputs, desc=f"speed {label}".strip(), unit="request", disable=not progress)
            for input_ids in bar:
                _sync(device)
                start = time.perf_counter()
                output = run(input_ids)
                _sync(device)
                latencies.append(time.perf_counter() - start)
                tokens += _count_new_tokens(output[0, input_ids.shape[1]:].tolist(), stops)
    finally:
        model.train(was_training)
    total = sum(latencies)
    return SpeedReport(
        tokens_per_s=tokens / total if total > 0 else 0.0,
        latency_p50_ms=_percentile(latencies, 50) * 1000,
        latency_p95_ms=_percentile(latencies, 95) * 1000,
        n_requests=len(latencies),
        generated_tokens=tokens,
        label=label,
    )


def _count_new_tokens(ids: list[int], stops: list[int]) -> int:
    stop_set = set(stops)
    for position, token in enumerate(ids):
        if token in stop_set:
            return position + 1
    return len(ids)


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without needing numpy here."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
