"""Where an existing adapter comes from: a local folder or the MLflow registry.

Used when one adapter builds on another (a `turbo` adapter's `base_adapter`) and by the benchmark
command. A registry alias is pinned to the version it points at now, so the lineage recorded in the
new adapter's manifest keeps meaning the same weights after the alias moves.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.models.adapter_dir import validate_adapter_dir
from lorafleet.settings import Settings

REGISTRY_SCHEME = "models:/"


def parse_registry_uri(uri: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` → (NAME, ALIAS or VERSION)."""
    body = uri[len(REGISTRY_SCHEME):]
    name, sep, ref = body.partition("@") if "@" in body else body.partition("/")
    if not name or not sep or not ref:
        raise ValueError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, ref


def registry_uri(reference: str) -> str:
    """The serving-style names `NAME`, `NAME@ALIAS`, `NAME@VERSION` as `models:/` URIs."""
    if reference.startswith(REGISTRY_SCHEME):
        return reference
    name, _, ref = reference.partition("@")
    ref = ref or "champion"
    return f"{REGISTRY_SCHEME}{name}/{ref}" if ref.isdigit() else f"{REGISTRY_SCHEME}{name}@{ref}"


def resolve_model_reference(reference: str, settings: Settings) -> tuple[Path, str]:
    """An adapter folder, a `models:/` URI, or a registered `NAME[@ALIAS|@VERSION]` → (folder, pinned)."""
    if Path(reference).expanduser().is_dir():
        return resolve_adapter_source(reference, settings)
    return resolve_adapter_source(registry_uri(reference), settings)


def resolve_adapter_source(reference: str, settings: Settings) -> tuple[Path, str]:
    """(local adapter folder, pinned reference) for a folder path or a `models:/` URI."""
    if reference.startswith(REGISTRY_SCHEME):
        from lorafleet.tasks import registry, tracking

        name, ref = parse_registry_uri(reference)
        client = tracking.mlflow_client(settings)
        version = registry.get_version(client, name, ref)
        folder = registry.download_adapter(client, name, version.version, settings.adapter_download_dir)
        validate_adapter_dir(folder)
        return folder, f"{REGISTRY_SCHEME}{name}/{version.version}"
    folder = Path(reference).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter {reference!r}: no such folder (or use models:/NAME@ALIAS)")
    validate_adapter_dir(folder)
    return folder, str(folder)
