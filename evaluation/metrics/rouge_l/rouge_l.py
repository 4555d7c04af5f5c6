"""`evaluate` metric: mean ROUGE-L F-measure, computed by `rouge_score` (the hub's `rouge` needs the network).

Per-row F-measures are averaged (no bootstrap: the mean is what the hub metric's aggregator centres
on, and it is deterministic). rouge_score's default tokenizer lowercases and keeps only ASCII letters
and digits, so punctuation-only differences do not count. Two texts that are identical after
whitespace normalisation score 1 even when they hold no scorable token (rouge_score gives 0 there,
which would punish a correct empty answer).
"""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

from lorafleet.evaluation.parsing import normalise_whitespace

_INPUTS = """
Args:
    predictions (list[str]): model outputs.
    references (list[str]): expected outputs, same length.
    use_stemmer (bool): Porter-stem words before matching (default False).
Returns:
    rouge_l: mean ROUGE-L F-measure in [0, 1].
"""


class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean ROUGE-L F-measure (longest common subsequence) via rouge_score, offline.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions: list[str], references: list[str],
                 use_stemmer: bool = False) -> dict[str, float]:
        if not predictions:
            raise ValueError("rouge_l: no predictions to score")
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        total = 0.0
        for prediction, reference in zip(predictions, references):
            if normalise_whitespace(prediction) == normalise_whitespace(reference):
                total += 1.0
            else:
                total += scorer.score(reference, prediction)["rougeL"].fmeasure
        return {"rouge_l": total / len(predictions)}
