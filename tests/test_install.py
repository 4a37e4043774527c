"""The package as a wheel install (`pip install .`, `pip install git+URL`)."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A wheel is mostly the bundled preset (13.8 MB of float32 weights and its
# vocabulary, compressed); more than this means something was swept in.
MAX_WHEEL_BYTES = 20 * 2**20

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="packaging does not depend on the backend; run once",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the clone (the clone stays untouched)."""
    source = tmp_path_factory.mktemp("source") / "keras_gemma2"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("keras_gemma2-*.whl")
    return path


def test_the_wheel_carries_the_bundled_preset_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    preset = "keras_gemma2/bundled_presets/gemma2_tiny_en/"
    for name in (
        "config.json",
        "metadata.json",
        "model.weights.h5",
        "preprocessor.json",
        "task.json",
        "tokenizer.json",
        "assets/tokenizer/vocabulary.spm",
    ):
        assert preset + name in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert wheel.stat().st_size < MAX_WHEEL_BYTES


def test_the_readme_generate_command_runs_from_the_installed_wheel(
    wheel, tmp_path
):
    target = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_GEMMA2_PRESETS_DIR", "PYTHONPATH")
    }
    # The unpacked wheel comes first on the path, so the editable install
    # of the clone (a meta-path finder after it) is never reached.
    env["PYTHONPATH"] = str(target)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import keras_gemma2.presets as p; print(p.__file__); "
            "print(p.PRESETS_DIR)",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    for line in where.stdout.split():
        assert pathlib.Path(line).is_relative_to(target), where.stdout
    # README: `.venv/bin/keras-gemma2 generate "The tokenizer"`, through the
    # console script the wheel installed.
    result = subprocess.run(
        [
            sys.executable,
            str(target / "bin" / "keras-gemma2"),
            "generate",
            "The tokenizer",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The tokenizer")
    assert len(result.stdout.split()) > 4, result.stdout
