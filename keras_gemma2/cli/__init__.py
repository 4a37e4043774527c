"""The `keras-gemma2` command line (also `python -m keras_gemma2`).

`parser` declares the commands and their options, `commands` runs them.
Standard library only at import time, so that `--help` imports no backend:
Keras reads KERAS_BACKEND once, when first imported, so each command
imports the models only after `--backend` has set it.
"""

import os
import sys

from keras_gemma2 import log_filter
from keras_gemma2.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    _select_backend(getattr(args, "backend", None))
    if args.verbose:
        _run(args)
    else:
        # Set before the first import of a backend, which is in `_run`.
        with log_filter.StartupNoiseFilter():
            _run(args)


def _run(args):
    try:
        args.func(args)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        ConnectionError,
        PermissionError,
    ) as error:
        raise SystemExit(f"keras-gemma2: {error}")


def _select_backend(backend):
    """Makes Keras use `backend`, re-running this command if needed.

    Keras reads KERAS_BACKEND once, when it is first imported, and importing
    `keras_gemma2` imports Keras: so a different backend needs a new process.
    """
    backend = backend or os.environ.get("KERAS_BACKEND") or "jax"
    os.environ["KERAS_BACKEND"] = backend
    keras = sys.modules.get("keras")
    if keras is not None and keras.config.backend() != backend:
        argv = [sys.executable, "-m", "keras_gemma2", *sys.argv[1:]]
        os.execv(sys.executable, argv)
