"""The promotion gate: may the challenger replace the champion?

Pure functions over metric dicts, so the rule can be tested as a table and re-run by hand on the
numbers shown in MLflow. The decision is a list of checks that must all pass; each check explains
itself in a sentence. New criteria (for example a minimum speculative speed-up) are new entries in
`CHECKS` plus a field in `PromotionSettings`, without touching the quality rule.

The numbers given here must be comparable (the caller measures champion and challenger on the same
rows, see `tasks/eval_split.py`); the gate adds the metric's direction (`lorafleet/metric_catalog.py`),
so "better" and the margin point the same way for a score and for a latency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from lorafleet.sections.promotion import PromotionSettings

# Metrics are averages over a few hundred rows; two values this close are the same result, and
# `champion + margin` must not fail on float rounding (0.8 + 0.1 != 0.9).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateInputs:
    challenger: Mapping[str, float]
    base: Mapping[str, float]
    champion: Mapping[str, float] | None
    champion_version: str | None

    @property
    def has_champion(self) -> bool:
        # A champion version without metrics still counts: comparing with the base instead would
        # let a worse adapter replace a good one whose numbers were lost.
        return self.champion is not None or self.champion_version is not None


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why; `reasons` holds one sentence per check, in order."""

    promote: bool
    metric: str
    challenger_value: float | None
    reference_label: str
    reference_value: float | None
    required: float | None
    reasons: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    better: str = "higher"  # the metric's direction: `required` is a floor when higher, a ceiling when lower
    # Where each number came from ("challenger" -> "the first 16 rows of the test split of data 1a2b…"),
    # filled in by the caller that measured them; shown in the report so a decision can be audited.
    provenance: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


Check = Callable[[PromotionSettings, GateInputs], CheckResult]


def decide(settings: PromotionSettings, *, challenger: Mapping[str, float], base: Mapping[str, float],
           champion: Mapping[str, float] | None, champion_version: str | None) -> GateDecision:
    """Promote only when every check passes.

    First version (no champion): the challenger must beat the base model by more than the margin
    (strictly better when the margin is 0), since an adapter that does not beat the bare model
    should not be served. Later versions: challenger at least as good as champion ± margin (+ when
    higher is better, - when lower is), so an equally good retrain on fresh data may replace the
    champion when the margin is 0.
    """
    inputs = GateInputs(challenger=challenger, base=base, champion=champion,
                        champion_version=None if champion_version is None else str(champion_version))
    results = [check(settings, inputs) for check in CHECKS]
    label, reference = _reference(inputs, settings.metric)
    challenger_value = _value(challenger, settings.metric)
    return GateDecision(
        promote=all(result.passed for result in results),
        metric=settings.metric,
        challenger_value=challenger_value,
        reference_label=label,
        reference_value=reference,
        required=None if reference is None else _required(settings, reference),
        reasons=[result.reason for result in results],
        checks=results,
        better=settings.spec.better,
    )


def already_champion(settings: PromotionSettings, *, version: str | int,
                     challenger: Mapping[str, float]) -> GateDecision:
    """The decision for a challenger that is the champion already (a rerun after a crash past promotion)."""
    reason = f"v{version} is already the champion (an earlier attempt of this run promoted it); nothing to move."
    return GateDecision(promote=True, metric=settings.metric, challenger_value=_value(challenger, settings.metric),
                        reference_label=f"champion v{version}", reference_value=_value(challenger, settings.metric),
                        required=None, reasons=[reason], checks=[CheckResult("already champion", True, reason)],
                        better=settings.spec.better)


def render_markdown(decision: GateDecision, *, name: str, version: str | int, promoted: bool) -> str:
    """The gate report for MLflow and Prefect; `promoted` is False on a pass when auto-promotion is off."""
    if promoted:
        outcome = f"**promoted**: `{name}@champion` is now v{version}"
    elif decision.promote:
        outcome = "**passed, not promoted** (`promotion.auto_promote` is off; use `lorafleet promote`)"
    else:
        outcome = f"**held**: v{version} stays `{name}@challenger`"
    bound = "at least" if decision.better == "higher" else "at most"
    lines = [f"# Promotion gate: {name} v{version}", "", outcome, "",
             (f"Metric `{decision.metric}` ({decision.better} is better): challenger "
              f"{_fmt(decision.challenger_value)}, {decision.reference_label} {_fmt(decision.reference_value)}, "
              f"required {bound} {_fmt(decision.required)}."),
             "", "| check | result | reason |", "|---|---|---|"]
    for check in decision.checks:
        lines.append(f"| {check.name} | {'pass' if check.passed else 'fail'} | {_cell(check.reason)} |")
    if decision.provenance:
        lines += ["", "| number | measured on |", "|---|---|"]
        lines += [f"| {_cell(who)} | {_cell(where)} |" for who, where in decision.provenance.items()]
    return "\n".join(lines) + "\n"


def quality_check(settings: PromotionSettings, inputs: GateInputs) -> CheckResult:
    metric, margin, higher = settings.metric, settings.margin, settings.spec.higher_is_better
    name = f"quality ({metric}, {settings.spec.better} is better)"
    value = _value(inputs.challenger, metric)
    label, reference = _reference(inputs, metric)
    if value is None:
        return CheckResult(name, False, f"The challenger has no {metric} result, so it cannot be compared "
                                        f"with the {label}; not promoting.")
    if reference is None:
        hint = " Promote by hand with `lorafleet promote` if intended." if inputs.has_champion else ""
        return CheckResult(name, False, f"The {label} has no {metric} result to compare with; "
                                        f"not promoting.{hint}")
    required = _required(settings, reference)
    sign = "+" if higher else "-"
    ties = math.isclose(value, required, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE)
    improves = value > required if higher else value < required
    if inputs.has_champion:
        passed = improves or ties
        relation = "reaches" if passed else "falls short of"
        outcome = "promoting" if passed else f"keeping the {label}"
        return CheckResult(name, passed, f"Challenger {metric} {value:.4f} {relation} the {label}'s "
                                         f"{reference:.4f} {sign} margin {margin:.4f} = {required:.4f}; "
                                         f"{outcome}.")
    passed = improves and not ties
    relation = "beats" if passed else "does not beat"
    outcome = "promoting the first version" if passed else "not promoting"
    return CheckResult(name, passed, f"First version: challenger {metric} {value:.4f} {relation} the "
                                     f"{label}'s {reference:.4f} by more than the margin {margin:.4f}; "
                                     f"{outcome}.")


SPEEDUP = "speedup"


def speed_check(settings: PromotionSettings, inputs: GateInputs) -> CheckResult:
    """Minimum speed-up, and no slow-down beyond `speed_margin` against the champion.

    An adapter without speculative heads decodes at its plain speed: its speed-up counts as 1.0.
    """
    name = "speed (speedup)"
    if settings.min_speedup is None and settings.speed_margin is None:
        return CheckResult(name, True, "No speed requirement configured.")
    value = _value(inputs.challenger, SPEEDUP)
    value = 1.0 if value is None else value
    reasons, passed = [], True
    if settings.min_speedup is not None:
        ok = value >= settings.min_speedup - _TOLERANCE
        passed &= ok
        reasons.append(f"speed-up {value:.2f}x {'reaches' if ok else 'is below'} the required "
                       f"{settings.min_speedup:.2f}x")
    if settings.speed_margin is not None and inputs.has_champion:
        champion = _value(inputs.champion or {}, SPEEDUP)
        champion = 1.0 if champion is None else champion
        floor = champion * (1 - settings.speed_margin)
        ok = value >= floor - _TOLERANCE
        passed &= ok
        reasons.append(f"speed-up {value:.2f}x {'is within' if ok else 'falls below'} the champion's "
                       f"{champion:.2f}x minus {settings.speed_margin:.0%} = {floor:.2f}x")
    if not reasons:
        return CheckResult(name, True, "First version: no champion speed to compare with.")
    return CheckResult(name, passed, "Challenger " + "; ".join(reasons) + ".")


# Every check runs (so the report lists all failures at once); promotion needs all to pass.
CHECKS: tuple[Check, ...] = (quality_check, speed_check)


def _reference(inputs: GateInputs, metric: str) -> tuple[str, float | None]:
    if inputs.has_champion:
        label = f"champion v{inputs.champion_version}" if inputs.champion_version else "champion"
        return label, _value(inputs.champion or {}, metric)
    return "base model", _value(inputs.base, metric)


def _required(settings: PromotionSettings, reference: float) -> float:
    """The bar the challenger must reach: the margin is an improvement in the metric's better direction."""
    return reference + settings.margin if settings.spec.higher_is_better else reference - settings.margin


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _value(metrics: Mapping[str, float], metric: str) -> float | None:
    """A NaN or a missing entry both mean "not measured"."""
    raw = metrics.get(metric)
    if raw is None:
        return None
    value = float(raw)
    return value if math.isfinite(value) else None
