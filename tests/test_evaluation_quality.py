"""evaluate_quality: few-shot prompt structure, limits, scoring of real generations (tiny random Llama)."""

from __future__ import annotations

import datasets
import pytest

from lorafleet.evaluation.generation import generate_texts
from lorafleet.evaluation.quality import (
    build_prompts,
    evaluate_quality,
    few_shot_from_examples,
    with_few_shot,
)
from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.prompting import encode_prompt
from lorafleet.sections.evaluation import EvaluationSettings

SYSTEM = {"role": "system", "content": "Answer with a meaning representation."}
TEXT_TASK = TaskInfo(name="echo", output_format="text")
VIGGO_TASK = TaskInfo(name="viggo", output_format="viggo_mr")


def _examples(n: int, completion: str = "x") -> list[dict]:
    return [{"id": f"row-{i}", "messages": [SYSTEM, {"role": "user", "content": f"Sentence number {i}."}],
             "completion": completion} for i in range(n)]


# --- few-shot structure ---------------------------------------------------------------------------

SHOTS = [("Q one", "A one"), ("Q two", "A two")]


def test_few_shot_goes_after_system_before_the_question():
    messages = [SYSTEM, {"role": "user", "content": "real question"}]
    assert with_few_shot(messages, SHOTS) == [
        SYSTEM,
        {"role": "user", "content": "Q one"}, {"role": "assistant", "content": "A one"},
        {"role": "user", "content": "Q two"}, {"role": "assistant", "content": "A two"},
        {"role": "user", "content": "real question"},
    ]


def test_few_shot_without_system_turn_and_with_history():
    alone = with_few_shot([{"role": "user", "content": "q"}], SHOTS[:1])
    assert [m["content"] for m in alone] == ["Q one", "A one", "q"]
    history = [SYSTEM, {"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"},
               {"role": "user", "content": "now"}]
    contents = [m["content"] for m in with_few_shot(history, SHOTS[:1])]
    assert contents == [SYSTEM["content"], "earlier", "reply", "Q one", "A one", "now"]


def test_few_shot_does_not_mutate_and_zero_shot_is_identity():
    messages = [SYSTEM, {"role": "user", "content": "q"}]
    copy = [dict(m) for m in messages]
    assert with_few_shot(messages, ()) == messages
    with_few_shot(messages, SHOTS)
    assert messages == copy


@pytest.mark.parametrize("messages, shots, error", [
    ([SYSTEM], SHOTS, "no user turn"),
    ([{"role": "user", "content": "q"}], [("only one",)], "few_shot\\[0\\]"),
])
def test_few_shot_errors(messages, shots, error):
    with pytest.raises(ValueError, match=error):
        with_few_shot(messages, shots)


def test_built_prompt_holds_the_shots_in_order(tiny_tokenizer):
    examples = _examples(2)
    prompts = build_prompts(tiny_tokenizer, examples, SHOTS)
    assert prompts[1] == encode_prompt(tiny_tokenizer, with_few_shot(examples[1]["messages"], SHOTS))
    text = tiny_tokenizer.decode(prompts[1])
    positions = [text.index(part) for part in (SYSTEM["content"], "Q one", "A one", "Q two", "A two",
                                               "Sentence number 1.")]
    assert positions == sorted(positions)
    assert text.endswith("<|im_start|>assistant\n")


def test_few_shot_from_examples_takes_last_user_turn_and_completion():
    examples = _examples(3, completion="inform(name[X])")
    assert few_shot_from_examples(examples, 2) == [("Sentence number 0.", "inform(name[X])"),
                                                  ("Sentence number 1.", "inform(name[X])")]
    assert few_shot_from_examples(examples, 0) == []
    with pytest.raises(ValueError, match="only 3 rows"):
        few_shot_from_examples(examples, 4)


# --- evaluate_quality -----------------------------------------------------------------------------

def test_scores_what_the_model_generates(tiny_model):
    """References set to the model's own greedy outputs: every metric must be perfect."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    examples = _examples(5)
    settings = EvaluationSettings(max_examples=4, max_new_tokens=8, batch_size=3)
    outputs = generate_texts(model, tokenizer, build_prompts(tokenizer, examples[:4]), max_new_tokens=8,
                             batch_size=1, progress=False)
    for example, output in zip(examples, outputs):
        example["completion"] = output.text
    report = evaluate_quality(model, tokenizer, examples, TEXT_TASK, settings, label="tiny")
    assert report.label == "tiny" and report.n_examples == 4
    assert report.predictions == [o.text for o in outputs]
    assert report.references == [e["completion"] for e in examples[:4]]
    assert report.metrics["exact_match"] == 1.0 and report.metrics["rouge_l"] == 1.0
    assert 0 < report.metrics["mean_new_tokens"] <= 8
    assert report.metrics["truncation_rate"] == sum(not o.hit_eos for o in outputs) / 4


def test_wrong_references_score_low_and_structured_keys_appear(tiny_model):
    examples = _examples(3, completion="inform(name[Tomb Raider], rating[excellent])")
    settings = EvaluationSettings(max_examples=None, max_new_tokens=6, batch_size=2)
    report = evaluate_quality(tiny_model.model, tiny_model.tokenizer, examples, VIGGO_TASK, settings)
    assert report.n_examples == 3 and len(report.predictions) == 3
    assert {"field_f1", "parse_rate", "exact_match", "rouge_l"} <= set(report.metrics)
    assert report.metrics["exact_match"] == 0.0  # a random model does not write ViGGO


def test_few_shot_changes_the_prompt_the_model_sees(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    examples = _examples(3)
    settings = EvaluationSettings(max_examples=3, max_new_tokens=16, batch_size=3)
    report = evaluate_quality(model, tokenizer, examples, TEXT_TASK, settings, few_shot=SHOTS)
    expected = generate_texts(model, tokenizer, build_prompts(tokenizer, examples, SHOTS), max_new_tokens=16,
                              batch_size=3, progress=False)
    assert report.predictions == [o.text for o in expected]
    zero_shot = evaluate_quality(model, tokenizer, examples, TEXT_TASK, settings)
    assert zero_shot.predictions != report.predictions


def test_accepts_a_datasets_dataset(tiny_model):
    examples = datasets.Dataset.from_list(_examples(4))
    settings = EvaluationSettings(max_examples=2, max_new_tokens=3, batch_size=2)
    report = evaluate_quality(tiny_model.model, tiny_model.tokenizer, examples, TEXT_TASK, settings)
    assert report.n_examples == 2


def test_bad_reference_fails_before_any_generation():
    examples = _examples(3, completion="inform(name[X])")
    examples[1]["completion"] = "no MR here"
    with pytest.raises(ValueError, match=r"example 1 \(id row-1\).*not valid viggo_mr"):
        evaluate_quality(None, None, examples, VIGGO_TASK, EvaluationSettings())  # no model needed to fail


@pytest.mark.parametrize("broken, error", [
    ({"messages": [], "completion": "x"}, "messages"),
    ({"messages": [{"role": "user"}], "completion": "x"}, r"messages\[0\]"),
    ({"messages": [{"role": "user", "content": "q"}]}, "completion"),
])
def test_malformed_examples_name_the_row(tiny_tokenizer, broken, error):
    examples = _examples(1) + [broken]
    with pytest.raises(ValueError, match=f"example 1.*{error}"):
        evaluate_quality(None, tiny_tokenizer, examples, TEXT_TASK, EvaluationSettings())


def test_no_examples():
    with pytest.raises(ValueError, match="no examples"):
        evaluate_quality(None, None, [], TEXT_TASK, EvaluationSettings())
