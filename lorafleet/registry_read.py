"""Read-only access to the MLflow Model Registry: find versions, download adapters. The one reading module.

The server imports this module (it may not import `tasks/`), and `tasks/registry.py` extends it with the
writes (register, promote, roll back), so both sides share one meaning of `champion` and `challenger`, one
name check and one atomic download. Serving never writes to the registry (promotion is the pipeline's job).

A version is downloaded once to `<download_dir>/<name>/v<version>/`, built in a staging folder and renamed
into place under a per-version file lock, so a crash or a second process never sees (or trusts) a
half-downloaded adapter.

Names come from unauthenticated clients, so this is the last line of defence for the disk: a name that
breaks the registered-model name rule (`lorafleet.names`), a bad alias or version is refused before any
I/O, and nothing (no folder, no lock file) is created until the registry has confirmed that the version
exists. The rule also makes every name a single safe path component. Clients are opened through
`mlflow_store.store_client`, under the store-creation lock the pipeline takes too.
"""

from __future__ import annotations

import collections
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.mlflow_store import store_client
from lorafleet.models.adapter_dir import MANIFEST_FILE, AdapterManifest, validate_adapter_dir
from lorafleet.models.cache import atomic_directory, file_lock
from lorafleet.names import NAME_RULE, is_alias, is_registered_name, is_version, shorten

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"  # the served version
CHALLENGER = "challenger"  # the newest candidate
_DOWNLOADING = ".downloading"
# MLflow's answers that mean "no such model, version or alias"; anything else is a broken store.
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class VersionNotFound(LookupError):
    """The registry has no such model, version or alias (or the name could not be one)."""


@dataclass(frozen=True)
class FetchedAdapter:
    """A registry version on local disk, with its validated manifest."""

    name: str
    version: int
    path: Path
    manifest: AdapterManifest


@dataclass(frozen=True)
class RegisteredModelInfo:
    """One registered model as the admin listing shows it."""

    name: str
    aliases: dict[str, int]  # alias -> version
    versions: tuple[int, ...]  # ascending


def check_name(name: object, error: type[LookupError] = VersionNotFound) -> None:
    """`error` unless `name` follows the registered-model name rule: checked before any registry call."""
    if not is_registered_name(name):
        raise error(f"{shorten(repr(name))} is not a registered model name: names are {NAME_RULE}")


def check_version(name: str, version: object, error: type[LookupError] = VersionNotFound) -> None:
    """`error` unless `version` is a registry version number (an int in 1..2**63-1)."""
    if not is_version(version):
        raise error(f"registered model {name!r} has no version {shorten(str(version))}")


def check_alias(name: str, alias: object, error: type[LookupError] = VersionNotFound) -> None:
    if not is_alias(alias):
        raise error(f"registered model {name!r} has no alias {shorten(repr(alias))}: aliases are 1-255 letters, "
                    "digits, '_' or '-'")


def raise_unless_missing(error: Exception) -> None:
    """Re-raise anything but a plain 'does not exist': a broken store must not look like a 404."""
    if getattr(error, "error_code", "") not in _MISSING:
        raise error


def download_version(client: MlflowClient, name: str, version: int, download_dir: Path, *,
                     check: Callable[[Path], Any] = validate_adapter_dir) -> Path:
    """The version's adapter directory at `<download_dir>/<name>/v<version>/`, downloaded on first use.

    The registry is asked first: for a name or version it does not know (VersionNotFound), nothing is
    written. The download is published only once complete and accepted by `check` (by default the full
    adapter-directory contract; a folder that fails it is never published). Reused while it holds a
    manifest."""
    import mlflow

    check_name(name)
    check_version(name, version)
    target = Path(download_dir) / name / f"v{version}"
    if (target / MANIFEST_FILE).is_file():
        return target
    try:
        source = client.get_model_version_download_uri(name, str(version))  # before any folder or lock exists
    except Exception as error:
        raise_unless_missing(error)
        raise VersionNotFound(f"registered model {name!r} has no version {version}") from error
    with file_lock(target.parent / f".v{version}.lock"):
        if not (target / MANIFEST_FILE).is_file():
            # overwrite: a leftover without a manifest (emptied by hand) is replaced, atomically.
            with atomic_directory(target, overwrite=True) as staging:
                # Not `models:/name/version`: that resolves against MLflow's *default* registry URI, which
                # is ./mlflow.db unless set globally; the version's own source needs no registry.
                landed = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging / _DOWNLOADING), tracking_uri=client.tracking_uri))
                for item in landed.iterdir():  # `runs:/id/adapter` lands in <dst>/adapter/: flatten
                    shutil.move(str(item), str(staging / item.name))
                shutil.rmtree(staging / _DOWNLOADING)
                check(staging)
            log.info("downloaded %s version %s to %s", name, version, target)
    return target


class RegistryReader:
    """The server's view of the registry: champions, aliases, versions, downloads. Never writes to it."""

    def __init__(self, tracking_uri: str, download_dir: Path) -> None:
        self._tracking_uri = tracking_uri
        self._download_dir = Path(download_dir)
        self._opened: MlflowClient | None = None

    @property
    def _client(self) -> MlflowClient:
        """Opened on first use (under the store-creation lock), not when the server is assembled."""
        if self._opened is None:
            self._opened = store_client(self._tracking_uri)
        return self._opened

    def champions(self) -> dict[str, int]:
        """name -> version for every registered model that has a `champion` alias.

        Models registered outside lorafleet under names that break the name rule are left out: they
        could not be requested, and their names are not safe folder names."""
        found: dict[str, int] = {}
        for model in _all_pages(self._client.search_registered_models):
            version = (model.aliases or {}).get(CHAMPION)
            if version is not None and is_registered_name(model.name):
                found[model.name] = int(version)
        return found

    def registered_models(self) -> list[RegisteredModelInfo]:
        """Every registered model with its aliases and versions: two paged searches, not one per model."""
        versions: dict[str, list[int]] = collections.defaultdict(list)
        for version in _all_pages(self._client.search_model_versions):
            versions[version.name].append(int(version.version))
        return [
            RegisteredModelInfo(
                name=model.name,
                aliases={alias: int(number) for alias, number in sorted((model.aliases or {}).items())},
                versions=tuple(sorted(versions.get(model.name, ()))),
            )
            for model in sorted(_all_pages(self._client.search_registered_models), key=lambda m: m.name)
        ]

    def version_for_alias(self, name: str, alias: str) -> int:
        check_name(name)
        check_alias(name, alias)
        try:
            return int(self._client.get_model_version_by_alias(name, alias).version)
        except Exception as error:
            raise_unless_missing(error)
            raise VersionNotFound(f"registered model {name!r} has no alias {alias!r}") from error

    def has_version(self, name: str, version: int) -> bool:
        """Whether the registry holds this version: a read, nothing is written (no call for a bad name)."""
        if not (is_registered_name(name) and is_version(version)):
            return False
        try:
            self._client.get_model_version_download_uri(name, str(version))
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a plain "does not exist"
            raise_unless_missing(error)
            return False
        return True

    def fetch(self, name: str, version: int) -> FetchedAdapter:
        """The version's adapter directory on local disk (downloaded on first use), validated."""
        path = download_version(self._client, name, version, self._download_dir)
        return FetchedAdapter(name=name, version=version, path=path, manifest=validate_adapter_dir(path))


def _all_pages(search):
    token = None
    while True:
        page = search(max_results=100, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
