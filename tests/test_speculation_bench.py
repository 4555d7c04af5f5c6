"""`bench speculation` (evaluation/speculation_bench.py) on the tiny model with random Turbo heads: every
mode at every concurrency, the policy's step counts per mode, and greedy outputs compared across modes.
Speed figures are only checked for presence (tests never judge speed)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafleet.evaluation.engine_generation import EngineScorer
from lorafleet.evaluation.speculation_bench import MODES, measure_speculation_modes
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.models.turbo_heads import new_heads, save_heads
from lorafleet.serving.engine.config import EngineConfig
from tests.test_engine_lora import save_peft_adapter


@pytest.fixture
def scorer(tiny_model, tmp_path):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    save_peft_adapter(copy.deepcopy(model), tmp_path)
    heads = new_heads(model, num_heads=3)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    save_heads(heads, tmp_path)
    with EngineScorer(model, tokenizer, tmp_path, eos_token_ids=eos_token_ids(model, tokenizer, required=True),
                      config=EngineConfig(max_num_seqs=8, kv_cache_mb=2, block_size=4)) as scorer:
        yield scorer


def test_every_mode_at_every_concurrency_with_identical_greedy_outputs(scorer):
    prompts = [list(range(5, 5 + n)) for n in (4, 7, 9)]
    report = measure_speculation_modes(scorer, prompts, adapter="tiny", concurrency=[1, 5], max_new_tokens=8,
                                       rounds=1, progress=lambda line: None)
    assert [(f.mode, f.concurrency) for f in report.figures] == [(m, n) for n in (1, 5) for m in MODES]
    assert all(f.tokens_per_s > 0 and len(f.rounds_tokens_per_s) == 1 for f in report.figures)
    assert report.identical_outputs  # speculation never changes greedy tokens
    assert report.figure("off", 1).drafting_steps == 0
    assert report.figure("on", 1).drafting_steps > 0 and report.figure("on", 5).drafting_steps > 0
    assert set(report.ratios) == {f"{m}_vs_off_at_{n}" for m in ("adaptive", "on") for n in (1, 5)}
    assert scorer.engine.policy.mode == scorer.config.speculation  # restored after every run


def test_bad_levels_and_rounds_are_refused(scorer):
    with pytest.raises(ValueError, match="concurrency levels must be >= 1"):
        measure_speculation_modes(scorer, [[5, 6]], adapter="tiny", concurrency=[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        measure_speculation_modes(scorer, [[5, 6]], adapter="tiny", concurrency=[1], max_new_tokens=4, rounds=0)
