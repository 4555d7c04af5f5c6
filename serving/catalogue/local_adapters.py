"""Adapters served from local folders: which folders may be read, which names may be used, what is read.

An admin may serve a folder that never went through the registry (`POST /admin/adapters/load` with
`name` and `path`). That is a file read on the admin's behalf, so it is off until `adapter_roots`
names the folders allowed, and a path is checked after following symlinks: a link inside a root to a
folder elsewhere is outside. So is a link to a file elsewhere: every entry of the folder must be a
regular file (or sub-folder) inside it once resolved (`adapter_dir.check_adapter_files`), which also
refuses a FIFO a reader would block on. The folder's manifest is checked like a registry version's; a plain PEFT
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
    adapter_file,
    check_adapter_files,
    validate_adapter_dir,
)
from lorafleet.names import MAX_PATH_LENGTH, control_characters
from lorafleet.names import shorten as shown

log = logging.getLogger(__name__)

LOCAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: `$` would let a trailing newline in
LOCAL_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"

Fingerprint = tuple[tuple[str, int, int], ...]


class InvalidLocalAdapter(ValueError):
    """A local adapter request names a bad folder or name (HTTP 400); `param` says which."""

    def __init__(self, message: str, *, param: str = "path") -> None:
        super().__init__(message)
        self.param = param


class PathNotAllowed(PermissionError):
    """A local adapter folder outside every configured adapter root (HTTP 403)."""


def inside_roots(path: Path, roots: Sequence[Path]) -> Path:
    """`path` resolved (symlinks followed), if it lies under one of the (resolved) `roots`."""
    if not roots:
        raise PathNotAllowed("loading adapters from local paths is off: no adapter roots are configured "
                             "(setting adapter_roots)")
    text = str(path)
    if len(text) > MAX_PATH_LENGTH or control_characters(text):
        raise InvalidLocalAdapter(f"the adapter path must be at most {MAX_PATH_LENGTH} characters without "
                                  "control characters (NUL, newlines)")
    if not path.is_absolute():
        raise InvalidLocalAdapter(f"the adapter path must be absolute, got {text!r}")
    try:
        real = path.resolve()  # symlinks followed: a link inside a root to a folder elsewhere is outside
    except (OSError, RuntimeError) as error:  # a link loop, a component longer than the system allows
        raise InvalidLocalAdapter(f"{path} cannot be resolved: {getattr(error, 'strerror', None) or error}"
                                  ) from None
    if not any(real.is_relative_to(root) for root in roots):
        listed = ", ".join(str(root) for root in roots)
        raise PathNotAllowed(f"{path} is not under an adapter root ({listed})")
    return real


def check_local_name(name: str, base_model_id: str) -> None:
    """A name clients can send as `model` (and the generator can key adapters by, once sanitised)."""
    if not LOCAL_NAME.match(name) or name == base_model_id:
        raise InvalidLocalAdapter(f"adapter name {shown(name)!r} is not usable: {LOCAL_NAME_RULE}, not the base "
                                  "model id", param="name")


def read_local_manifest(folder: Path) -> AdapterManifest | None:
    """The folder's manifest, validated; None for a plain PEFT folder (no lorafleet.json), whose base
    model can only be checked by its weight shapes when it is read. The caller checks the base model.

    Every entry of the folder is checked first: the engine (and PEFT) read files from it later."""
    try:
        if not folder.is_dir():
            raise InvalidLocalAdapter(f"{folder} is not a directory")
    except OSError as error:  # e.g. a path component longer than the file system allows
        raise InvalidLocalAdapter(f"{shown(str(folder))} cannot be read: {error.strerror}") from None
    try:
        check_adapter_files(folder)
        if not (folder / MANIFEST_FILE).exists() and (folder / PEFT_CONFIG_FILE).exists():
            adapter_file(folder, PEFT_CONFIG_FILE)
            log.warning("%s has no %s: serving it as a plain PEFT adapter", folder, MANIFEST_FILE)
            return None
        return validate_adapter_dir(folder)
    except InvalidAdapterDir as error:
        raise InvalidLocalAdapter(str(error)) from None


def folder_fingerprint(folder: Path) -> Fingerprint:
    """Changes when any file in the folder is rewritten: a retrained adapter in the same place reloads."""
    return tuple(sorted((item.name, item.stat().st_size, item.stat().st_mtime_ns)
                        for item in folder.iterdir() if item.is_file()))
