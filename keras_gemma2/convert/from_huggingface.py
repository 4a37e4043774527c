"""Hugging Face Gemma 2 checkpoints (safetensors) -> Gemma2Backbone."""

import os

import ml_dtypes
import numpy as np

from keras_gemma2.convert import damaged
from keras_gemma2.convert import names

# safetensors dtype codes -> numpy dtypes (bfloat16 through ml_dtypes).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
}
PICKLED_WEIGHTS = ("pytorch_model.bin", ".bin", ".pt", ".pth", ".ckpt")
CONFIG = "a Gemma 2 config"


def pickled_weights_error(files):
    """A ValueError refusing a folder's pickled weights; None if none."""
    pickled = [f for f in files.listdir() if f.endswith(PICKLED_WEIGHTS)]
    if not pickled:
        return None
    return ValueError(
        f"{files.preset} holds only pickled weights ({pickled[0]}). "
        "keras_gemma2 never unpickles a checkpoint (it can run code); "
        "convert it to safetensors first, e.g. "
        "`model.save_pretrained(path, safe_serialization=True)`."
    )


class SafetensorsCheckpoint:
    """The tensors of one or many `.safetensors` files, read lazily.

    Only the headers are read up front, so every key and shape can be checked
    before a single weight is loaded; each tensor is then memory-mapped on
    demand, so loading holds one tensor at a time beyond the model itself.
    Every shard's header is checked against its file's length first, so a
    shard cut short is refused before any weight moves.

    Why our own reader, where KerasHub's HF converter uses
    `safetensors.safe_open`: it reads tensor by tensor as the model is
    built, into a model already given a random initialisation, so a
    missing key or a wrong shape is found after part of the model is
    loaded, and a truncated shard raises from deep inside the library.
    Reading the headers first (`json`, then `numpy.memmap` per tensor, into
    deferred variables) checks everything before a weight moves, and grew
    resident memory by 1.12x the model while loading, against KerasHub's
    2.34x (`benchmarks/load_memory.py`). safetensors is then needed only to
    write files.
    """

    def __init__(self, files):
        self.files = files
        self.tensors = {}  # key -> (local path, header entry, data start)
        for filename in self._shard_names():
            path = files.path(filename)
            header, start = damaged.safetensors_header(
                path, "a safetensors file", damaged.HF_FIX
            )
            for key, entry in header.items():
                if key != "__metadata__":
                    self.tensors[key] = (path, entry, start)

    def _shard_names(self):
        files = self.files
        if files.exists("model.safetensors.index.json"):
            name = "model.safetensors.index.json"
            index = files.json(name, "a safetensors index", damaged.HF_FIX)
            with damaged.reading(
                files.path(name),
                "a safetensors index",
                damaged.HF_FIX,
                errors=(KeyError, AttributeError, TypeError),
            ):
                shards = sorted(set(index["weight_map"].values()))
            for shard in shards:
                if not files.exists(shard):
                    raise FileNotFoundError(
                        f"Shard {shard} listed in "
                        f"{files.preset}/model.safetensors.index.json is "
                        "missing. Download the whole checkpoint folder again."
                    )
            return shards
        if files.exists("model.safetensors"):
            return ["model.safetensors"]
        refusal = pickled_weights_error(files)
        if refusal is not None:
            raise refusal
        raise FileNotFoundError(
            f"{files.preset} has no model.safetensors or "
            "model.safetensors.index.json."
        )

    def shape(self, key):
        return tuple(self.tensors[key][1]["shape"])

    def file_of(self, key):
        return os.path.basename(self.tensors[key][0])

    def read(self, key):
        path, entry, start = self.tensors[key]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_numpy_dtype(entry["dtype"], key, path))
        with damaged.reading(path, "a safetensors file", damaged.HF_FIX):
            return np.memmap(
                path,
                dtype=dtype,
                mode="r",
                offset=start + begin,
                shape=tuple(entry["shape"]),
            )


def _numpy_dtype(code, key, path):
    if code not in _DTYPES:
        raise ValueError(f"{path}: tensor {key} has unsupported dtype {code}.")
    if code == "BF16":
        return ml_dtypes.bfloat16
    return _DTYPES[code]


def checkpoint_dtype(config):
    """The dtype a checkpoint was saved in, as a Keras dtype name."""
    saved = config.get("torch_dtype") or config.get("dtype") or "float32"
    return "bfloat16" if "bfloat16" in str(saved) else "float32"


def plan(files, config=None):
    """Backbone kwargs and the checked `(spec, checkpoint)` load plan.

    Raises before anything is loaded if a key is missing or a shape differs
    from what `config.json` implies.
    """
    config = config or files.json("config.json", CONFIG, damaged.HF_FIX)
    # A missing or mistyped field is a damaged config (names.py reads
    # fields by key); names.py's own ValueErrors pass through as they are.
    with damaged.reading(
        files.path("config.json"),
        CONFIG,
        damaged.HF_FIX,
        errors=(KeyError, TypeError),
    ):
        kwargs = names.kwargs_from_hf_config(config)
    checkpoint = SafetensorsCheckpoint(files)
    specs = names.weight_specs(kwargs)
    for spec in specs:
        if spec.hf_key not in checkpoint.tensors:
            raise ValueError(
                f"{files.preset}: tensor {spec.hf_key} is missing from the "
                "checkpoint; config.json and the weights disagree."
            )
        found = checkpoint.shape(spec.hf_key)
        if found != spec.hf_shape:
            raise ValueError(
                f"{files.preset}/{checkpoint.file_of(spec.hf_key)}: tensor "
                f"{spec.hf_key} has shape {found}, but config.json implies "
                f"{spec.hf_shape}. The config does not belong to these "
                "weights."
            )
    return kwargs, specs, checkpoint


def read_weight(spec, checkpoint, dims):
    """One weight in our layout, as numpy."""
    return spec.from_hf(checkpoint.read(spec.hf_key), dims)
