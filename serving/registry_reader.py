"""Read-only access to the MLflow Model Registry for serving: find versions, download adapters.

Serving never writes to the registry (promotion is the pipeline's job). A version is downloaded once
to `<download_dir>/<name>/v<version>/`, built in a staging folder and renamed into place, so a crash or
a second server process never sees (or trusts) a half-downloaded adapter.

Names come from unauthenticated clients, so this is the last line of defence for the disk: a name that
breaks the registered-model name rule (`lorafleet.names`), a bad alias or version is VersionNotFound
before any I/O, and nothing (no folder, no lock file) is created until the registry has confirmed that
the version exists. The rule also makes every name a single safe path component.
"""

from __future__ import annotations

import collections
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorafleet.models.adapter_dir import AdapterManifest, validate_adapter_dir
from lorafleet.models.cache import atomic_directory, file_lock
from lorafleet.names import NAME_RULE, is_alias, is_registered_name, is_version, shorten

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
_DOWNLOADING = ".downloading"


class VersionNotFound(LookupError):
    """The registry has no such model, version or alias."""


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


class RegistryReader:
    def __init__(self, tracking_uri: str, download_dir: Path) -> None:
        from mlflow import MlflowClient

        self._tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._download_dir = Path(download_dir)

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
        _check_name(name)
        if not is_alias(alias):
            raise VersionNotFound(f"{shorten(alias)!r} is not an alias: 1-255 letters, digits, '_' or '-'")
        try:
            return int(self._client.get_model_version_by_alias(name, alias).version)
        except Exception as error:
            _raise_unless_missing(error)
            raise VersionNotFound(f"registered model {name!r} has no alias {alias!r}") from error

    def _download_uri(self, name: str, version: int) -> str:
        _check_name(name)
        _check_version(name, version)
        try:
            return self._client.get_model_version_download_uri(name, str(version))
        except Exception as error:
            _raise_unless_missing(error)
            raise VersionNotFound(f"registered model {name!r} has no version {version}") from error

    def has_version(self, name: str, version: int) -> bool:
        """Whether the registry holds this version: a read, nothing is written."""
        try:
            self._download_uri(name, version)
        except VersionNotFound:
            return False
        return True

    def fetch(self, name: str, version: int) -> FetchedAdapter:
        """The version's adapter directory on local disk (downloaded on first use), validated.

        The registry is asked first: for a name or version it does not know, nothing is written."""
        import mlflow

        _check_name(name)
        _check_version(name, version)
        target = self._download_dir / name / f"v{version}"
        if not target.is_dir():
            source = self._download_uri(name, version)  # VersionNotFound before any folder or lock exists
            with file_lock(self._download_dir / name / f".v{version}.lock"):
                if not target.exists():
                    with atomic_directory(target) as staging:
                        # Not `models:/name/version`: that resolves against MLflow's *default* registry URI,
                        # which is ./mlflow.db unless set globally; the version's own source needs no registry.
                        landed = Path(
                            mlflow.artifacts.download_artifacts(
                                artifact_uri=source,
                                dst_path=str(staging / _DOWNLOADING),
                                tracking_uri=self._tracking_uri,
                            )
                        )
                        for item in landed.iterdir():  # `runs:/id/adapter` lands in <dst>/adapter/: flatten
                            shutil.move(str(item), str(staging / item.name))
                        shutil.rmtree(staging / _DOWNLOADING)
                        validate_adapter_dir(staging)
                    log.info("downloaded %s version %s to %s", name, version, target)
        return FetchedAdapter(name=name, version=version, path=target, manifest=validate_adapter_dir(target))


def _all_pages(search):
    token = None
    while True:
        page = search(max_results=100, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _check_name(name: str) -> None:
    if not is_registered_name(name):
        raise VersionNotFound(f"{shorten(str(name))!r} is not a registered model name: names are {NAME_RULE}")


def _check_version(name: str, version: int) -> None:
    if not is_version(version):
        raise VersionNotFound(f"registered model {name!r} has no version {shorten(str(version))}")


def _raise_unless_missing(error: Exception) -> None:
    """Re-raise anything but a plain 'does not exist': a broken store must not look like a 404."""
    if getattr(error, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        raise error
