"""The MLflow store as every lorafleet process opens it: one locked creation, one lock folder, one error test.

Neutral ground (it imports nothing from tasks/ or serving/): the pipeline (`tasks/tracking.py`,
`tasks/locks.py`) and the server (`lorafleet/registry_read.py`) both open their clients here, so a server
starting on a fresh home while a finetune creates the store cannot crash in MLflow's migration either.

MLflow creates the tables of an empty database on first use (when a client first touches its store)
without a lock: two processes starting on a fresh home both migrate and the second fails (SQLite:
"duplicate column name"; an empty PostgreSQL database opened directly: "duplicate key value violates
unique constraint pg_type_typname_nsp_index"). `store_client` builds the first client of a database store
in this process, and makes MLflow build its registry store too, under the store's lock; MLflow caches
both per process, so later clients need neither the lock nor a query.

The lock is a file lock on this machine (beside a SQLite file, else in the temp dir, keyed by the URI),
so for a PostgreSQL store opened directly by several machines it guards only the processes of each one:
run `mlflow db upgrade <uri>` once when the database is set up, or go through `mlflow server`, which
migrates once when it starts. A tracking server URI (http://) needs no lock here: the server owns its
store, and nothing local is created or locked for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.models.cache import file_lock
from lorafleet.settings import database_dialect

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

LOCKS_FOLDER = "locks"
# Database stores this process has created and migrated under the store lock; later clients skip the lock.
_READY_STORES: set[str] = set()


def store_lock_dir(tracking_uri: str) -> Path:
    """The folder for locks that guard one MLflow store: beside a local SQLite file, else machine-local."""
    if tracking_uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(tracking_uri).database
        if database and database != ":memory:":
            return Path(database).expanduser().resolve().parent / LOCKS_FOLDER
    # One folder per store whichever way its URI is written (`http://host:5000` or `http://host:5000/`).
    digest = hashlib.sha256(tracking_uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"lorafleet-{LOCKS_FOLDER}-{digest}"


@contextlib.contextmanager
def store_init_lock(tracking_uri: str) -> Iterator[None]:
    """Held while a process creates (and on first use migrates) the MLflow store: MLflow's tracking store
    migrates an empty database without a lock, and two first users crash on each other's tables."""
    with file_lock(store_lock_dir(tracking_uri) / "mlflow-store.lock"):
        yield


def store_client(uri: str) -> MlflowClient:
    """A client (tracking and registry on `uri`) whose stores exist; a database store (SQLite, PostgreSQL,
    ...) is created and migrated under `store_init_lock`, once per process. A tracking server's URI is
    opened as is."""
    from mlflow import MlflowClient

    if uri in _READY_STORES or database_dialect(uri) is None:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with store_init_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _READY_STORES.add(uri)
    return client


def is_mlflow_error(error: MlflowException, code: int) -> bool:
    """`MlflowException.error_code` holds the enum's name, not its number; compare them safely."""
    from mlflow.protos.databricks_pb2 import ErrorCode

    return getattr(error, "error_code", None) == ErrorCode.Name(code)
