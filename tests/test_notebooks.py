"""The notebooks run top to bottom on the current backend, as users do."""

import pathlib

import keras
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob(
        "*.ipynb"
    )
)


# Notebooks that run in one backend's pass only. distributed.ipynb sets
# KERAS_BACKEND=jax itself. The fine-tuning tutorial trains for a minute
# (the same code runs on every backend, and tests/test_finetune_e2e.py
# trains on all three). The distillation and merging one took 70 s on JAX,
# 73 s on TensorFlow and 39 s on torch on 2 busy cores, so it runs in the
# shortest pass, torch's (tests/test_distillation.py and test_merging.py
# run on all three). rag.ipynb's retrieval does not depend on the backend
# and tests/test_rag.py runs `ask` on all three; torch's pass is the
# shortest (21 s on JAX, 24 s on TensorFlow, 19 s on torch).
ONE_BACKEND = {
    "distill_and_merge.ipynb": "torch",
    "distributed.ipynb": "jax",
    "finetune_lora.ipynb": "jax",
    "rag.ipynb": "torch",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    only = ONE_BACKEND.get(path.name, keras.config.backend())
    if only != keras.config.backend():
        pytest.skip(f"runs once, in the {only} pass")
    notebook = nbformat.read(str(path), as_version=4)
    # The kernel inherits KERAS_BACKEND from this process.
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
