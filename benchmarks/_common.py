"""Helpers the benchmark scripts share: worker processes, memory readings,
versions, the command line, and writing a marked README block.

Each benchmark re-invokes itself as `script --worker SPEC` in a fresh
process (so that peak memory is per library) and reads the worker's last
JSON line back. Not a test; nothing here is part of the package.
"""

import argparse
import importlib.metadata
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

MIB = 2**20


# --- worker processes ------------------------------------------------------


def spawn_worker(script, spec, keras_backend, timeout, stream=False):
    """Runs `script --worker SPEC` in a fresh process with `KERAS_BACKEND`
    set; returns the dict of its last JSON line, or `{"error": ...}`.

    With `stream`, the worker's stderr goes to ours (progress lines).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if keras_backend:
        env["KERAS_BACKEND"] = keras_backend
    command = [sys.executable, os.path.abspath(script), "--worker"]
    try:
        process = subprocess.run(
            command + [json.dumps(spec)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=None if stream else subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(process.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    stderr = process.stderr or ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if process.returncode < 0:
        message = f"killed by signal {-process.returncode}"
        if -process.returncode == 9:
            message += " (out of memory?)"
    else:
        message = lines[-1] if lines else "no output"
        if stream:
            message = "failed (see above)"
    return {"error": message.strip()[:300], "returncode": process.returncode}


def timed(fn, *args, **kwargs):
    """`(seconds, fn(*args, **kwargs))`."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


# --- memory ------------------------------------------------------------------


def proc_status_mib(field):
    """A `/proc/self/status` field (`VmRSS`, `VmHWM`) in MiB, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib():
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # KiB on Linux, bytes on macOS.
    return peak / (MIB if sys.platform == "darwin" else 1024)


def rss_now_mib():
    """Current resident memory (Linux `VmRSS`), else the peak so far."""
    rss = proc_status_mib("VmRSS")
    return peak_rss_mib() if rss is None else rss


# --- reports -----------------------------------------------------------------


def versions(packages):
    """`{package: version or "not installed"}`."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def command(script):
    """The command line that ran `script`, as a user would type it."""
    script = os.path.relpath(os.path.abspath(script))
    return "python " + shlex.join([script] + sys.argv[1:])


def find(results, **where):
    """The first result without an error whose fields match `where`."""
    for row in results:
        if "error" not in row and all(
            row.get(k) == v for k, v in where.items()
        ):
            return row
    return None


def names(text, allowed):
    """Comma-separated names, each one of `allowed` (an argparse `type`)."""
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    for name in chosen:
        if name not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {name!r}; choose from {', '.join(allowed)}"
            )
    return chosen


def replace_marked_block(path, start_mark, end_mark, block, heading=None):
    """Replaces the text from `start_mark` to `end_mark` in `path` with
    `block` (which carries both marks), atomically.

    Without the marks, appends `block` under `heading` when one is given
    (creating the file if need be); else returns False and writes nothing.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        if heading is None:
            return False
        text = ""
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(end_mark) :]
    elif heading is not None:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    else:
        return False
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".readme-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        if os.path.exists(path):
            os.chmod(temporary, os.stat(path).st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return True


def add_run_options(parser, timeout, write_readme=True):
    """The options every worker-spawning benchmark takes: `--threads`,
    `--timeout` (default `timeout` seconds), `--quick`, `--json` and,
    with `write_readme`, `--write-readme`."""
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch.set_num_threads for PyTorch runs (default: all cores)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"seconds before a worker is abandoned (default {timeout:g})",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="OUT.json")
    if write_readme:
        parser.add_argument("--write-readme", metavar="README.md")
