"""Config section `evaluation`: how much of the test split to score and how to time generation.

Owned by `lorafleet/` so that `lorafleet/config.py` imports nothing from evaluation/ (which applies it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_examples: int | None = Field(200, ge=1, description="test rows scored; null = the whole split")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1, description="prompts per `generate` call (generator: hf)")
    generator: Literal["engine", "hf"] = Field(
        "engine", description="how quality is scored: 'engine' = the serving engine's continuous batching (the "
        "decoder the service runs; same greedy outputs, several times faster), 'hf' = transformers "
        "`generate` in static batches (the baseline; also used where the engine cannot take the base model)")
    base_few_shot: int = Field(0, ge=0, description="also score the base model with k training examples as "
                                                    "prior chat turns (0 = zero-shot only)")
    speed_prompts: int = Field(8, ge=1, description="prompts timed one at a time (batch 1) for tokens/s")
    speed_max_new_tokens: int = Field(64, ge=1)
    speed_warmup: int = Field(1, ge=0, description="untimed requests before timing starts (allocator, "
                                                   "kernel and lazy-init costs are not per-token costs)")
    speculative_prompts: int = Field(24, ge=1, description="Turbo adapters: test prompts run through plain, "
                                                          "speculative, HF generate and HF prompt lookup")
    speculative_max_new_tokens: int = Field(96, ge=1)
    prompt_lookup_num_tokens: int = Field(10, ge=1, description="the HF prompt-lookup baseline's draft length")
