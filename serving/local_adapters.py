"""Adapters served from local folders: which folders may be read, which names may be used, what is read.

An admin may serve a folder that never went through the registry (`POST /admin/adapters/load` with
`name` and `path`). That is a file read on the admin's behalf, so it is off until `adapter_roots`
names the folders allowed, and a path is checked after following symlinks: a link inside a root to a
folder elsewhere is outside. The folder's manifest is checked like a registry version's; a plain PEFT
folder (no `lorafleet.json`) is accepted too, its base model then only checked by its weight shapes
when the engine reads it. The fingerprint tells a rewritten folder (a retrained adapter in the same
place, to be read again) from an unchanged one (a no-op).

The catalogue (`adapters.AdapterCatalogue.load_local`) applies these rules; this module holds no state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from lorafleet.models.adapter_dir import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    AdapterManifest,
    InvalidAdapterDir,
    validate_adapter_dir,
)

log = logging.getLogger(__name__)

LOCAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Fingerprint = tuple[tuple[str, int, int], ...]


class InvalidLocalAdapter(ValueError):
    """A local adapter request names a bad folder or name (HTTP 400)."""


class PathNotAllowed(PermissionError):
    """A local adapter folder outside every configured adapter root (HTTP 403)."""


def inside_roots(path: Path, roots: Sequence[Path]) -> Path:
    """`path` resolved (symlinks followed), if it lies under one of the (resolved) `roots`."""
    if not roots:
        raise PathNotAllowed("loading adapters from local paths is off: no adapter roots are configured "
                             "(setting adapter_roots)")
    if not path.is_absolute():
        raise InvalidLocalAdapter(f"the adapter path must be absolute, got {str(path)!r}")
    real = path.resolve()  # symlinks followed: a link inside a root to a folder elsewhere is outside
    if not any(real.is_relative_to(root) for root in roots):
        listed = ", ".join(str(root) for root in roots)
        raise PathNotAllowed(f"{path} is not under an adapter root ({listed})")
    return real


def check_local_name(name: str, base_model_id: str) -> None:
    """A name clients can send as `model` (and the generator can key adapters by, once sanitised)."""
    if not LOCAL_NAME.match(name) or name == base_model_id:
        raise InvalidLocalAdapter(
            f"adapter name {name!r} is not usable: 1-64 letters, digits, '.', '_' or '-', not the base model id"
        )


def read_local_manifest(folder: Path) -> AdapterManifest | None:
    """The folder's manifest, validated; None for a plain PEFT folder (no lorafleet.json), whose base
    model can only be checked by its weight shapes when it is read. The caller checks the base model."""
    if not folder.is_dir():
        raise InvalidLocalAdapter(f"{folder} is not a directory")
    if not (folder / MANIFEST_FILE).exists() and (folder / PEFT_CONFIG_FILE).exists():
        log.warning("%s has no %s: serving it as a plain PEFT adapter", folder, MANIFEST_FILE)
        return None
    try:
        return validate_adapter_dir(folder)
    except InvalidAdapterDir as error:
        raise InvalidLocalAdapter(str(error)) from None


def folder_fingerprint(folder: Path) -> Fingerprint:
    """Changes when any file in the folder is rewritten: a retrained adapter in the same place reloads."""
    return tuple(sorted((item.name, item.stat().st_size, item.stat().st_mtime_ns)
                        for item in folder.iterdir() if item.is_file()))
