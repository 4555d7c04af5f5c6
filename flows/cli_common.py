"""What every `lorafleet` command shares: the consoles, settings from the environment, one-line failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def load_settings():
    """The environment's settings with their folders made, or one error line naming what to change."""
    from lorafleet.settings import Settings, SettingsError

    try:
        return Settings.from_env().ensure()
    except SettingsError as error:
        fail(str(error))


def fail(message: str) -> NoReturn:
    """One line, exit 2: for bad input and unusable state, never a traceback."""
    # Escaped: a path or value may contain [brackets] that Rich would read as markup. Not wrapped at the
    # terminal width, so the message stays one line that scripts can grep.
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def write_dict_json(report: dict, path: Path) -> None:
    """A bench report that is a plain dict (the others have `to_dict`: flows/bench.write_json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {path}")
