"""Run the gate and move `champion` as one compare-and-set, safe against concurrent promotions.

Reading the champion and moving the alias are two registry calls; two challengers judged at once
(0.95 and 0.71 against a 0.70 champion) would both pass and the last writer would win. Here the
decision is made against a champion read at the start, and the alias moves only if that champion is
still in place (`registry.move_champion_if`, under the per-name promotion lock). If another promotion
got there first, the new champion is read, measured on the same rows, and the decision is made again.
Measuring (which may re-evaluate a champion for minutes) happens outside the lock.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow import MlflowClient

from lorafleet.sections.promotion import PromotionSettings
from lorafleet.tasks import gate as gate_logic
from lorafleet.tasks import registry
from lorafleet.tasks.eval_split import ChampionNumbers, ChampionNumbersFn

log = logging.getLogger(__name__)

# Each retry means another promotion of this name won in between; more than a few in a row means
# something keeps moving the alias, and a person should look.
MAX_ATTEMPTS = 5


class ChampionKeepsMoving(registry.RegistryError):
    """The champion moved during every attempt to judge against it."""


@dataclass(frozen=True)
class GateOutcome:
    decision: gate_logic.GateDecision
    promoted: bool
    champion: ChampionNumbers | None  # the champion the final decision was made against


def gate_and_promote(client: MlflowClient, name: str, version: str | int, *, settings: PromotionSettings,
                     challenger: Mapping[str, float], base: Mapping[str, float],
                     champion_numbers: ChampionNumbersFn, provenance: Mapping[str, str],
                     auto_promote: bool = True) -> GateOutcome:
    """Decide whether `version` replaces the champion and, if so and `auto_promote`, move the alias.

    `challenger` and `base` were measured on one split; `champion_numbers` gives a champion's metrics
    on that same split (re-evaluating it when needed). `provenance` says where the challenger's and
    base's numbers came from; the champion's source is added for the report.
    """
    version = str(version)
    for _attempt in range(MAX_ATTEMPTS):
        champion = registry.get_champion(client, name)
        if champion is not None and str(champion.version) == version:
            decision = gate_logic.already_champion(settings, version=version, challenger=challenger)
            return GateOutcome(_with(decision, provenance, None), promoted=True, champion=None)
        numbers = champion_numbers(champion) if champion is not None else None
        decision = _with(gate_logic.decide(
            settings, challenger=challenger, base=base,
            champion=numbers.metrics if numbers is not None else None,
            champion_version=None if champion is None else str(champion.version)), provenance, numbers)
        if not (decision.promote and auto_promote):
            return GateOutcome(decision, promoted=False, champion=numbers)
        expected = None if champion is None else str(champion.version)
        if registry.move_champion_if(client, name, version, expected=expected, reason="; ".join(decision.reasons)):
            return GateOutcome(decision, promoted=True, champion=numbers)
        log.info("%s: the champion moved while v%s was judged against v%s; judging again", name, version, expected)
    raise ChampionKeepsMoving(f"{name}: the champion moved during each of {MAX_ATTEMPTS} attempts to judge "
                              f"v{version} against it; v{version} stays challenger. Run `lorafleet promote` "
                              "once the concurrent promotions have finished.")


def _with(decision: gate_logic.GateDecision, provenance: Mapping[str, str],
          numbers: ChampionNumbers | None) -> gate_logic.GateDecision:
    where = dict(provenance)
    if numbers is not None:
        where[f"champion v{numbers.version}"] = numbers.source
    return dataclasses.replace(decision, provenance=where)
