"""Writing files and folders atomically: stage beside the target, fsync,
then rename; and the checks that keep a write from replacing what it should
not."""

import contextlib
import os
import shutil
import stat
import uuid


def new_sibling(path, kind, folder=True):
    """Creates a hidden empty folder (or, with `folder=False`, file) next to
    `path` and returns its path.

    `os.mkdir` and `open(..., "x")` rather than `tempfile`, so that the
    sibling, once renamed to `path`, has the usual permissions (umask), not
    0o700 or 0o600.
    """
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    while True:
        sibling = os.path.join(
            parent, f".{os.path.basename(path)}.{kind}-{uuid.uuid4().hex[:12]}"
        )
        try:
            if folder:
                os.mkdir(sibling)
            else:
                open(sibling, "xb").close()
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


@contextlib.contextmanager
def staged_file(path, kind="writing"):
    """Yields a sibling file path that replaces `path` on success.

    The sibling is created empty first (`new_sibling`), which reserves its
    name. On success it is flushed, renamed to `path` and the parent folder
    flushed; on any error it is removed and `path` is left as it was.

    Example:
    ```python
    import os, tempfile
    from keras_gemma2 import atomic
    target = os.path.join(tempfile.mkdtemp(), "a.txt")
    with atomic.staged_file(target) as staging:
        with open(staging, "w") as f:
            f.write("done")
    assert open(target).read() == "done"
    ```
    """
    path = os.path.abspath(os.fspath(path))
    staging = new_sibling(path, kind, folder=False)
    try:
        yield staging
        fsync_path(staging)
        os.replace(staging, path)
        fsync_path(os.path.dirname(path))
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def file_mode(folder):
    """The permission bits a new file gets in `folder` (0o666 less the
    umask), read from a file created there: `os.umask` can only be read by
    setting it, for the whole process."""
    probe = new_sibling(os.path.join(folder, "mode"), "probe", folder=False)
    try:
        return os.stat(probe).st_mode & 0o777
    finally:
        os.remove(probe)


def save_safetensors(tensors, filename, metadata=None):
    """Writes numpy `tensors` as a safetensors file with a normal mode.

    `safetensors.numpy.save_file` (0.8) creates its file 0o600; the file
    is given the mode of any other new file in its folder. bfloat16 arrays
    (ml_dtypes) are written as BF16.
    """
    # safetensors: needed only to write these files (see convert.damaged)
    from safetensors.numpy import save_file

    folder = os.path.dirname(os.path.abspath(filename))
    mode = file_mode(folder)
    save_file(tensors, filename, metadata=metadata)
    os.chmod(filename, mode)


def check_target(path, fix, replaceable=False):
    """Refuses to write a folder at `path` over a file or a non-empty folder.

    Args:
        path: the folder about to be written.
        fix: what the user should do instead, ending the error message.
        replaceable: bool, or a callable taking `path`: whether a non-empty
            folder there may be replaced (`overwrite=True`, or it is a
            preset of ours).

    Example:
    ```python
    import tempfile
    from keras_gemma2 import atomic
    atomic.check_target(tempfile.mkdtemp(), fix="choose a new folder")
    ```
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(
            f"{path} exists and is not a folder; pass a folder path to "
            "write into."
        )
    if callable(replaceable):
        replaceable = replaceable(path)
    if os.listdir(path) and not replaceable:
        raise ValueError(f"{path} exists and is not empty; {fix}.")
