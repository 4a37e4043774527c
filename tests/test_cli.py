"""The command line, run as a user runs it: in a subprocess."""

import os
import subprocess
import sys

import keras


def _run(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "keras_gemma2", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_generate_with_the_bundled_preset():
    backend = keras.config.backend()
    result = _run(
        "generate", "The tokenizer", "--max-length", "16", "--backend", backend
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("The tokenizer")
    assert len(result.stdout.split()) > 3


def test_unknown_preset_is_a_clear_error():
    result = _run("generate", "Hi", "--preset", "gemma2_2b_eng")
    assert result.returncode != 0
    assert "Did you mean 'gemma2_2b_en'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_max_length_is_a_clear_error():
    result = _run("generate", "Hi", "--max-length", "1")
    assert result.returncode != 0
    assert "--max-length must be at least 2" in result.stderr
