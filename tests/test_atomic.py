"""`keras_gemma2.atomic`: staged writes, the refusal of a target, and
safetensors files that the reference readers load."""

import os

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_gemma2 import atomic

# Files and folders do not depend on the backend: run once, on JAX.
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="backend-independent"
)


def _plain_mode(folder):
    path = os.path.join(folder, "plain")
    open(path, "w").close()
    try:
        return os.stat(path).st_mode & 0o777
    finally:
        os.remove(path)


def test_staged_file_replaces_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic.staged_file(target) as staging:
        with open(staging, "w") as f:
            f.write("new")
        assert target.read_text() == "old"  # not before the end
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]
    assert os.stat(target).st_mode & 0o777 == _plain_mode(tmp_path)


def test_staged_file_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.staged_file(target) as staging:
            with open(staging, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_check_target(tmp_path):
    atomic.check_target(tmp_path / "missing", fix="choose another")
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic.check_target(empty, fix="choose another")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; choose another"):
        atomic.check_target(full, fix="choose another")
    atomic.check_target(full, fix="choose another", replaceable=True)
    with pytest.raises(ValueError, match="not empty"):
        atomic.check_target(full, fix="x", replaceable=lambda p: False)
    atomic.check_target(full, fix="x", replaceable=lambda p: True)
    with pytest.raises(ValueError, match="is not a folder"):
        atomic.check_target(full / "keep.txt", fix="x")
    assert (full / "keep.txt").read_text() == "mine"


def test_save_safetensors_mode_and_dtypes(tmp_path):
    import torch
    from safetensors.torch import load_file

    tensors = {
        "bf16": np.array([1.0, -2.5, 3.0], ml_dtypes.bfloat16),
        "f32": np.arange(4, dtype="float32").reshape(2, 2),
    }
    path = os.path.join(tmp_path, "w.safetensors")
    atomic.save_safetensors(tensors, path, metadata={"format": "pt"})
    assert os.stat(path).st_mode & 0o777 == _plain_mode(tmp_path)
    loaded = load_file(path)  # safetensors' own reader, through torch
    assert loaded["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        loaded["bf16"].float().numpy(), tensors["bf16"].astype("float32")
    )
    np.testing.assert_array_equal(loaded["f32"].numpy(), tensors["f32"])
