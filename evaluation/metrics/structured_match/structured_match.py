"""`evaluate` metric: exact match plus field-level precision/recall/F1 for structured outputs.

Written for lorafleet because hub metrics cannot be fetched offline; load it with
`evaluate.load("<this folder>")`. Parsing lives in `lorafleet.evaluation.parsing` so the metric and
the rest of the project agree on what a field is.

Counting rules (micro-averaged over fields, so long answers weigh more than short ones):

* A prediction that does not parse counts as zero fields predicted: it adds nothing to precision's
  denominator but its reference's fields are all missed, so recall and F1 drop while precision only
  reflects the answers that did parse. `parse_rate` reports how often that happened.
* A reference that does not parse is an error (wrong `output_format` or bad data), named by row.
* When no field was predicted and none was expected, precision = recall = F1 = 1; any other zero
  denominator gives 0.
* `set_match` is the fraction of rows whose field set equals the reference's: exact match that
  forgives key/slot order, spacing and case.
* With `output_format="text"` only `exact_match` is returned (there are no fields).
"""

from __future__ import annotations

import datasets
import evaluate

from lorafleet.evaluation.parsing import (
    STRUCTURED_FORMATS,
    check_output_format,
    normalise_whitespace,
    parse_fields,
)

_DESCRIPTION = "Exact match and micro-averaged field precision/recall/F1 over parsed JSON or ViGGO MRs."
_INPUTS = """
Args:
    predictions (list[str]): model outputs.
    references (list[str]): expected outputs, same length.
    output_format (str): "json", "viggo_mr" or "text".
Returns:
    exact_match, and for structured formats field_precision, field_recall, field_f1, set_match, parse_rate.
"""


class StructuredMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str],
                 output_format: str = "json") -> dict[str, float]:
        output_format = check_output_format(output_format)
        if not predictions:
            raise ValueError("structured_match: no predictions to score")
        n = len(predictions)
        exact = sum(normalise_whitespace(prediction) == normalise_whitespace(reference)
                    for prediction, reference in zip(predictions, references))
        result = {"exact_match": exact / n}
        if output_format not in STRUCTURED_FORMATS:
            return result

        matched = predicted = expected = parsed = same_set = 0
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            gold = parse_fields(reference, output_format)
            if gold is None:
                raise ValueError(f"structured_match: reference {index} is not valid {output_format}: "
                                 f"{reference[:120]!r}")
            fields = parse_fields(prediction, output_format)
            if fields is not None:
                parsed += 1
                same_set += fields == gold
            fields = fields or frozenset()
            matched += len(fields & gold)
            predicted += len(fields)
            expected += len(gold)
        precision, recall = _ratio(matched, predicted, expected), _ratio(matched, expected, predicted)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result.update(field_precision=precision, field_recall=recall, field_f1=f1,
                      set_match=same_set / n, parse_rate=parsed / n)
        return result


def _ratio(matched: int, denominator: int, other: int) -> float:
    """matched / denominator; 1 when there was nothing to predict and nothing predicted, else 0 on empty."""
    if denominator:
        return matched / denominator
    return 1.0 if other == 0 else 0.0
