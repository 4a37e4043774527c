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


# Notebooks that choose their own backend run once, in the JAX pass; so do
# the fine-tuning tutorial (a minute of training; the same code runs on every
# backend, and tests/test_finetune_e2e.py trains on all three) and the
# distillation and merging one (70 s on JAX, 73 s on TensorFlow, 39 s on
# torch on 2 busy cores; tests/test_distillation.py and test_merging.py run
# on all three).
JAX_ONLY = {
    "distill_and_merge.ipynb",
    "distributed.ipynb",
    "finetune_lora.ipynb",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    if path.name in JAX_ONLY and keras.config.backend() != "jax":
        pytest.skip("sets KERAS_BACKEND=jax itself; runs in the JAX pass")
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
