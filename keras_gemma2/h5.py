"""Datasets of Keras `.weights.h5` files, with the dtypes HDF5 lacks.

HDF5 has no bfloat16 (nor float8): Keras 3 writes such an array's bytes and
names the dtype in the dataset's `dtype` attribute, and h5py reads them
back as opaque `|V2` values (older backups of ours hold them as `uint16`;
`read` takes both). Every reader and writer of these files here (the
merger, the backup callback, the KerasHub converter) goes through `read`
and `write`, so that a bfloat16 weight is never taken for its bytes.

Example:
```python
import os, tempfile
import h5py, ml_dtypes, numpy as np
from keras_gemma2 import h5
path = os.path.join(tempfile.mkdtemp(), "a.h5")
with h5py.File(path, "w") as f:
    h5.write(f, "x", np.ones(3, ml_dtypes.bfloat16))
with h5py.File(path, "r") as f:
    assert h5.read(f["x"]).dtype == ml_dtypes.bfloat16
```
"""

import ml_dtypes
import numpy as np


def stored_dtype(dataset):
    """The numpy dtype of an h5py `dataset`'s values (bfloat16 included)."""
    name = dataset.attrs.get("dtype", "")
    if isinstance(name, bytes):
        name = name.decode()
    if name and hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return dataset.dtype


def read(dataset):
    """A dataset's values as numpy, in their own dtype."""
    raw = dataset[()]
    dtype = stored_dtype(dataset)
    return raw.view(dtype) if raw.dtype != dtype else raw


def write(group, name, value):
    """Creates dataset `name` in `group`, as Keras' `save_weights` does:
    an ml_dtypes array (bfloat16, float8) is stored as its bytes, and its
    dtype is named in the `dtype` attribute (here for every dataset)."""
    value = np.asarray(value)
    dataset = group.create_dataset(name, data=value)
    dataset.attrs["dtype"] = value.dtype.name
    return dataset


def assign(dataset, value):
    """Overwrites an existing dataset's values with `value`, cast to the
    dataset's own dtype."""
    value = np.asarray(value).astype(stored_dtype(dataset), copy=False)
    dataset[...] = value.view(dataset.dtype)
