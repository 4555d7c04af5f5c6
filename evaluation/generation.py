"""Batched Hugging Face `generate` over pre-tokenized prompts, for scoring adapters.

Prompts arrive as token ids (built once with the chat template by the caller), are sorted by length
so each batch carries little padding, left-padded here (decoder-only models continue from the last
position, so padding must go on the left), and the results come back in the caller's order. The
tokenizer is only used to decode: its `padding_side` is never touched.

Greedy batched output equals one-prompt-at-a-time output (a test holds us to it): padded positions
are masked out and Llama-style models derive position ids from the attention mask.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from lorafleet.models.sampling_rules import cut_at_stop, eos_token_ids


@dataclass(frozen=True)
class GenerationResult:
    """One completion.

    `token_ids` are the generated ids before the stop token (no EOS, no padding) and `text` is their
    decoding without special tokens. `n_tokens` counts every token the model produced, including the
    EOS that ended it: that is the work done, the number throughput is measured in.
    """

    text: str
    token_ids: list[int]
    n_tokens: int
    hit_eos: bool


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> list[GenerationResult]:
    """Complete every prompt; results are in input order.

    Sampling is seeded once (`seed`) without disturbing the caller's RNG state; sampled outputs then
    depend on batch composition, greedy outputs do not. Works for a plain `PreTrainedModel` and a
    `PeftModel`. The model is switched to eval mode for the call (dropout off) and restored after.
    """
    import torch

    _check_arguments(prompts, max_new_tokens, batch_size, do_sample, temperature, top_p)
    if not prompts:
        return []
    stops = list(eos_token_ids(model, tokenizer, required=True))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                               "eos_token_id": stops, "pad_token_id": pad_id, "use_cache": True}
    if do_sample:  # top_k=0: only the documented knobs (temperature, top_p) shape the distribution
        options.update(temperature=temperature, top_p=top_p, top_k=0)

    # Longest first: a batch that does not fit in memory fails at once, not after an hour.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[GenerationResult | None] = [None] * len(prompts)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices), \
                tqdm(total=len(prompts), desc=desc or "generate", unit="prompt", disable=not progress) as bar:
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad_id, device)
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
                generated = output[:, input_ids.shape[1]:].tolist()  # (B, new)
                for row, ids in zip(rows, generated):
                    results[row] = _finish(ids, stops, tokenizer)
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return [result for result in results if result is not None]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask), both (B, T_max), padded on the left."""
    import torch

    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt):] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _finish(ids: list[int], stops: list[int], tokenizer: Any) -> GenerationResult:
    """Cut a generated row at its first stop token; what follows is padding from finished rows."""
    kept, reason = cut_at_stop(ids, len(ids), stops)
    hit_eos = reason == "stop"
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=kept, n_tokens=len(kept) + 1 if hit_eos else len(ids),
                            hit_eos=hit_eos)


def _check_arguments(prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
                     do_sample: bool, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: generation needs at least one token to continue from")
        if not all(isinstance(token, numbers.Integral) and not isinstance(token, bool) for token in prompt):
            raise TypeError(f"prompt {index} must be a list of int token ids")
