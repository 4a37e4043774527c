"""Damaged files: one error, naming the file and the fix, for every loader.

Every loader reads its files inside `reading(path, what, fix)`, which turns
what the libraries raise on a damaged file (h5py's `OSError`, the standard
library's `json.JSONDecodeError`, a `KeyError` for a missing field, numpy's
and safetensors' errors) into a `DamagedFileError` that names the file, what
is wrong with it and what to do; the original error is chained. A missing
file, a refused permission and a network failure are not damage: they pass
through as they are. Safetensors files are checked whole by
`safetensors_header` before any tensor is read, so a file cut short is
refused before a single weight moves.
"""

import contextlib
import json
import math
import os
import re
import struct

# What to do about a damaged file, by where it came from.
COPY_FIX = (
    "Copy or download the folder again (an interrupted copy or download "
    "leaves a file short)."
)
PRESET_FIX = (
    "Copy or download the preset again (an interrupted copy or download "
    "leaves a file short), or save it again with `save_to_preset`."
)
HF_FIX = (
    "Download the checkpoint again (an interrupted download or copy leaves "
    "a file short), or write it again (transformers' `save_pretrained`, or "
    "`export_to_transformers` for one converted from Keras)."
)
KERAS_HUB_FIX = (
    "Download the KerasHub preset again (an interrupted download or copy "
    "leaves a file short), or export it again with KerasHub's "
    "`save_to_preset`."
)
ADAPTER_FIX = (
    "Copy the adapter file again, or save it again with "
    "`keras_gemma2.lora.save_adapters`."
)
BACKUP_FIX = (
    "Move this backup out of `backup_dir` to resume from the one before it "
    "(`double_checkpoint=True` keeps one), or pass a new `backup_dir` to "
    "start over."
)

# Errors a library raises on a file that cannot be read. json.JSONDecodeError
# and UnicodeDecodeError are ValueErrors; struct.error and EOFError come from
# reading a header that is cut short.
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, struct.error)
# Not damage: these keep their own type and message.
_NOT_DAMAGE = (
    FileNotFoundError,
    PermissionError,
    ConnectionError,
    TimeoutError,
)
# safetensors refuses headers over 100 MB; a larger "length" is not one.
_MAX_HEADER = 100 * 1024 * 1024
# Bytes per element of each safetensors dtype code.
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class DamagedFileError(ValueError):
    """A file that is there but cannot be read: truncated, or not its format.

    Args:
        path: str. The file.
        problem: str. What is wrong with it, as the rest of a sentence that
            starts with the path ("is truncated: ...").
        fix: str. What to do about it.
    """

    def __init__(self, path, problem, fix):
        self.path = os.fspath(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path} {problem}. {fix}")


def _library_errors():
    """READ_ERRORS, plus safetensors' own error type where installed."""
    try:  # optional: only the adapter files need it
        from safetensors import SafetensorError
    except ImportError:
        return READ_ERRORS
    return READ_ERRORS + (SafetensorError,)


@contextlib.contextmanager
def reading(path, what, fix, errors=None):
    """Turns a failure to read `path` into a `DamagedFileError`.

    Wrap the reading only: a `ValueError` of our own raised inside (a shape
    that does not fit the model) would be reported as damage.

    Args:
        path: str. The file being read.
        what: str. What it should be, with its article: "a Gemma 2
            config.json".
        fix: str. The likely fix, one of this module's `*_FIX`.
        errors: tuple of exception types to convert. Defaults to what
            libraries raise on damaged files (`READ_ERRORS` and safetensors'
            error).
    """
    caught = errors or _library_errors()
    try:
        yield
    except _NOT_DAMAGE:
        raise
    except DamagedFileError:
        raise
    except caught as error:
        raise DamagedFileError(path, describe(error, what), fix) from error


def describe(error, what):
    """What `error` says is wrong with a file that should be `what`."""
    text = str(error)
    if isinstance(error, KeyError):
        key = error.args[0] if error.args else text
        return f"lacks {key}, which {what} has"
    if isinstance(error, json.JSONDecodeError):
        return (
            f"is not {what}: it is not valid JSON ({error.msg} at line "
            f"{error.lineno}, column {error.colno}; cut short, or another "
            "file)"
        )
    if isinstance(error, UnicodeDecodeError):
        return f"is not {what}: it is not UTF-8 text"
    truncated = re.search(r"eof = (\d+).*stored_eof = (\d+)", text)
    if truncated:  # HDF5 compares the file's size with its superblock's
        eof, stored = truncated.groups()
        return (
            f"is truncated: it has {eof} of the {stored} bytes its HDF5 "
            "header records"
        )
    if "file signature not found" in text:
        return f"is not {what}: it is not an HDF5 file"
    if "mmap length is greater than file size" in text:
        return "is truncated: its data is shorter than its header says"
    return f"cannot be read as {what} ({type(error).__name__}: {text})"


def read_json(path, what, fix):
    """The JSON object in `path`, or a `DamagedFileError` naming it."""
    with reading(path, what, fix), open(path, encoding="utf-8") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise DamagedFileError(
            path,
            f"is not {what}: it holds a JSON {type(value).__name__}, not an "
            "object",
            fix,
        )
    return value


def safetensors_header(path, what="a safetensors file", fix=HF_FIX):
    """`(header, data_start)` of a safetensors file whose every tensor is
    inside it.

    Reads the 8-byte little-endian header length and the JSON header (the
    safetensors format; nothing is unpickled), then checks that each
    tensor's `data_offsets` (relative to `data_start`, 8 + the header
    length) fit its shape and dtype and end inside the file. A file cut
    short anywhere raises a `DamagedFileError` before any tensor is read.

    Args:
        path: str. The file.
        what: str. What it should be, with its article.
        fix: str. The likely fix, one of this module's `*_FIX`.
    """
    size = os.path.getsize(path)
    with reading(path, what, fix), open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise DamagedFileError(
                path,
                f"is truncated: it has {size} bytes, fewer than the 8 of a "
                "safetensors header length",
                fix,
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise DamagedFileError(
                path,
                f"is not {what}: its first 8 bytes give a header length of "
                f"{length} bytes",
                fix,
            )
        if 8 + length > size:
            raise DamagedFileError(
                path,
                f"is truncated: its header is {length} bytes long, but only "
                f"{size - 8} bytes follow its length",
                fix,
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedFileError(
            path, f"is not {what}: its header is not JSON", fix
        ) from error
    if not isinstance(header, dict):
        raise DamagedFileError(
            path, f"is not {what}: its header is not a JSON object", fix
        )
    start = 8 + length
    end, last = start, None
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        problem = _entry_problem(entry)
        if problem:
            raise DamagedFileError(
                path, f"is not {what}: tensor {key}'s entry {problem}", fix
            )
        if start + entry["data_offsets"][1] > end:
            end, last = start + entry["data_offsets"][1], key
    if end > size:
        raise DamagedFileError(
            path,
            f"is truncated: it has {size} bytes, but its header places "
            f"tensor {last} up to byte {end}",
            fix,
        )
    return header, start


def _entry_problem(entry):
    """What is malformed in one tensor's header entry; None if nothing."""
    if not isinstance(entry, dict):
        return "is not an object"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        return f"has no valid shape ({shape!r})"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"has no valid data_offsets ({offsets!r})"
    itemsize = SAFETENSORS_ITEMSIZE.get(entry.get("dtype"))
    if itemsize is not None:
        nbytes = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            return (
                f"spans {offsets[1] - offsets[0]} bytes, but a "
                f"{entry['dtype']} tensor of shape {tuple(shape)} has "
                f"{nbytes}"
            )
    return None


def open_h5(path, what, fix):
    """`path` opened read-only with h5py, or a `DamagedFileError`.

    HDF5 compares the file's length with the one its superblock records as
    it opens, so a truncated file is refused here, before any dataset is
    read.
    """
    import h5py  # imported on the first h5 read: it is slow to import

    with reading(path, what, fix):
        return h5py.File(path, "r")
