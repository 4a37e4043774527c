"""Writing folders atomically: stage beside the target, fsync, then rename."""

import contextlib
import os
import shutil
import stat
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


def fsync_tree(folder):
    """Flushes every regular file and folder under `folder` to disk.

    A rename is only as durable as what it renames: without this, a power
    cut soon after the rename can leave the new name pointing at files the
    disk never received (ext4 and XFS order data before the rename only in
    some modes). Symbolic links are not followed, and FIFOs, sockets and
    devices are left alone (opening a FIFO would block).
    """
    for root, _, names in os.walk(folder):  # does not follow links
        for name in names:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fsync_path(path)
        fsync_path(root)  # its entries: the names just written


def fsync_path(path):
    """Flushes one file or folder to disk (folders: POSIX only)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        if os.path.isdir(path):
            return  # Windows cannot open a folder.
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(staging, path):
    """Renames `staging` to `path`, replacing a folder already there.

    The parent folder is flushed after the rename, so that the new name
    survives a crash; `staging` is expected to be flushed already (see
    `fsync_tree`).
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        os.replace(staging, path)
        fsync_path(parent)
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
    fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(path, kind="writing"):
    """Yields a fresh sibling folder that replaces `path` on success.

    On success every file and folder in the sibling is flushed to disk,
    the sibling is renamed to `path`, and the parent folder is flushed, so
    that after a crash `path` holds either the old folder or the complete
    new one. On any error the sibling is removed and `path` is left as it
    was.

    Example:
    ```python
    import os, tempfile
    from keras_gemma2 import atomic
    target = os.path.join(tempfile.mkdtemp(), "out")
    with atomic.staged_folder(target) as staging:
        open(os.path.join(staging, "a.txt"), "w").close()
    assert os.listdir(target) == ["a.txt"]
    ```
    """
    path = os.path.abspath(os.fspath(path))
    staging = new_sibling(path, kind)
    try:
        yield staging
        fsync_tree(staging)
        move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
