"""Shared pytest setup: quiet backends and a fixed seed."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "jax")
# Never reach a model hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KAGGLEHUB_OFFLINE", "1")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1337)
    yield


def pytest_collection_modifyitems(items):
    """Runs the tests marked `long` first, keeping the order otherwise.

    `tests/run_backends.py` spreads a pass over pytest-xdist workers, and
    a pass ends when its last test does: a four-minute test taken last
    keeps the pass waiting while the other workers idle. Taken first, the
    short tests fill in around it.
    """
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
