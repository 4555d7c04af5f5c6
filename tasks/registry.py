"""The MLflow Model Registry as lorafleet uses it: one registered model per adapter name.

This module is the pipeline's side: it extends the read-only `lorafleet/registry_read.py` (which the
server imports too) with the writes, and takes from it `CHAMPION`/`CHALLENGER`, the name checks and the
one atomic download.

A version's source is the run's `adapter` artifact (the adapter directory). Two aliases carry the
meaning: `challenger` marks the newest candidate, `champion` the version that is served. Champion
moves are recorded (a registered-model tag with the ordered list of past champions, and
`promoted_at` / `promotion_reason` on the version) so that `rollback` can undo them.

Every move of `champion` (gate, `promote`, `rollback`) happens under the store's per-name promotion
lock (`tasks/locks.py`), and the gate moves it with `move_champion_if`, a compare-and-set: two gates
deciding at once cannot both win against the same old champion. A run registers at most one version.
That lock is a file lock, so it orders the writers of one machine only. MLflow's registry has no
conditional write (setting an alias overwrites it), so against writers on other machines each move
reads the alias back right after writing it: a move that another writer overtook is reported
(`ChampionMovedElsewhere`; `move_champion_if` returns False and the gate judges again) instead of being
recorded as done. This narrows the cross-host race to one round trip; it does not close it (see
`tasks/locks.py` for what would).

Version numbers are returned as `ModelVersion` objects whose `.version` may be an int (SQLite
store) or a str (REST); every function here accepts either and compares them as strings.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST

from lorafleet.mlflow_store import is_mlflow_error
from lorafleet.models.adapter_dir import MANIFEST_FILE, AdapterManifest, InvalidAdapterDir, read_manifest
from lorafleet.names import NAME_PATTERN, VERSION_PATTERN
from lorafleet.registry_read import (
    CHALLENGER,
    CHAMPION,
    VersionNotFound,
    check_alias,
    check_name,
    download_version,
)
from lorafleet.tasks.locks import promotion_lock

log = logging.getLogger(__name__)

ADAPTER_ARTIFACT_PATH = "adapter"
ADAPTER_MARKER_TAG = "lorafleet.adapter"  # on registered models made here; `list_adapters` shows only these
HISTORY_TAG = "lorafleet.champion_history"  # JSON list of versions, oldest champion first
HISTORY_LIMIT = 100
METRIC_TAG_PREFIX = "metric."
READY_TIMEOUT_S = 300.0


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked."""


class AdapterNotFound(RegistryError, VersionNotFound):
    """No such registered adapter, version or alias (the service answers 404)."""


class InvalidRegistration(RegistryError, ValueError):
    """The run cannot become a model version: it has no valid `adapter/lorafleet.json`."""


class VersionNotReady(RegistryError, ValueError):
    """The version is still being copied or failed to register; it cannot be served."""


class NoPreviousChampion(RegistryError, LookupError):
    """`rollback` found no earlier champion to return to."""


class ChampionMovedElsewhere(RegistryError, ValueError):
    """Read back right after the move, `champion` named another version: a writer that does not share this
    machine's promotion lock (another host on the same tracking server) moved it at the same moment."""


@dataclass(frozen=True)
class VersionSummary:
    version: str
    aliases: tuple[str, ...]
    status: str
    run_id: str | None
    created_at: str
    base_model: str | None
    method: str | None
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterSummary:
    """A row of `lorafleet models`; base model, method and metrics are the champion's, else the latest's."""

    name: str
    latest_version: str | None
    champion: str | None
    challenger: str | None
    base_model: str | None
    method: str | None
    metrics: dict[str, float]
    versions: tuple[VersionSummary, ...]  # newest first

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (`lorafleet models --json`)."""
        return asdict(self)


def version_tags(manifest: AdapterManifest) -> dict[str, str]:
    """The standard version tags, taken from the adapter's own manifest so they cannot disagree with it."""
    tags = {
        "base_model": manifest.base_model.id,
        "base_model_revision": manifest.base_model.revision,
        "method": manifest.method,
        "task": manifest.task.name,
    }
    if manifest.data_fingerprint:
        tags["data_fingerprint"] = manifest.data_fingerprint
    if manifest.lineage:  # a merge: which exact versions, with which weights, by which method
        tags["merged_from"] = ", ".join(f"{parent['reference']} x {parent['weight']!r}"
                                        for parent in manifest.lineage["parents"])
        tags["merge_recipe"] = json.dumps(manifest.lineage["recipe"], sort_keys=True)
    tags.update(metric_tags(manifest.metrics))
    return tags


def metric_tags(metrics: Mapping[str, float], prefix: str = METRIC_TAG_PREFIX) -> dict[str, str]:
    """Metrics as version tags, written exactly (`repr`): the gate compares values read back from them."""
    return {f"{prefix}{name}": repr(float(value)) for name, value in metrics.items()}


def read_run_manifest(client: MlflowClient, run_id: str) -> AdapterManifest:
    """The `lorafleet.json` logged under the run's `adapter` artifact; refuses runs without one."""
    wanted = f"{ADAPTER_ARTIFACT_PATH}/{MANIFEST_FILE}"
    try:
        paths = {info.path for info in client.list_artifacts(run_id, ADAPTER_ARTIFACT_PATH)}
    except MlflowException as error:
        if is_mlflow_error(error, RESOURCE_DOES_NOT_EXIST):
            raise InvalidRegistration(f"cannot register run {run_id}: no such MLflow run") from error
        raise
    if wanted not in paths:
        raise InvalidRegistration(f"cannot register run {run_id}: it has no `{wanted}` artifact; log the "
                                  f"adapter directory at artifact path `{ADAPTER_ARTIFACT_PATH}` first")
    with tempfile.TemporaryDirectory(prefix="lorafleet-manifest-") as tmp:
        local = Path(client.download_artifacts(run_id, wanted, tmp))
        try:
            return read_manifest(local.parent)
        except InvalidAdapterDir as error:
            raise InvalidRegistration(f"cannot register run {run_id}: `{wanted}` is not a valid "
                                      f"manifest: {error}") from error


def register_adapter(client: MlflowClient, *, name: str, run_id: str, tags: Mapping[str, str],
                     description: str = "") -> ModelVersion:
    """Register the run's adapter as a new version of `name` and point `challenger` at it.

    `tags` are added to (and override) the tags derived from the manifest. Registration is all or
    nothing: if any step after creating the version fails, the version is deleted (and the
    registered model too when this call created it) before the error propagates, so the service
    never sees a version without its tags. Idempotent per run: when the run already has a READY
    version of `name` (a rerun after a failure past registration), that version is returned as is.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"registered model name {name!r} is not valid: use 1-64 lowercase letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    existing = version_for_run(client, name, run_id)
    if existing is not None:
        log.info("run %s is already registered as %s v%s; reusing it", run_id, name, existing.version)
        return existing
    manifest = read_run_manifest(client, run_id)
    all_tags = {**version_tags(manifest), **{key: str(value) for key, value in tags.items()}}
    created_model = _ensure_registered_model(client, name)
    version: str | None = None
    try:
        source = f"runs:/{run_id}/{ADAPTER_ARTIFACT_PATH}"  # mlflow.register_model wants a LoggedModel here
        created = client.create_model_version(name, source=source, run_id=run_id,
                                              description=description or None, await_creation_for=0)
        version = str(created.version)
        _wait_until_ready(client, name, version)
        for key, value in all_tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
    except BaseException:
        _undo_registration(client, name, version, delete_model=created_model)
        raise
    log.info("registered %s v%s from run %s (alias %s)", name, version, run_id, CHALLENGER)
    return client.get_model_version(name, version)


def _ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Create the registered model if needed; True when this call created it."""
    try:
        client.create_registered_model(name, tags={ADAPTER_MARKER_TAG: "true"},
                                       description=f"lorafleet adapter `{name}`")
        return True
    except MlflowException as error:
        if not is_mlflow_error(error, RESOURCE_ALREADY_EXISTS):
            raise
    if client.get_registered_model(name).tags.get(ADAPTER_MARKER_TAG) != "true":
        client.set_registered_model_tag(name, ADAPTER_MARKER_TAG, "true")
    return False


def _wait_until_ready(client: MlflowClient, name: str, version: str,
                      timeout_s: float = READY_TIMEOUT_S) -> None:
    """Remote artifact stores may copy the source asynchronously; tags on a PENDING version could be lost."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.get_model_version(name, version)
        if current.status == "READY":
            return
        if current.status == "FAILED_REGISTRATION":
            message = current.status_message or "no message"
            raise RegistryError(f"{name} v{version} failed to register: {message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} v{version} still {current.status} after {timeout_s:.0f} s")
        time.sleep(0.5)


def _undo_registration(client: MlflowClient, name: str, version: str | None, *, delete_model: bool) -> None:
    """Best effort: a failure here is logged, and the caller re-raises the original error."""
    try:
        if version is not None:
            client.delete_model_version(name, version)
            log.warning("deleted half-registered %s v%s", name, version)
        if delete_model and not any(True for _ in _versions(client, name)):
            client.delete_registered_model(name)
    except MlflowException as error:
        log.error("could not clean up the failed registration of %s v%s: %s", name, version, error)


def version_for_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The READY version of `name` registered from `run_id` (the newest if an older release made several)."""
    if not NAME_PATTERN.match(name) or not run_id.isalnum():
        return None  # not a lorafleet name or run id; either would also need quoting inside the filter
    found = [v for v in _search_versions(client, f"name='{name}' AND run_id='{run_id}'") if v.status == "READY"]
    return max(found, key=lambda v: int(v.version)) if found else None


def get_version(client: MlflowClient, name: str, version_or_alias: str | int) -> ModelVersion:
    """Resolve `3`, `"3"`, `"latest"` or an alias such as `"champion"` to a model version.

    Names and references are checked by the shared rules (`lorafleet.names`) before the store is asked:
    `..`, a 5,000-digit version or a name no lorafleet adapter can have is AdapterNotFound, never a raw
    store error, and never a folder name for `download_adapter`."""
    ref = str(version_or_alias).strip()
    check_name(name, AdapterNotFound)
    if ref != "latest" and not VERSION_PATTERN.match(ref):
        check_alias(name, ref, AdapterNotFound)
    model = _registered_model(client, name)
    if ref == "latest":
        numbers = [int(v.version) for v in _versions(client, name)]
        if not numbers:
            raise AdapterNotFound(f"adapter {name!r} has no versions")
        ref = str(max(numbers))
    if not ref.isdigit():
        aliases = {alias: str(number) for alias, number in model.aliases.items()}
        if ref not in aliases:
            known = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "none"
            raise AdapterNotFound(f"adapter {name!r} has no alias {ref!r} (aliases: {known})")
        ref = aliases[ref]
    try:
        return client.get_model_version(name, ref)
    except MlflowException as error:
        if is_mlflow_error(error, RESOURCE_DOES_NOT_EXIST):
            raise AdapterNotFound(f"adapter {name!r} has no version {ref}") from error
        raise


def latest_version(client: MlflowClient, name: str) -> ModelVersion | None:
    """The highest-numbered version, or None when the adapter is unknown or has no versions."""
    try:
        return get_version(client, name, "latest")
    except AdapterNotFound:
        return None


def version_metrics(version: ModelVersion, prefix: str = METRIC_TAG_PREFIX) -> dict[str, float]:
    """Metrics recorded as `<prefix><name>` tags on a version (`metric.` = the adapter's own)."""
    metrics = {}
    for key, value in version.tags.items():
        if key.startswith(prefix):
            try:
                metrics[key[len(prefix):]] = float(value)
            except ValueError:
                log.warning("%s v%s: tag %s=%r is not a number", version.name, version.version, key, value)
    return metrics


def get_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The served version, or None when the adapter is unknown or has no champion yet."""
    try:
        model = _registered_model(client, name)
    except AdapterNotFound:
        return None
    version = model.aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(name, str(version))


def set_champion(client: MlflowClient, name: str, version: str | int, *, reason: str) -> None:
    """Point `champion` at `version` and record the move so it can be rolled back."""
    _check_reason(reason)
    with promotion_lock(client.tracking_uri, name):
        _set_champion(client, name, version, reason=reason)


def move_champion_if(client: MlflowClient, name: str, version: str | int, *, expected: str | int | None,
                     reason: str) -> bool:
    """Compare-and-set: point `champion` at `version` only if it still points at `expected` (None: no
    champion). False, and nothing moved, when another promotion got there first; the caller re-reads
    the champion and decides again."""
    _check_reason(reason)
    with promotion_lock(client.tracking_uri, name):
        current = _alias(_registered_model(client, name), CHAMPION)
        if current != (None if expected is None else str(expected)):
            log.info("%s champion moved to v%s while v%s was being judged against v%s; not moving it",
                     name, current, version, expected)
            return False
        try:
            _set_champion(client, name, version, reason=reason)
        except ChampionMovedElsewhere as error:
            log.warning("%s", error)
            return False
        return True


def promote(client: MlflowClient, name: str, version: str | int, reason: str) -> ModelVersion:
    """`lorafleet promote NAME VERSION`: like `set_champion`, for a version or alias given by a person."""
    _check_reason(reason)
    with promotion_lock(client.tracking_uri, name):
        target = get_version(client, name, version)
        _set_champion(client, name, target.version, reason=reason)
    return client.get_model_version(name, str(target.version))


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from_version, to_version)."""
    with promotion_lock(client.tracking_uri, name):
        return _rollback(client, name)


def _check_reason(reason: str) -> None:
    if not reason.strip():
        raise ValueError("set_champion needs a reason: it is recorded on the version and shown in history")


def _set_champion(client: MlflowClient, name: str, version: str | int, *, reason: str) -> None:
    """The move itself; the caller holds the promotion lock (flock is not re-entrant, so this takes none)."""
    target = get_version(client, name, str(version))
    new = str(target.version)
    if target.status != "READY":
        raise VersionNotReady(f"{name} v{new} is {target.status}, not READY: it cannot become champion")
    model = client.get_registered_model(name)
    current = _alias(model, CHAMPION)
    if current == new:
        log.info("%s v%s is already the champion", name, new)
        return
    history = _read_history(model)
    if current is not None and (not history or history[-1] != current):
        history.append(current)  # the alias was moved outside lorafleet; keep it reachable by rollback
    history.append(new)
    _mark_promoted(client, name, new, reason)
    client.set_registered_model_alias(name, CHAMPION, new)
    _verify_champion(client, name, new, moving_from=current)
    _write_history(client, name, history)
    log.info("%s champion: v%s -> v%s (%s)", name, current, new, reason)


def _verify_champion(client: MlflowClient, name: str, written: str, *, moving_from: str | None) -> None:
    """Read `champion` back after writing it: the one check MLflow allows against writers that do not
    share our lock. On a mismatch the history is left as the other writer made it (it is not written)."""
    now = _alias(client.get_registered_model(name), CHAMPION)
    if now != written:
        raise ChampionMovedElsewhere(
            f"{name}: champion was moved from v{moving_from} to v{written}, but reads back as v{now}: another "
            "writer (a process on another machine using the same tracking server) moved it at the same "
            "time. Check `lorafleet models` and promote again if needed; run promotions of one adapter "
            "from one place (e.g. the `promote` deployment) to avoid this.")


def _rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    model = _registered_model(client, name)
    current = _alias(model, CHAMPION)
    if current is None:
        raise NoPreviousChampion(f"adapter {name!r} has no champion, so there is nothing to roll back")
    history = _read_history(model)
    existing = {str(v.version) for v in _versions(client, name)}
    while history and (history[-1] == current or history[-1] not in existing):
        history.pop()
    if not history:
        raise NoPreviousChampion(f"adapter {name!r}: champion v{current} has no earlier champion "
                                 "to roll back to")
    previous = history[-1]
    now = _now()
    client.set_model_version_tag(name, current, "rolled_back_at", now)
    _mark_promoted(client, name, previous, f"rollback from v{current}", at=now)
    client.set_registered_model_alias(name, CHAMPION, previous)
    _verify_champion(client, name, previous, moving_from=current)
    _write_history(client, name, history)
    log.info("%s champion rolled back: v%s -> v%s", name, current, previous)
    return current, previous


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """Versions that were champion, oldest first (the last is the current one unless moved by hand)."""
    return _read_history(_registered_model(client, name))


def list_adapters(client: MlflowClient) -> list[AdapterSummary]:
    summaries = []
    for model in _registered_models(client):
        if model.tags.get(ADAPTER_MARKER_TAG) != "true":
            continue
        by_version: dict[str, list[str]] = {}
        for alias, number in model.aliases.items():
            by_version.setdefault(str(number), []).append(alias)
        versions = sorted(_versions(client, model.name), key=lambda v: int(v.version), reverse=True)
        rows = tuple(_summarize_version(v, tuple(sorted(by_version.get(str(v.version), []))))
                     for v in versions)
        champion, challenger = _alias(model, CHAMPION), _alias(model, CHALLENGER)
        headline = next((row for row in rows if row.version == champion), rows[0] if rows else None)
        summaries.append(AdapterSummary(
            name=model.name, latest_version=rows[0].version if rows else None, champion=champion,
            challenger=challenger, base_model=headline.base_model if headline else None,
            method=headline.method if headline else None, metrics=dict(headline.metrics) if headline else {},
            versions=rows))
    return sorted(summaries, key=lambda summary: summary.name)


def download_adapter(client: MlflowClient, name: str, version_or_alias: str | int, dst_root: Path) -> Path:
    """Download a version's adapter directory to `dst_root/<name>/v<version>/` (reused if present).

    Aliases are resolved first, so a moved alias downloads into a new folder and a running service
    can keep using the old one until it swaps. The folder appears only once complete (the server's
    download, `registry_read.download_version`), once it holds a valid manifest.
    """
    version = int(get_version(client, name, version_or_alias).version)
    return download_version(client, name, version, dst_root, check=read_manifest)


def _summarize_version(version: ModelVersion, aliases: tuple[str, ...]) -> VersionSummary:
    metrics = version_metrics(version)
    created = datetime.fromtimestamp((version.creation_timestamp or 0) / 1000, UTC)
    return VersionSummary(version=str(version.version), aliases=aliases, status=str(version.status),
                          run_id=version.run_id, created_at=created.isoformat(timespec="seconds"),
                          base_model=version.tags.get("base_model"), method=version.tags.get("method"),
                          metrics=metrics)


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if is_mlflow_error(error, RESOURCE_DOES_NOT_EXIST):
            raise AdapterNotFound(f"no registered adapter named {name!r}") from error
        raise


def _registered_models(client: MlflowClient) -> Iterator[RegisteredModel]:
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _versions(client: MlflowClient, name: str) -> Iterator[ModelVersion]:
    """Every version of `name` (note: MLflow leaves `.aliases` empty here; read aliases from the model)."""
    if not NAME_PATTERN.match(name):
        return  # not a lorafleet name; it would also need quoting inside the filter string
    yield from _search_versions(client, f"name='{name}'")


def _search_versions(client: MlflowClient, filter_string: str) -> Iterator[ModelVersion]:
    token = None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _alias(model: RegisteredModel, alias: str) -> str | None:
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def _read_history(model: RegisteredModel) -> list[str]:
    raw = model.tags.get(HISTORY_TAG)
    if not raw:
        return []
    try:
        history = json.loads(raw)
        if isinstance(history, list):
            return [str(item) for item in history]
    except json.JSONDecodeError:
        pass
    # The alias, not this tag, decides what is served: a damaged history only limits rollback.
    log.warning("%s: tag %s is not a JSON list (%r); ignoring the champion history",
                model.name, HISTORY_TAG, raw)
    return []


def _write_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))


def _mark_promoted(client: MlflowClient, name: str, version: str, reason: str, *,
                   at: str | None = None) -> None:
    client.set_model_version_tag(name, version, "promoted_at", at or _now())
    client.set_model_version_tag(name, version, "promotion_reason", reason)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
