"""Drops the backends' start-up INFO lines from stderr; keeps the rest.

TensorFlow 2.21's C++ start-up messages (oneDNN, "Could not find cuda
drivers", the absl "before absl::InitializeLog()" banner) and SentencePiece's
`LOG(INFO)` lines are written to file descriptor 2 before any environment
setting can turn them off: `TF_CPP_MIN_LOG_LEVEL=3` does not reach them
(checked on tensorflow 2.21), and `TF_ENABLE_ONEDNN_OPTS=0` would change
the numerics. So the command line points descriptor 2 at a pipe and copies
each line to the real stderr unless it is one of those INFO lines. Warnings
and errors (absl `W`/`E`/`F` lines, Python warnings, tracebacks) pass.
"""

import os
import re
import sys
import threading

# The environment that quiets what does read it; set before the first import
# of TensorFlow, JAX or torch.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "2",
}

_NOISE = re.compile(
    rb"^(?:"
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|I\d{4} [\d:. ]+\d+ \S+:\d+\]"  # absl INFO: I0000 00:00:... x.cc:1]
    rb"|\S+\.cc\(\d+\) LOG\(INFO\)"  # SentencePiece's INFO lines
    rb")"
)


def is_noise(line):
    """Whether one stderr line (bytes) is a start-up INFO message."""
    return bool(_NOISE.match(line))


class StartupNoiseFilter:
    """Filters descriptor 2 while in use (`with StartupNoiseFilter(): ...`).

    A thread copies the pipe to the original stderr line by line, dropping
    the lines `is_noise` matches. On exit everything written is flushed and
    descriptor 2 is restored.
    """

    def __enter__(self):
        for key, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(
            target=self._copy, args=(read_end,), daemon=True
        )
        self._thread.start()
        return self

    def _copy(self, read_end):
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not is_noise(line):
                        os.write(self._saved, line + b"\n")
            if pending and not is_noise(pending):
                os.write(self._saved, pending)

    def __exit__(self, *exc_info):
        sys.stderr.flush()
        # Closing the pipe's last write end ends the copying thread.
        os.dup2(self._saved, 2)
        self._thread.join(timeout=5)
        os.close(self._saved)
        return False
