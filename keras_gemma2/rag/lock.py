"""One `index` run at a time per database: an OS lock beside the folder."""

import contextlib
import logging
import os
import time

try:
    import fcntl
except ImportError:  # Windows has no flock; runs there are not serialized.
    fcntl = None

_logger = logging.getLogger(__name__)


class DatabaseBusyError(ValueError, TimeoutError):
    """Another process held a database's lock for longer than the timeout."""


def lock_path(db):
    """The lock file of the database folder `db`: hidden, beside it."""
    db = os.path.abspath(os.fspath(db))
    return os.path.join(os.path.dirname(db), f".{os.path.basename(db)}.lock")


@contextlib.contextmanager
def locked(db, timeout=600.0):
    """Holds the exclusive lock of the database folder `db`.

    The lock is an `flock` on a hidden file beside the folder (not inside:
    each run replaces the folder by a rename). If another process holds
    it, a warning says so and this waits, up to `timeout` seconds, then
    raises `DatabaseBusyError`. The kernel releases the lock when its
    process exits, however it exits; the file is deleted on release.

    Args:
        db: str. The database folder (it need not exist yet).
        timeout: float. The longest wait, in seconds. Defaults to `600`.

    Example:
    ```python
    import os, tempfile
    from keras_gemma2.rag import lock

    db = os.path.join(tempfile.mkdtemp(), "db")
    with lock.locked(db):
        assert os.path.exists(lock.lock_path(db))
    assert not os.path.exists(lock.lock_path(db))
    ```
    """
    if fcntl is None:
        yield
        return
    path = lock_path(db)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = _acquire(path, os.path.abspath(os.fspath(db)), timeout)
    try:
        yield
    finally:
        # Deleted while still locked: whoever opened this file meanwhile
        # finds, once it gets the lock, that it is gone, and starts over.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _acquire(path, db, timeout, poll=0.1):
    """Locks the file at `path` (created if missing); returns its fd."""
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise DatabaseBusyError(
                    f"Another `rag index` ({holder}) has been writing {db} "
                    f"for over {timeout:g} s. Wait for it to finish, then "
                    "run this again: it indexes only what that run left "
                    "to do."
                ) from None
            if not warned:
                _logger.warning(
                    "Waiting for another `rag index` (%s) to finish with "
                    "%s (up to %g s)...",
                    holder,
                    db,
                    timeout,
                )
                warned = True
            time.sleep(poll)
            continue
        except BaseException:
            os.close(fd)
            raise
        if _is_current(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder deleted it as we waited: take the new one


def _is_current(fd, path):
    """Whether `fd` is still the file at `path` (not one deleted since)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd):
    """`"process N"` from a held lock file, else `"another process"`."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"
