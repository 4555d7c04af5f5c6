"""Where lorafleet keeps its state, resolved once at an entry point.

Everything below the entry points (CLI, flows, the service) receives a `Settings` object instead of
reading the environment, so tests can point a whole pipeline at a temporary folder by building one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("~/.lorafleet")


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
        """A SQLite/file store needs an explicit artifact root, or MLflow writes ./mlruns in the cwd."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))

    def ensure(self) -> Settings:
        for path in (self.home, self.model_cache_dir, self.prepared_data_dir, self.adapters_dir,
                     self.checkpoints_dir, self.mlflow_artifacts_dir, self.adapter_download_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self


def _default_data_root() -> Path:
    """`../shared/data` beside the checkout: where the benchmark datasets live on dev and CI machines."""
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"
