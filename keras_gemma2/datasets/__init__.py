"""Datasets bundled with keras_gemma2.

`keras_gemma2_instructions` is a TensorFlow Datasets builder over files that
ship in this package, so it prepares offline:

```python
import tensorflow_datasets as tfds
import keras_gemma2.datasets  # registers the builder

train = tfds.load("keras_gemma2_instructions", split="train")
```

`rag_docs_path()` and `rag_questions_path()` give a small retrieval test
corpus written for this package (invented documents, and questions whose
answers sit in exactly one document); see `rag_docs_LICENSE.md`.
"""

import json
import os

INSTRUCTIONS_DIR = os.path.join(os.path.dirname(__file__), "instructions")


def instructions_path(split="train"):
    """The bundled JSONL file of a split (`"train"` or `"test"`)."""
    if split not in ("train", "test"):
        raise ValueError(f"splits are 'train' and 'test'; got {split!r}.")
    return os.path.join(INSTRUCTIONS_DIR, f"{split}.jsonl")


RAG_DOCS_DIR = os.path.join(os.path.dirname(__file__), "rag_docs")
RAG_QUESTIONS_FILE = os.path.join(
    os.path.dirname(__file__), "rag_questions.jsonl"
)


def rag_docs_path():
    """The bundled folder of retrieval test documents (`.md` and `.txt`).

    ```python
    import pathlib

    from keras_gemma2.datasets import rag_docs_path

    files = sorted(pathlib.Path(rag_docs_path()).rglob("*.*"))
    print(len(files), files[0].name)
    ```
    """
    return RAG_DOCS_DIR


def rag_questions_path():
    """The bundled JSONL file of questions about `rag_docs_path()`.

    Each line holds `question`, `source` (the answering document's path
    relative to `rag_docs_path()`, with forward slashes) and `answer`.

    ```python
    from keras_gemma2.datasets import rag_questions_path

    with open(rag_questions_path(), encoding="utf-8") as f:
        print(f.readline())
    ```
    """
    return RAG_QUESTIONS_FILE


def load_rag_questions():
    """The questions of `rag_questions_path()` as a list of dicts.

    ```python
    import os

    from keras_gemma2.datasets import load_rag_questions, rag_docs_path

    q = load_rag_questions()[0]
    print(q["question"], "->", q["answer"])
    print(os.path.join(rag_docs_path(), *q["source"].split("/")))
    ```
    """
    with open(RAG_QUESTIONS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


try:
    import tensorflow_datasets  # noqa: F401
except ImportError:  # the builder needs tensorflow-datasets
    pass
else:
    from keras_gemma2.datasets.keras_gemma2_instructions import (
        KerasGemma2Instructions,
    )
