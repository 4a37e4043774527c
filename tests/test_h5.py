"""`keras_gemma2.h5` against Keras' own `.weights.h5` reader and writer."""

import os

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

from keras_gemma2 import h5

# File formats do not depend on the backend: run once, on JAX.
pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="backend-independent"
)


def _model(dtype):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, dtype=dtype)]
    )
    kernel = np.random.default_rng(0).normal(size=(3, 4))
    model.layers[0].kernel.assign(kernel.astype("float32"))
    return model


def _datasets(file):
    found = {}
    file.visititems(
        lambda name, obj: (
            found.setdefault(name, obj)
            if isinstance(obj, h5py.Dataset)
            else None
        )
    )
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_gives_what_keras_saved(tmp_path, dtype):
    model = _model(dtype)
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    with h5py.File(path, "r") as f:
        values = [h5.read(d) for d in _datasets(f).values()]
    (read,) = [v for v in values if v.shape == (3, 4)]
    assert read.dtype == np.dtype(
        dtype if dtype == "float32" else ml_dtypes.bfloat16
    )
    np.testing.assert_array_equal(
        read.astype("float32"), kernel.astype("float32")
    )


def test_keras_loads_what_write_and_assign_wrote(tmp_path):
    # Overwrite every dataset of a bfloat16 model's file through `assign`,
    # and write a new bfloat16 dataset with `write`: Keras reads both.
    model = _model("bfloat16")
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    new_kernel = np.full((3, 4), 1.5, ml_dtypes.bfloat16)
    with h5py.File(path, "r+") as f:
        for dataset in _datasets(f).values():
            if dataset.shape == (3, 4):
                h5.assign(dataset, new_kernel.astype("float32"))
        h5.write(f, "extra", new_kernel)
        extra = h5.read(f["extra"])
    model.load_weights(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.layers[0].kernel).astype("float32"),
        new_kernel.astype("float32"),
    )
    assert extra.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(extra, new_kernel)


def test_read_takes_bits_stored_as_uint16(tmp_path):
    # How backups of this package stored bfloat16 before `h5.write`.
    values = np.array([1.0, -2.5, 3.0], ml_dtypes.bfloat16)
    path = os.path.join(tmp_path, "old.h5")
    with h5py.File(path, "w") as f:
        dataset = f.create_dataset("x", data=values.view("u2"))
        dataset.attrs["dtype"] = "bfloat16"
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(h5.read(f["x"]), values)
