"""Which failures are worth retrying: those that can succeed unchanged a moment later.

A full disk (ENOSPC), a quota (EDQUOT), a read-only file system (EROFS) or a permission (EACCES, EPERM)
does not fix itself in two seconds; retrying only repeats the work that filled the disk and delays the
error a person has to act on. An OSError is judged by its errno against an allow-list, never by its
class: `OSError` covers all of the above. MLflow wraps the errors of its store and HTTP client in
`MlflowException`; their cause decides.
"""

from __future__ import annotations

import errno
import sqlite3

# The operation may succeed unchanged on a later try: interrupted or busy calls, network hiccups, and
# NFS handles gone stale under a concurrent writer.
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN,
    errno.EHOSTUNREACH, errno.ESTALE,
})


def is_transient(error: BaseException | None) -> bool:
    """True when `error` (or, for an MLflow error, its cause) is worth a retry."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, OSError):
        return _transient_os_error(error)
    if isinstance(error, sqlite3.OperationalError):
        return "locked" in str(error) or "busy" in str(error)  # another writer holds the SQLite file
    if isinstance(error, MlflowException):
        return _cause_is_transient(error)
    return False


def _transient_os_error(error: OSError) -> bool:
    if error.errno is not None:
        return error.errno in TRANSIENT_ERRNOS
    # No errno: raised by Python or a client library rather than a system call.
    import requests

    return isinstance(error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def _cause_is_transient(error: BaseException) -> bool:
    """Walk the chain MLflow built (`raise ... from`, or raised while handling) down to the first judgeable error."""
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (OSError, sqlite3.OperationalError)):
            return is_transient(cause)
        if type(cause).__name__ == "OperationalError" and "database is locked" in str(cause):
            return True  # SQLAlchemy's wrapper of sqlite3.OperationalError
        cause = cause.__cause__ or cause.__context__
    return False
