"""Which rows a number was measured on, and the champion's numbers on the challenger's rows.

A score is only comparable with another score on the same rows under the same evaluation settings:
after `retrain` reacts to a data change, or after `evaluation.max_examples` changes, the champion's
recorded number came from other rows. So every registered version records its `EvalSplit` (tag
`eval_split`), and before the gate compares, the champion is re-evaluated on the challenger's split
unless it was measured there already. A re-evaluation is cached as a tag on the champion version
(`eval_split.<key>`), keyed by data fingerprint + evaluated rows + evaluation settings; the version
itself is the rest of the key, so a second gate on the same rows reads the tag instead of generating.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from lorafleet.config import FinetuneConfig
from lorafleet.models.cache import sha256_text
from lorafleet.sections.evaluation import EvaluationSettings
from lorafleet.settings import Settings
from lorafleet.tasks import registry
from lorafleet.tasks.data.prepare import PreparedData
from lorafleet.tasks.evaluate import evaluate_on_rows

log = logging.getLogger(__name__)

SPLIT_TAG = "eval_split"  # on every version: the split its own `metric.*` tags were measured on
CACHE_TAG_PREFIX = "eval_split."  # `eval_split.<key>`: this version re-evaluated on another split
TEST_SPLIT = "test"
# Settings that change no adapter number: the base model's few-shot variant is not compared with champions.
_NOT_IN_KEY = {"base_few_shot"}


@dataclass(frozen=True)
class EvalSplit:
    """The rows and settings behind a set of metrics: equal keys mean comparable numbers."""

    data_fingerprint: str
    rows: int
    settings_hash: str
    split: str = TEST_SPLIT

    @classmethod
    def of(cls, prepared: PreparedData, evaluation: EvaluationSettings, rows: int) -> EvalSplit:
        """The split `evaluate_adapter` scored: the first `rows` test rows of `prepared`."""
        settings = evaluation.model_dump(mode="json", exclude=_NOT_IN_KEY)
        return cls(data_fingerprint=prepared.fingerprint, rows=rows,
                   settings_hash=sha256_text(json.dumps(settings, sort_keys=True))[:16])

    @property
    def key(self) -> str:
        return sha256_text(self.split, self.data_fingerprint, str(self.rows), self.settings_hash)[:16]

    def describe(self) -> str:
        return (f"the first {self.rows} rows of the {self.split} split of data {self.data_fingerprint[:16]} "
                f"(split {self.key})")

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_tag(cls, raw: str | None) -> EvalSplit | None:
        """None for a missing or unreadable tag (versions registered before splits were recorded)."""
        if not raw:
            return None
        try:
            return cls(**json.loads(raw))
        except (json.JSONDecodeError, TypeError):
            return None


@dataclass(frozen=True)
class ChampionNumbers:
    """The champion's metrics on the challenger's split (None: not measurable), and how they were obtained."""

    version: str
    metrics: dict[str, float] | None
    source: str


ChampionNumbersFn = Callable[[ModelVersion], ChampionNumbers]


def version_split(version: ModelVersion) -> EvalSplit | None:
    return EvalSplit.from_tag(version.tags.get(SPLIT_TAG))


def recorded_numbers(version: ModelVersion, split: EvalSplit) -> ChampionNumbers | None:
    """The version's metrics on `split` without generating anything, or None when it was never measured there."""
    own = version_split(version)
    if own is not None and own.key == split.key:
        return ChampionNumbers(str(version.version), registry.version_metrics(version),
                               f"recorded at its registration on the same rows: {split.describe()}")
    raw = version.tags.get(CACHE_TAG_PREFIX + split.key)
    if raw:
        try:
            cached = json.loads(raw)
            metrics = {str(k): float(v) for k, v in cached["metrics"].items()}
            return ChampionNumbers(str(version.version), metrics,
                                   f"re-evaluated on the same rows at {cached.get('evaluated_at', '?')} "
                                   f"(cached): {split.describe()}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("%s v%s: tag %s is unreadable; re-evaluating", version.name, version.version,
                        CACHE_TAG_PREFIX + split.key)
    return None


def remember(client: MlflowClient, version: ModelVersion, split: EvalSplit, metrics: Mapping[str, float]) -> None:
    """Cache a re-evaluation on the version, so the next gate on the same rows does not regenerate."""
    value = json.dumps({"split": asdict(split), "metrics": dict(metrics),
                        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds")}, sort_keys=True)
    client.set_model_version_tag(version.name, str(version.version), CACHE_TAG_PREFIX + split.key, value)


def champion_numbers_on(client: MlflowClient, settings: Settings, config: FinetuneConfig, prepared: PreparedData,
                        split: EvalSplit, *, progress: bool = True) -> ChampionNumbersFn:
    """For the gate: a champion's metrics on `split` (the challenger's), re-evaluated when not yet known."""

    def numbers(champion: ModelVersion) -> ChampionNumbers:
        found = recorded_numbers(champion, split)
        if found is not None:
            return found
        own = version_split(champion)
        was = own.describe() if own is not None else "rows it did not record"
        log.info("%s v%s was measured on %s; re-evaluating it on %s", champion.name, champion.version, was,
                 split.describe())
        folder = registry.download_adapter(client, champion.name, champion.version, settings.adapter_download_dir)
        metrics = evaluate_on_rows(config, prepared, folder, settings, progress=progress)
        remember(client, champion, split, metrics)
        return ChampionNumbers(str(champion.version), metrics,
                               f"re-evaluated now on the same rows (its own numbers came from {was}): "
                               f"{split.describe()}")

    return numbers


def rows_of_version(client: MlflowClient, settings: Settings,
                    version: ModelVersion) -> tuple[FinetuneConfig, PreparedData, EvalSplit] | str:
    """The config, prepared rows and split a registered version was evaluated on, when this machine still has
    them (the `promote` flow re-evaluates a champion on them); otherwise a sentence saying what is missing."""
    split = version_split(version)
    if split is None:
        return f"v{version.version} records no evaluation split (registered before splits were recorded)"
    folder = settings.prepared_data_dir / version.name / split.data_fingerprint[:16]
    try:
        prepared = PreparedData.from_dir(folder)
    except FileNotFoundError:
        return f"the test rows of v{version.version} (data {split.data_fingerprint[:16]}) are not on this machine"
    try:
        manifest = registry.read_run_manifest(client, version.run_id)
        config = FinetuneConfig.model_validate(manifest.training_config)
    except (registry.RegistryError, ValueError) as error:
        return f"the config of v{version.version} cannot be read back from its run: {error}"
    rebuilt = EvalSplit.of(prepared, config.evaluation, split.rows)
    if prepared.fingerprint != split.data_fingerprint or rebuilt.key != split.key:
        return f"the prepared rows or evaluation settings of v{version.version} no longer match its split"
    return config, prepared, split
