"""What a merge reads and writes: Keras models, preset folders (streamed
from `*.weights.h5`) and dicts of arrays, checked against each other."""

import os
import shutil

import h5py
import keras
import numpy as np

from keras_gemma2 import atomic
from keras_gemma2 import h5
from keras_gemma2 import lora
from keras_gemma2 import presets
from keras_gemma2.convert import damaged

# Config entries that are not the architecture.
NOT_ARCHITECTURE = ("name", "trainable", "dtype", "dropout")


# --- sources: models, preset folders, dicts -----------------------------


def _float(array):
    array = np.asarray(array)
    return array.astype(np.result_type(array.dtype, np.float32), copy=False)


class _DictSource:
    kind = "dict"

    def __init__(self, mapping, label):
        self.label = label
        self.mapping = mapping
        self.config = None

    def shapes(self):
        return {k: tuple(np.shape(v)) for k, v in self.mapping.items()}

    def dtypes(self):
        return {k: np.asarray(v).dtype for k, v in self.mapping.items()}

    def get(self, name):
        return _float(self.mapping[name])


class _ModelSource:
    kind = "model"

    def __init__(self, model, label):
        self.label = label
        self.model = model
        self.backbone = getattr(model, "backbone", model)
        if any(
            getattr(layer, "quantization_mode", None)
            for layer in self.backbone._flatten_layers()
        ):
            raise ValueError(
                f"{label} is quantized: merging int8 kernels would round "
                "the result. Merge float models and quantize after."
            )
        adapters = set(lora.adapter_variables(self.backbone))
        self.effective = {}
        for layer in self.backbone._flatten_layers(include_self=False):
            if getattr(layer, "lora_enabled", False):
                self.effective[layer._kernel.path] = layer
        self.variables = {
            v.path: v for v in self.backbone.weights if v.path not in adapters
        }
        self.lora = bool(adapters)
        config = self.backbone.get_config()
        self.config = {
            "class_name": type(self.backbone).__name__,
            **{k: v for k, v in config.items() if k not in NOT_ARCHITECTURE},
        }

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.variables.items()}

    def dtypes(self):
        return {k: np.dtype(v.dtype) for k, v in self.variables.items()}

    def get(self, name):
        if name in self.effective:
            value = self.effective[name].kernel  # base + scale * a @ b
        else:
            value = self.variables[name].value
        return _float(keras.ops.convert_to_numpy(value))


class _PresetSource:
    kind = "preset"

    def __init__(self, preset, label):
        self.label = label
        if isinstance(preset, os.PathLike):
            preset = os.fspath(preset)
        if not os.path.isdir(preset):
            preset, _ = presets.resolve(preset, {})
        if not os.path.isdir(preset):
            raise ValueError(
                f"{label} ({preset!r}) is not a local preset folder; "
                "download it first (or load it as a model)."
            )
        self.folder = preset
        self.files = sorted(
            f for f in os.listdir(preset) if f.endswith(".weights.h5")
        )
        config_path = os.path.join(preset, "config.json")
        if not self.files or not os.path.isfile(config_path):
            raise ValueError(
                f"{label} ({preset!r}) is not a keras_gemma2 preset folder "
                "(no config.json and model.weights.h5)."
            )
        saved = damaged.read_json(
            config_path, "a keras_gemma2 preset config.json", damaged.PRESET_FIX
        )
        self.config = {
            "class_name": saved.get("class_name"),
            **{
                k: v
                for k, v in saved.get("config", {}).items()
                if k not in NOT_ARCHITECTURE
            },
        }
        # Opened (so checked whole: HDF5 refuses a truncated file) before
        # anything is merged or written.
        self.handles = {}
        try:
            for name in self.files:
                self.handles[name] = damaged.open_h5(
                    os.path.join(preset, name),
                    "a Keras weights file",
                    damaged.PRESET_FIX,
                )
        except damaged.DamagedFileError:
            self.close()
            raise
        self.datasets = {}
        for file, handle in self.handles.items():
            handle.visititems(
                lambda path, obj, file=file: (
                    self.datasets.__setitem__(f"{file}:{path}", obj)
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )

    def shapes(self):
        return {k: tuple(d.shape) for k, d in self.datasets.items()}

    def dtypes(self):
        return {k: h5.stored_dtype(d) for k, d in self.datasets.items()}

    def get(self, name):
        dataset = self.datasets[name]
        with damaged.reading(
            dataset.file.filename, "a Keras weights file", damaged.PRESET_FIX
        ):
            return _float(h5.read(dataset))

    def close(self):
        for handle in self.handles.values():
            handle.close()


def _source(item, label):
    if isinstance(item, dict):
        return _DictSource(item, label)
    if isinstance(item, keras.Model):
        return _ModelSource(item, label)
    if isinstance(item, (str, os.PathLike)):
        return _PresetSource(item, label)
    raise TypeError(
        f"{label} must be a Keras model, a preset folder or a dict of "
        f"arrays; got {type(item).__name__}."
    )


def _check(sources):
    """Same kind, architecture, weight names, shapes; float weights."""
    first = sources[0]
    for other in sources[1:]:
        if other.kind != first.kind:
            raise ValueError(
                f"{first.label} is a {first.kind} and {other.label} a "
                f"{other.kind}: give all models of one kind (load presets "
                "as models, or save models as presets)."
            )
        if first.config is not None:
            for key in sorted(set(first.config) | set(other.config)):
                if first.config.get(key) != other.config.get(key):
                    raise ValueError(
                        "The models have different architectures: config "
                        f"key {key!r} is {first.config.get(key)!r} in "
                        f"{first.label} and {other.config.get(key)!r} in "
                        f"{other.label}."
                    )
    shapes = first.shapes()
    for other in sources[1:]:
        theirs = other.shapes()
        missing = sorted(set(shapes) - set(theirs))
        extra = sorted(set(theirs) - set(shapes))
        if missing or extra:
            raise ValueError(
                f"{other.label} does not have the weights of {first.label}: "
                f"missing {missing[:3]}, unexpected {extra[:3]}."
            )
        for name, shape in shapes.items():
            if theirs[name] != shape:
                raise ValueError(
                    f"{name}: shape {theirs[name]} in {other.label}, {shape} "
                    f"in {first.label}."
                )
    for source in sources:
        for name, dtype in source.dtypes().items():
            if not _is_float(dtype):
                raise ValueError(
                    f"{name} of {source.label} is {dtype}, not float: "
                    "quantized or integer weights cannot be merged."
                )
    return shapes


def _is_float(dtype):
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(dtype))


def _label(i):
    return "the base" if i == 0 else f"model {i}"


def run_merge(items, output, merge):
    """Checks every input, then merges tensor by tensor into `output`."""
    sources = []
    try:
        for i, item in enumerate(items):
            sources.append(_source(item, _label(i)))
        shapes = _check(sources)
        kind = sources[0].kind

        def compute(name):
            return merge([lambda s=s: s.get(name) for s in sources])

        if kind == "dict":
            if output is not None:
                raise ValueError("`output` is for models and presets only.")
            # A copy even where an endpoint is returned as it is.
            return {
                name: np.array(
                    compute(name), dtype=np.asarray(items[0][name]).dtype
                )
                for name in shapes
            }
        if kind == "model":
            return _merge_models(sources, shapes, output, compute)
        return _merge_presets(sources, output, compute)
    finally:
        for source in sources:
            if hasattr(source, "close"):
                source.close()


def _merge_models(sources, shapes, output, compute):
    base = sources[0]
    if output is None:
        output = _empty_copy(base.model)
    elif isinstance(output, (str, os.PathLike)):
        raise ValueError(
            "These are models: `output` is None or a model. Save the result "
            "with `save_to_preset`."
        )
    target = _source(output, "`output`")
    if target.lora:
        raise ValueError(
            "`output` has LoRA adapters: the merged effective kernels would "
            "get the adapters added again. Write into a model without LoRA "
            "(or output=None)."
        )
    _check([base, target])
    for name in shapes:
        variable = target.variables[name]
        variable.assign(compute(name).astype(variable.dtype, copy=False))
    return output


def _empty_copy(model):
    backbone = getattr(model, "backbone", model)
    copy = type(backbone).from_config(backbone.get_config())
    if backbone is model:
        return copy
    return type(model)(backbone=copy, preprocessor=model.preprocessor)


def _merge_presets(sources, output, compute):
    if output is None or not isinstance(output, (str, os.PathLike)):
        raise ValueError(
            "Merging presets writes a preset folder: pass `output=` a "
            "folder path."
        )
    output = os.path.abspath(os.fspath(output))
    if any(os.path.abspath(s.folder) == output for s in sources):
        raise ValueError(
            f"`output` {output!r} is one of the inputs, which are read while "
            "the result is written: choose another folder."
        )
    presets.check_preset_target(output)
    base = sources[0]
    with atomic.staged_folder(output, "merging") as staging:
        for entry in os.listdir(base.folder):
            source = os.path.join(base.folder, entry)
            if entry in base.files:
                continue
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(staging, entry))
            else:
                shutil.copy2(source, os.path.join(staging, entry))
        for file in base.files:
            # A copy of the base file, every dataset then overwritten: the
            # groups and attributes Keras wrote stay as they were.
            shutil.copyfile(
                os.path.join(base.folder, file), os.path.join(staging, file)
            )
            with h5py.File(os.path.join(staging, file), "r+") as out:
                for name, dataset in base.datasets.items():
                    if not name.startswith(f"{file}:"):
                        continue
                    h5.assign(out[name[len(file) + 1 :]], compute(name))
    return output
