"""Writing folders atomically: stage beside the target, then rename."""

import contextlib
import os
import shutil
import uuid


def new_sibling(path, kind):
    """Creates a hidden empty folder next to `path` and returns its path.

    `os.mkdir` rather than `tempfile.mkdtemp`, so that the folder, once
    renamed to `path`, has the usual permissions (umask), not 0o700.
    """
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    while True:
        sibling = os.path.join(
            parent, f".{os.path.basename(path)}.{kind}-{uuid.uuid4().hex[:12]}"
        )
        try:
            os.mkdir(sibling)
            return sibling
        except FileExistsError:
            continue


def move_into_place(staging, path):
    """Renames `staging` to `path`, replacing a folder already there."""
    if not os.path.exists(path):
        os.replace(staging, path)
        return
    # A non-empty folder cannot be renamed over: move the old one aside
    # first, and put it back if the rename fails.
    old = new_sibling(path, "old")
    os.rmdir(old)
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(path, kind="writing"):
    """Yields a fresh sibling folder that replaces `path` on success.

    On any error the sibling is removed and `path` is left as it was.

    Example:
    ```python
    import os, tempfile
    from keras_gemma2 import atomic
    target = os.path.join(tempfile.mkdtemp(), "out")
    with atomic.staged_folder(target) as staging:
        open(os.path.join(staging, "a.txt"), "w").close()
    ```
    """
    path = os.path.abspath(os.fspath(path))
    staging = new_sibling(path, kind)
    try:
        yield staging
        move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
