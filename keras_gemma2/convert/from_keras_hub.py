"""KerasHub `GemmaBackbone` (Gemma 2 mode) presets -> Gemma2Backbone."""

import glob
import os

from keras_gemma2 import h5
from keras_gemma2.convert import damaged
from keras_gemma2.convert import names

KERAS_HUB_BACKBONE = "keras_hub>GemmaBackbone"
WEIGHTS = "a KerasHub weights file"
FIX = damaged.KERAS_HUB_FIX


class KerasHubWeights:
    """The datasets of KerasHub's `model.weights.h5` (or its shards)."""

    def __init__(self, files):
        self.files = files
        if files.exists("model.weights.h5"):
            paths = [files.path("model.weights.h5")]
        elif files.is_local:
            paths = sorted(
                glob.glob(os.path.join(files.preset, "model_*.weights.h5"))
            )
        else:
            paths = []
        if not paths:
            raise FileNotFoundError(
                f"{files.preset} has no model.weights.h5: not a complete "
                "KerasHub preset."
            )
        # Every file is opened (and so checked whole, see `open_h5`) before
        # any weight is read.
        self.handles = []
        try:
            for path in paths:
                self.handles.append(damaged.open_h5(path, WEIGHTS, FIX))
        except damaged.DamagedFileError:
            self.close()
            raise

    def find(self, key):
        for handle in self.handles:
            if key in handle:
                return handle[key]
        return None

    def close(self):
        for handle in self.handles:
            handle.close()


def plan(files, config):
    """Backbone kwargs and the checked `(spec, dataset)` pairs."""
    with damaged.reading(
        files.path("config.json"),
        "a KerasHub GemmaBackbone config",
        FIX,
        errors=(KeyError, TypeError, AttributeError),
    ):
        kwargs = names.kwargs_from_keras_hub_config(config["config"])
    weights = KerasHubWeights(files)
    specs = names.weight_specs(kwargs)
    for spec in specs:
        dataset = weights.find(spec.keras_hub_key)
        if dataset is None:
            weights.close()
            raise ValueError(
                f"{files.preset}/model.weights.h5 has no {spec.keras_hub_key};"
                " config.json and the weights disagree."
            )
        if tuple(dataset.shape) != spec.shape:
            weights.close()
            raise ValueError(
                f"{files.preset}/model.weights.h5: {spec.keras_hub_key} has "
                f"shape {tuple(dataset.shape)}, but config.json implies "
                f"{spec.shape}."
            )
    return kwargs, specs, weights


def read_weight(spec, weights, dims):
    """One weight in our layout (KerasHub's equals ours), as numpy."""
    dataset = weights.find(spec.keras_hub_key)
    with damaged.reading(dataset.file.filename, WEIGHTS, FIX):
        return h5.read(dataset)
