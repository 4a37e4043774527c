"""The notebooks run top to bottom as users do, and are committed executed."""

import importlib.util
import pathlib

import keras
import nbformat
import pytest
from nbclient import NotebookClient

from keras_gemma2 import log_filter

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


# Notebooks that run in one backend's pass only; the others run in every
# pass. scripts/make_notebooks.py executes each one on the backend named
# here (the others on JAX) and commits the outputs. distributed.ipynb sets
# KERAS_BACKEND=jax itself. The fine-tuning tutorial trains for a minute
# (the same code runs on every backend, and tests/test_finetune_e2e.py
# trains on all three). The distillation and merging one took 70 s on JAX,
# 73 s on TensorFlow and 39 s on torch on 2 busy cores, so it runs in the
# shortest pass, torch's (tests/test_distillation.py and test_merging.py
# run on all three). rag.ipynb's retrieval does not depend on the backend
# and tests/test_rag.py runs `ask` on all three; torch's pass is the
# shortest (21 s on JAX, 24 s on TensorFlow, 19 s on torch).
# quickstart.ipynb runs the calls that tests/test_generation.py,
# test_presets.py and test_docstrings.py run on every backend, so it runs
# once too, in the shortest pass (57 s on JAX, 56 s on TensorFlow, 18 s on
# torch with the tests running beside it).
ONE_BACKEND = {
    "distill_and_merge.ipynb": "torch",
    "distributed.ipynb": "jax",
    "finetune_lora.ipynb": "jax",
    "quickstart.ipynb": "torch",
    "rag.ipynb": "torch",
}

# Notebooks with a figure: at least one PNG output in the committed copy.
PLOTTED = {
    "distill_and_merge.ipynb",
    "finetune_lora.ipynb",
    "quickstart.ipynb",
    "rag.ipynb",
}

# A code cell whose source starts with this line may be committed without
# output; every other code cell must show one.
SILENT = "# no output"


def _script():
    """scripts/make_notebooks.py as a module (scripts/ is no package)."""
    path = ROOT / "scripts" / "make_notebooks.py"
    spec = importlib.util.spec_from_file_location("make_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(notebook, output_type):
    return [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output["output_type"] == output_type
    ]


@pytest.mark.long
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    only = ONE_BACKEND.get(path.name, keras.config.backend())
    if only != keras.config.backend():
        pytest.skip(f"runs once, in the {only} pass")
    notebook = nbformat.read(str(path), as_version=4)
    # The kernel inherits KERAS_BACKEND from this process.
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    assert not _outputs(notebook, "error")


class TestCommittedNotebooks:
    """The committed copies: the script's cells, run, with their outputs.

    Reads files only, so it runs once, in the JAX pass.
    """

    @pytest.fixture(autouse=True)
    def _jax_pass_only(self):
        if keras.config.backend() != "jax":
            pytest.skip("reads the committed files; runs in the jax pass")

    def test_every_notebook_is_written_by_the_script(self):
        assert sorted(p.stem for p in NOTEBOOKS) == sorted(_script().NOTEBOOKS)

    @pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
    def test_cells_are_the_scripts(self, path):
        committed = nbformat.read(str(path), as_version=4)
        written = _script().build(path.stem)
        assert [(c.cell_type, c.source) for c in committed.cells] == [
            (c.cell_type, c.source) for c in written.cells
        ], "run scripts/make_notebooks.py to regenerate it"

    @pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
    def test_executed_in_order_on_its_backend(self, path):
        notebook = nbformat.read(str(path), as_version=4)
        expected = ONE_BACKEND.get(path.name, "jax")
        assert notebook.metadata["keras_gemma2"]["backend"] == expected
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(
            range(1, len(code) + 1)
        )

    @pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
    def test_every_code_cell_has_outputs(self, path):
        notebook = nbformat.read(str(path), as_version=4)
        empty = [
            cell.source.splitlines()[0]
            for cell in notebook.cells
            if cell.cell_type == "code"
            and not cell.outputs
            and not cell.source.startswith(SILENT)
        ]
        assert not empty, f"code cells without output, first lines: {empty}"

    @pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
    def test_outputs_are_clean(self, path):
        notebook = nbformat.read(str(path), as_version=4)
        assert not _outputs(notebook, "error")
        streams = _outputs(notebook, "stream")
        # No warnings, progress bars or backend start-up lines.
        assert not [s.text for s in streams if s.name == "stderr"]
        noise = [
            line
            for stream in streams
            for line in stream.text.splitlines()
            if log_filter.is_noise(line.encode())
        ]
        assert not noise

    @pytest.mark.parametrize("name", sorted(PLOTTED))
    def test_has_a_figure(self, name):
        notebook = nbformat.read(str(ROOT / "notebooks" / name), as_version=4)
        images = [
            output
            for output in _outputs(notebook, "display_data")
            if "image/png" in output.get("data", {})
        ]
        assert images
