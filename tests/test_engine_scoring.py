"""Scoring on the engine (evaluation/engine_generation.py) gives what `generate` gives, row for row.

The oracle is the baseline path itself: `generate_texts` on the transformers model, with PEFT for the
adapter rows. A small engine (4 sequences at once, a queue of 2) makes the scorer refill the batch as
rows finish, so the equality covers continuous batching, not one static batch.
"""

from __future__ import annotations

import collections
import copy

import pytest

from lorafleet.evaluation.engine_generation import EngineScorer
from lorafleet.evaluation.generation import generate_texts
from lorafleet.evaluation.quality import build_prompts, evaluate_quality
from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.sections.evaluation import EvaluationSettings
from lorafleet.serving.engine.config import EngineConfig
from tests.test_engine_lora import save_peft_adapter

SYSTEM = {"role": "system", "content": "Answer briefly."}
TASK = TaskInfo(name="echo", output_format="text")


def _examples(n: int) -> list[dict]:
    return [{"id": f"row-{i}", "messages": [SYSTEM, {"role": "user", "content": "word " * (1 + i % 5) + str(i)}],
             "completion": "x"} for i in range(n)]


@pytest.fixture
def scored(tiny_model, tmp_path):
    """(tokenizer, prompts, HF results for base and adapter, an EngineScorer over the same adapter)."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompts = build_prompts(tokenizer, _examples(11))
    # A random model rarely says EOS: make a token it writes in about half the rows one too, so rows end at different steps.
    free = generate_texts(model, tokenizer, prompts, max_new_tokens=20, batch_size=4, progress=False)
    rows_with = collections.Counter(t for r in free for t in set(r.token_ids[3:]))
    some = min(rows_with, key=lambda token: abs(rows_with[token] - len(prompts) / 2))  # in about half the rows
    model.generation_config.eos_token_id = [*eos_token_ids(model, tokenizer, required=True), some]
    base = generate_texts(model, tokenizer, prompts, max_new_tokens=20, batch_size=4, progress=False)
    peft_model = save_peft_adapter(copy.deepcopy(model), tmp_path)  # PEFT wraps the copy, not `model`
    adapted = generate_texts(peft_model, tokenizer, prompts, max_new_tokens=20, batch_size=4, progress=False)
    scorer = EngineScorer(model, tokenizer, tmp_path, eos_token_ids=eos_token_ids(model, tokenizer, required=True),
                          config=EngineConfig(max_num_seqs=4, max_waiting=2, kv_cache_mb=1, block_size=4))
    yield tokenizer, prompts, base, adapted, scorer
    scorer.close()


def test_engine_scoring_equals_generate_for_base_and_adapter_rows(scored):
    _, prompts, base, adapted, scorer = scored
    assert any(r.hit_eos for r in base) and not all(r.hit_eos for r in base)
    for adapter, expected in ((False, base), (True, adapted)):
        results = scorer.generate(prompts, max_new_tokens=20, adapter=adapter, progress=False)
        assert results == expected  # text, token ids, tokens produced (stop included), hit_eos: all equal
    assert [r.token_ids for r in base] != [r.token_ids for r in adapted]  # the adapter changes the outputs


def test_evaluate_quality_through_the_engine_scores_the_same_predictions(scored, tiny_model):
    tokenizer, _, _, adapted, scorer = scored
    settings = EvaluationSettings(max_examples=None, max_new_tokens=20, batch_size=4)
    report = evaluate_quality(None, tokenizer, _examples(11), TASK, settings, progress=False,
                              generate=lambda prompts, desc: scorer.generate(prompts, max_new_tokens=20, adapter=True,
                                                                             progress=False, desc=desc))
    assert report.predictions == [result.text for result in adapted]
    assert report.metrics["mean_new_tokens"] == sum(r.n_tokens for r in adapted) / len(adapted)


def test_scoring_defaults_to_the_engine_and_refuses_adapter_rows_without_an_adapter(tiny_model):
    assert EvaluationSettings().generator == "engine"
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    scorer = EngineScorer(model, tokenizer, None, eos_token_ids=[0])
    with pytest.raises(ValueError, match="without an adapter"):
        scorer.generate([[1, 2]], max_new_tokens=2, adapter=True, progress=False)
    with pytest.raises(ValueError, match="end-of-sequence"):
        EngineScorer(model, tokenizer, None, eos_token_ids=[])


class _Split:
    """The one method `distilled_rows` reads from prepared data."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def records(self, split: str) -> list[dict]:
        return self.rows


def test_self_distillation_on_the_engine_writes_the_rows_generate_writes(tiny_model, tmp_path):
    from lorafleet.models.turbo_settings import TurboSettings
    from lorafleet.tasks.distill import distilled_rows, hf_continue
    from lorafleet.tasks.train import _DistillContinuer

    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prepared, turbo = _Split(_examples(7)), TurboSettings(distill_max_new_tokens=12)
    continuer = _DistillContinuer(tiny_model, None)
    engine_rows = distilled_rows(continuer.get, tokenizer, prepared, "train", tmp_path / "engine", turbo, None)
    assert continuer.scorer is not None  # the engine generated them
    continuer.close()
    hf_rows = distilled_rows(lambda: hf_continue(model, tokenizer), tokenizer, prepared, "train", tmp_path / "hf",
                             turbo, None)
    assert engine_rows == hf_rows and len(engine_rows) == 7

    def refuse():
        raise AssertionError("cached rows must not be generated again")

    assert distilled_rows(refuse, tokenizer, prepared, "train", tmp_path / "engine", turbo, None) == engine_rows


def test_scoring_bench_scores_both_paths_identically(tiny_model, tmp_path):
    from lorafleet.evaluation.scoring_bench import measure_scoring
    from lorafleet.flows.bench import write_random_adapters

    folder = write_random_adapters(copy.deepcopy(tiny_model), tmp_path, ["rand-001"], rank=4)["rand-001"]
    report = measure_scoring(tiny_model, folder, "tiny", _examples(6), TASK, max_new_tokens=10, hf_batch_size=4,
                             progress=False)
    assert report.rows == 6 and report.identical_predictions == 6 and report.differing_rows == []
    assert report.engine_metrics == report.hf_metrics
    assert report.to_dict()["speedup"] == report.hf_seconds / report.engine_seconds


def test_a_prompt_the_engine_refuses_is_named_by_its_index(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    with EngineScorer(model, tokenizer, None, eos_token_ids=[0]) as scorer:
        too_long = [5] * (model.config.max_position_embeddings + 1)
        with pytest.raises(ValueError, match="prompt 1: the engine refused it"):
            scorer.generate([[1, 2], too_long], max_new_tokens=2, adapter=False, progress=False)
