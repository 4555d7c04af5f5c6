"""The registered-model name rule and the bounds on what a client may send to name a model.

One neutral module (it imports nothing from lorafleet) so that configs, the pipeline and the server
all check names by the same rule, and the registry reader (`lorafleet/registry_read.py`) before any I/O.
A name that passes is also a safe single path component (no '/', no '..', no NUL, at most 64
characters), which is why the server may build download folders from it.
"""

from __future__ import annotations

import re
import unicodedata

# Usable as an MLflow registered-model name, as a folder name, and inside OpenAI `model` strings (`name@alias`).
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")  # \Z, not $: `$` lets a trailing newline through
NAME_RULE = ("1-64 characters of lowercase letters, digits, '.', '_' or '-', starting with a letter or digit "
             "(no '@': it separates aliases)")

# MLflow's own alias rule (`[\w-]`, at most 255), in ASCII only.
ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,255}\Z")
MAX_VERSION = 2**63 - 1  # the registry stores versions as 64-bit integers
VERSION_PATTERN = re.compile(r"^[0-9]{1,18}\Z")  # digits that always fit below MAX_VERSION

MAX_MODEL_REFERENCE = 1024  # `model` in a request: NAME@ALIAS, models:/NAME/VERSION or the base model id
MAX_PATH_LENGTH = 4096  # Linux PATH_MAX: no longer path can be opened anyway


def is_registered_name(name: object) -> bool:
    """Whether `name` follows the registered-model name rule."""
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None


def is_alias(alias: object) -> bool:
    return isinstance(alias, str) and ALIAS_PATTERN.match(alias) is not None


def is_version(version: object) -> bool:
    """A registry version number: an int (not a bool) in 1..MAX_VERSION."""
    return isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= MAX_VERSION


def control_characters(text: str) -> list[str]:
    """The control characters in `text` (NUL, newlines, escapes...), as escapes for an error message."""
    return sorted({repr(char).strip("'") for char in text if unicodedata.category(char) == "Cc"})


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for an error message: a 5,000-character name is not sent back whole."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."
