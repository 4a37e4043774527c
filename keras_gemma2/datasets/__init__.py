"""Datasets bundled with keras_gemma2.

`keras_gemma2_instructions` is a TensorFlow Datasets builder over files that
ship in this package, so it prepares offline:

```python
import tensorflow_datasets as tfds
import keras_gemma2.datasets  # registers the builder

train = tfds.load("keras_gemma2_instructions", split="train")
```
"""

import os

INSTRUCTIONS_DIR = os.path.join(os.path.dirname(__file__), "instructions")


def instructions_path(split="train"):
    """The bundled JSONL file of a split (`"train"` or `"test"`)."""
    if split not in ("train", "test"):
        raise ValueError(f"splits are 'train' and 'test'; got {split!r}.")
    return os.path.join(INSTRUCTIONS_DIR, f"{split}.jsonl")


try:
    import tensorflow_datasets  # noqa: F401
except ImportError:  # the builder needs tensorflow-datasets
    pass
else:
    from keras_gemma2.datasets.keras_gemma2_instructions import (
        KerasGemma2Instructions,
    )
