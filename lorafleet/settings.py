"""Where lorafleet keeps its state, resolved once at an entry point.

Everything below the entry points (CLI, flows, the service) receives a `Settings` object instead of
reading the environment, so tests can point a whole pipeline at a temporary folder by building one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

DEFAULT_HOME = Path("~/.lorafleet")
_SQLITE = "sqlite:///"
# Tracking URIs MLflow opens as a SQLAlchemy database (`<dialect>[+<driver>]://...`), as in MLflow's own list.
DATABASE_DIALECTS = ("sqlite", "postgresql", "mysql", "mssql")
# Tracking URIs that are a tracking server: artifacts go where the server says (e.g. its proxied store).
_SERVER_SCHEMES = ("http://", "https://", "databricks")
_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")  # user:PASSWORD@host in a URI
_FIXES = {  # what the one-line error tells the user to do, per variable
    "LORAFLEET_HOME": "set LORAFLEET_HOME to a folder you can write to",
    "LORAFLEET_MODEL_CACHE": "set LORAFLEET_MODEL_CACHE to a folder you can write to (or unset it)",
    "MLFLOW_TRACKING_URI": "set MLFLOW_TRACKING_URI to a database in a folder you can write to (or unset it)",
}


class SettingsError(ValueError):
    """A state folder that cannot be used. The message is one line (path, problem, variable to change)
    that the CLI prints as is; a ValueError, so callers that report bad input report it too."""


@dataclass(frozen=True)
class Settings:
    """The on-disk layout under `LORAFLEET_HOME` plus the MLflow tracking URI."""

    home: Path
    tracking_uri: str
    data_root: Path
    model_cache_dir: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("LORAFLEET_HOME") or DEFAULT_HOME).expanduser().resolve()
        tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        data_root = Path(env.get("LORAFLEET_DATA") or _default_data_root()).expanduser().resolve()
        model_cache = Path(env.get("LORAFLEET_MODEL_CACHE") or home / "models").expanduser().resolve()
        return cls(home=home, tracking_uri=tracking_uri, data_root=data_root, model_cache_dir=model_cache)

    @classmethod
    def for_home(cls, home: Path, *, data_root: Path | None = None,
                 model_cache_dir: Path | None = None) -> Settings:
        """Settings rooted at `home` with the default SQLite store there (tests, demos)."""
        home = Path(home).resolve()
        return cls(home=home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                   data_root=Path(data_root or _default_data_root()).resolve(),
                   model_cache_dir=Path(model_cache_dir or home / "models").resolve())

    @property
    def prepared_data_dir(self) -> Path:
        return self.home / "data"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def adapter_download_dir(self) -> Path:
        """Registry versions downloaded for serving, one folder per name/version."""
        return self.home / "served-adapters"

    @property
    def tracks_locally(self) -> bool:
        """A store this process opens itself (SQLite, PostgreSQL, a folder) needs an explicit artifact root,
        or MLflow writes ./mlruns in the cwd. A tracking server decides where artifacts go (with
        `--artifacts-destination`: its proxied `mlflow-artifacts:/` store), so no local folder is used."""
        return not self.tracking_uri.startswith(_SERVER_SCHEMES)

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a local `sqlite:///` tracking URI, else None (a server, or in memory)."""
        if not self.tracking_uri.startswith(_SQLITE):
            return None
        name = self.tracking_uri[len(_SQLITE):].split("?", 1)[0]
        return Path(name).expanduser().resolve() if name and name != ":memory:" else None

    def ensure(self) -> Settings:
        """Create the state folders, or raise SettingsError (and create nothing) if one cannot be used.

        This is where every entry point first touches the disk, so an unusable LORAFLEET_HOME (a file,
        a folder under a file, a read-only folder) is stopped here, with the variable to change named,
        instead of surfacing later as an OSError or SQLite's "unable to open database file". All
        checks run before the first folder is made, so a bad LORAFLEET_MODEL_CACHE leaves no
        half-made home behind."""
        folders = self._folders()
        for path, variable in folders:
            problem = _folder_problem(path)
            if problem:
                raise SettingsError(self._message(variable, problem))
        driver_problem = database_driver_problem(self.tracking_uri)
        if driver_problem:
            raise SettingsError(driver_problem)
        database = self.sqlite_file
        if database is not None and os.path.lexists(database):
            if not os.path.isfile(database):
                raise SettingsError(self._message(self._variable(database, "MLFLOW_TRACKING_URI"),
                                                  f"{database} is a folder, not a database file"))
            if not os.access(database, os.R_OK | os.W_OK):
                raise SettingsError(self._message(self._variable(database, "MLFLOW_TRACKING_URI"),
                                                  f"{database} is not writable"))
        for path, variable in folders:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a race with another process, a full disk, a quota
                raise SettingsError(self._message(variable, f"cannot create {path}: "
                                                            f"{error.strerror or error}")) from error
        return self

    def _folders(self) -> list[tuple[Path, str]]:
        """Every folder lorafleet writes, with the variable that decides where it is. The artifact folder
        only for a store opened locally: with a tracking server, artifacts travel through the server."""
        local = [self.home, self.prepared_data_dir, self.adapters_dir, self.checkpoints_dir]
        if self.tracks_locally:
            local.append(self.mlflow_artifacts_dir)
        local.append(self.adapter_download_dir)
        folders = [(path, "LORAFLEET_HOME") for path in local]
        folders.append((self.model_cache_dir, self._variable(self.model_cache_dir, "LORAFLEET_MODEL_CACHE")))
        database = self.sqlite_file
        if database is not None:  # SQLite creates the file, not the folder it goes in
            folders.append((database.parent, self._variable(database, "MLFLOW_TRACKING_URI")))
        return folders

    def _variable(self, path: Path, own: str) -> str:
        """LORAFLEET_HOME for a path at its default place under the home, else the variable that moved it."""
        return "LORAFLEET_HOME" if path.is_relative_to(self.home) else own

    def _message(self, variable: str, problem: str) -> str:
        value = {"LORAFLEET_HOME": self.home, "LORAFLEET_MODEL_CACHE": self.model_cache_dir,
                 "MLFLOW_TRACKING_URI": redact(self.tracking_uri)}[variable]
        return f"{variable}={value} cannot be used: {problem}; {_FIXES[variable]}"


def redact(uri: str) -> str:
    """`uri` with any password replaced by `***`: tracking URIs end up in error lines and logs."""
    return _PASSWORD.sub(r"\1***@", uri)


def database_dialect(uri: str) -> str | None:
    """The SQLAlchemy dialect of a database tracking URI (`postgresql+psycopg2://` -> postgresql), else None."""
    scheme = uri.split("://", 1)[0] if "://" in uri else uri.split(":", 1)[0]
    dialect = scheme.split("+", 1)[0].lower()
    return dialect if dialect in DATABASE_DIALECTS else None


def database_driver_problem(uri: str) -> str | None:
    """Why MLflow could not open database `uri` here because its Python driver is missing, else None.

    Checked up front because MLflow reports it only on first use, as a traceback ending in
    `No module named 'psycopg'`: SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, while the
    common install (and lorafleet's `scale` extra) is psycopg2. Nothing is connected to."""
    dialect = database_dialect(uri)
    if dialect is None or dialect == "sqlite":
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = redact(uri)
    try:
        url = make_url(uri)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as error:
        return (f"MLFLOW_TRACKING_URI={shown} cannot be used: {error}; set it to a database URL such as "
                "postgresql+psycopg2://USER@HOST:PORT/DATABASE or a tracking server's http:// address")
    except ImportError as error:
        missing = getattr(error, "name", None) or str(error)
        return (f"MLFLOW_TRACKING_URI={shown} cannot be used: its database driver {missing!r} "
                f"({url.drivername}) is not installed; {_driver_fix(url)}")
    return None


def _driver_fix(url: URL) -> str:
    """Name the installed psycopg2 driver when it is there; else say what to install."""
    import importlib.util

    if url.get_backend_name() != "postgresql":
        return f"install the Python driver for {url.drivername}"
    if url.drivername != "postgresql+psycopg2" and importlib.util.find_spec("psycopg2") is not None:
        return ("name the installed psycopg2 driver instead: "
                + url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=True))
    return "install it (pip install 'lorafleet[scale]' brings psycopg2; then use postgresql+psycopg2://...)"


def _folder_problem(path: Path) -> str | None:
    """Why `path` cannot be (created and) written as a folder, or None: checked without changing anything."""
    existing = path  # os.path, not Path: an unreadable parent is "missing" there instead of raising
    while not os.path.lexists(existing) and existing != existing.parent:  # the nearest part that exists
        existing = existing.parent
    if not os.path.isdir(existing):
        kind = "a link to nothing" if os.path.islink(existing) and not os.path.exists(existing) else "a file"
        return (f"{path} is {kind}, not a folder" if existing == path
                else f"{path} cannot be created: {existing} is {kind}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{path} is not writable" if existing == path
                else f"{path} cannot be created: {existing} is not writable")
    return None


def _default_data_root() -> Path:
    """`../shared/data` beside the checkout: where the benchmark datasets live on dev and CI machines."""
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"
