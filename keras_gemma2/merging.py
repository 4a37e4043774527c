"""WARP model merging: an EMA anchor, SLERP of task vectors, LITI.

WARP (Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged
Rewarded Policies") fine-tunes several policies from one initialisation
`init` and merges them in three stages:

1. `EMAAnchor`: an exponential moving average of the weights during
   fine-tuning (WARP uses it as the KL anchor of RL fine-tuning).
2. `slerp(init, fine_tuned, t)`: the task vectors `delta_i = theta_i -
   theta_init` are merged along the sphere, tensor by tensor:
   `slerp(d1, d2, t) = sin((1 - t) W) / sin(W) d1 + sin(t W) / sin(W) d2`,
   where `W` is the angle between the flattened `d1` and `d2`; the merged
   model is `theta_init + slerp(...)`.
3. `liti(init, merged, eta) = (1 - eta) theta_init + eta theta_merged`:
   linear interpolation towards the initialisation.

`warp(init, fine_tuned, t, eta)` chains 2 and 3 in one pass over the
weights. For WARP's iterated rounds, the result of one round is the `init`
of the next.

Every function takes (all of one kind):

- Keras models (`Gemma2Backbone` or `Gemma2CausalLM`), matched by weight
  path. LoRA models are merged through their effective kernels (`base +
  alpha / rank * a @ b`, whether `lora.merge`-d or not); the adapter
  matrices themselves are not merged (products of averaged adapters are
  not averaged products). The result is a plain model without LoRA.
  Quantized (int8) models are refused.
- Preset folders (or registered local preset names) saved by this
  package: the weights are streamed tensor by tensor from
  `*.weights.h5`, so only a few tensors are in memory at a time (the
  base's, one fine-tuned model's, the running result), never a whole
  model, and the merged preset folder is written
  atomically (`output=`), with the other files (config, tokenizer) of the
  first argument. Presets saved from LoRA models already hold effective
  kernels.
- Dicts `{name: NumPy array}`, merged into a dict.

```python
init = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
# ... fine-tune copies of init into policy_1 and policy_2 ...
merged = keras_gemma2.merging.warp(init, [policy_1, policy_2], eta=0.5)
```
"""

import os
import shutil

import h5py
import keras
import ml_dtypes
import numpy as np

from keras_gemma2 import atomic
from keras_gemma2 import lora
from keras_gemma2 import presets
from keras_gemma2.convert import damaged

# Config entries that are not the architecture.
_NOT_ARCHITECTURE = ("name", "trainable", "dtype", "dropout")
# Below this angle (radians) two task vectors count as parallel (or as
# antiparallel within it of pi) and SLERP falls back to linear
# interpolation, its limit.
_PARALLEL = 1e-6


class EMAAnchor(keras.callbacks.Callback):
    """Keeps an exponential moving average of the weights while training.

    After each training batch, `ema = decay * ema + (1 - decay) * weight`
    (WARP's EMA anchor, with update rate `mu = 1 - decay`). The average
    starts from the weights at the first `fit` and continues across `fit`
    calls; it is kept in float32 on the weights' device, and the model's
    own weights are never touched.

    Why not the optimizer's `use_ema=True`: Keras' optimizer EMA is written
    into the model (every `ema_overwrite_frequency` steps and at the end of
    `fit`), replacing the fine-tuned weights. WARP needs both: the
    fine-tuned policy to merge, and the anchor beside it (as the KL
    reference, or as the base of a merge). Here the anchor is readable
    separately (`anchor_weights()`) and written only where asked
    (`apply_to(model)`), with any optimizer.

    With LoRA only the adapters train: the average is of the adapter
    matrices `a` and `b` (`variables="trainable"`), not of their product.

    Args:
        decay: float in [0, 1). WARP's `mu = 0.01` is `decay=0.99`.
        variables: `"trainable"` (the default) or `"all"`: which weights
            to average. Non-trainable weights do not change in training, so
            `"all"` only makes the anchor a whole model.

    Example:
    ```python
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    ema = keras_gemma2.merging.EMAAnchor(decay=0.9)
    x = np.ones((8, 3))
    model.fit(x, x[:, :2], batch_size=2, callbacks=[ema], verbose=0)
    anchor = keras.models.clone_model(model)  # the same weight paths
    ema.apply_to(anchor)  # `model` keeps its fine-tuned weights
    ```
    """

    def __init__(self, decay=0.99, variables="trainable"):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"`decay` must be in [0, 1); got {decay!r}.")
        if variables not in ("trainable", "all"):
            raise ValueError(
                f"`variables` must be 'trainable' or 'all'; got {variables!r}."
            )
        self.decay = float(decay)
        self.variables = variables
        self._ema = None

    def _watched(self):
        model = self.model
        if self.variables == "trainable":
            return list(model.trainable_variables)
        return list(model.weights)

    def on_train_begin(self, logs=None):
        watched = self._watched()
        if self._ema is not None and set(self._ema) == {
            v.path for v in watched
        }:
            return  # a further `fit` of the same model: keep averaging
        # A copy: JAX's training step donates (deletes) the old buffers.
        self._ema = {
            v.path: keras.ops.copy(
                keras.ops.cast(keras.ops.stop_gradient(v.value), "float32")
            )
            for v in watched
        }

    def on_train_batch_end(self, batch, logs=None):
        rate = 1.0 - self.decay
        for variable in self._watched():
            old = self._ema[variable.path]
            new = keras.ops.cast(
                keras.ops.stop_gradient(variable.value), "float32"
            )
            self._ema[variable.path] = old + rate * (new - old)

    def anchor_weights(self):
        """`{weight path: NumPy float32 array}` of the moving average."""
        if self._ema is None:
            raise ValueError("No average yet: train with this callback first.")
        return {
            path: keras.ops.convert_to_numpy(value)
            for path, value in self._ema.items()
        }

    def apply_to(self, model):
        """Assigns the average to `model`'s weights of the same paths.

        Every path and shape is checked before anything is assigned. Use a
        second copy of the model to keep the fine-tuned weights.
        """
        weights = self.anchor_weights()
        variables = {v.path: v for v in model.weights}
        missing = sorted(set(weights) - set(variables))
        if missing:
            raise ValueError(
                f"The model has no weights {missing[:3]} of the average; "
                "apply it to a model of the same architecture (and LoRA)."
            )
        for path, value in weights.items():
            if tuple(variables[path].shape) != value.shape:
                raise ValueError(
                    f"{path}: shape {tuple(variables[path].shape)} in the "
                    f"model, {value.shape} in the average."
                )
        for path, value in weights.items():
            variables[path].assign(value.astype(variables[path].dtype))
        return model


def slerp(base, fine_tuned, t=None, output=None):
    """Merges the fine-tuned models' task vectors along the sphere.

    Per weight tensor, with `d_i = theta_i - theta_base` flattened:
    `slerp(d1, d2, t) = sin((1 - t) W) / sin(W) d1 + sin(t W) / sin(W) d2`
    with `W` the angle between `d1` and `d2`; the result is `theta_base +
    slerp(...)`. Where `W` is within 1e-6 of 0 or pi (parallel or opposite
    vectors), or either vector is zero (a tensor one model left
    unchanged), it falls back to linear interpolation `(1 - t) d1 + t d2`.
    Equal-norm task vectors merge to that norm; `t = 0` and `t = 1` give
    the first and the second model exactly.

    More than two models (WARP's iterative pairwise rule): with weights
    `w_1..w_M`, `d = d_1`, then for `i = 2..M`: `d = slerp(d, d_i, w_i /
    (w_1 + ... + w_i))`. Uniform weights (the default) give `t_i = 1 / i`.
    The order matters for M > 2 (SLERP is not associative).

    Args:
        base: the model the fine-tuning started from (or its EMA anchor):
            a Keras model, a preset folder or a dict of arrays.
        fine_tuned: list of models of the same kind and architecture.
        t: None (uniform weights), a float in [0, 1] for two models (the
            weight of the second), or one weight in [0, 1] per model,
            summing to 1.
        output: for models, None (a new model of `base`'s class) or a model
            to write into (`base` or a fine-tuned one, to save memory; not
            a LoRA model); for presets, the folder to write (required).

    Returns:
        The merged model, preset folder path or dict.

    Example:
    ```python
    base = {"w": np.zeros(2)}
    policy_1, policy_2 = {"w": np.array([1.0, 0.0])}, {"w": np.array([0, 1.0])}
    merged = keras_gemma2.merging.slerp(base, [policy_1, policy_2], t=0.5)
    # Unit task vectors at 90 degrees: the result stays on the unit circle.
    np.testing.assert_allclose(merged["w"], [0.5**0.5, 0.5**0.5])
    # Models (or preset folders) merge the same way, tensor by tensor:
    init = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    tuned = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.merging.slerp(init, [tuned, tuned], t=0.3, output=tuned)
    ```
    """
    fine_tuned = _as_list(fine_tuned)
    weights = _weights(t, len(fine_tuned))
    return _run(
        [base] + fine_tuned,
        output,
        lambda arrays: _slerp_tensor(arrays[0], arrays[1:], weights),
    )


def liti(init, merged, eta=0.5, output=None):
    """Moves the merged model back towards the initialisation.

    `theta = (1 - eta) theta_init + eta theta_merged`, per weight; `eta = 0`
    gives `init` and `eta = 1` gives `merged` exactly.

    Args:
        init: the initialisation (a model, preset folder or dict).
        merged: the merged model, of the same kind and architecture.
        eta: float in [0, 1].
        output: as in `slerp`.

    Example:
    ```python
    init = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    merged = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.merging.liti(init, merged, eta=0.3, output=merged)
    ```
    """
    eta = _unit("eta", eta)
    return _run(
        [init, merged],
        output,
        lambda arrays: _liti_tensor(arrays[0], arrays[1], eta),
    )


def warp(init, fine_tuned, t=None, eta=0.5, output=None):
    """WARP's merge: `liti(init, slerp(init, fine_tuned, t), eta)`.

    The task vectors are taken relative to `init`, the weights the
    fine-tuning started from (WARP's SFT initialisation), and the SLERP
    result is interpolated back towards `init`. Both stages run in one pass
    over the weights (one result in memory, one preset written). The EMA
    stage is `EMAAnchor`, used during fine-tuning. For WARP's iterations,
    pass the result as the next round's `init`.

    Args:
        init: the initialisation: a model, preset folder or dict.
        fine_tuned: list of fine-tuned models of the same kind.
        t: the SLERP weights, as in `slerp` (None: uniform).
        eta: float in [0, 1], as in `liti`.
        output: as in `slerp`.

    Example:
    ```python
    import os, tempfile
    folder = tempfile.mkdtemp()
    policy = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    policy.save_to_preset(os.path.join(folder, "policy_1"))
    policy.save_to_preset(os.path.join(folder, "policy_2"))
    keras_gemma2.merging.warp(
        "gemma2_tiny_en",
        [os.path.join(folder, "policy_1"), os.path.join(folder, "policy_2")],
        t=0.5,
        eta=0.5,
        output=os.path.join(folder, "merged"),
    )
    merged = keras_gemma2.Gemma2Backbone.from_preset(
        os.path.join(folder, "merged")
    )
    ```
    """
    fine_tuned = _as_list(fine_tuned)
    weights = _weights(t, len(fine_tuned))
    eta = _unit("eta", eta)

    def merge(arrays):
        return _liti_tensor(
            arrays[0],
            lambda: _slerp_tensor(arrays[0], arrays[1:], weights),
            eta,
        )

    return _run([init] + fine_tuned, output, merge)


# --- per-tensor arithmetic ---------------------------------------------


def _pair(d1, d2, t):
    """SLERP of two flat-or-not task vectors (same shape) at `t`."""
    n1 = np.sqrt(_dot(d1, d1))
    n2 = np.sqrt(_dot(d2, d2))
    if n1 == 0 or n2 == 0:
        omega = 0.0
    else:
        cos = np.clip(_dot(d1, d2) / (n1 * n2), -1.0, 1.0)
        omega = float(np.arccos(cos))
    if omega < _PARALLEL or np.pi - omega < _PARALLEL:
        return (1 - t) * d1 + t * d2
    sin = np.sin(omega)
    a = np.sin((1 - t) * omega) / sin
    b = np.sin(t * omega) / sin
    return a.astype(d1.dtype) * d1 + b.astype(d1.dtype) * d2


def _dot(a, b, chunk=1 << 22):
    """`a . b` accumulated in float64, a chunk at a time (bounded memory)."""
    a = a.reshape(-1)
    b = b.reshape(-1)
    return float(
        sum(
            np.dot(
                a[i : i + chunk].astype(np.float64),
                b[i : i + chunk].astype(np.float64),
            )
            for i in range(0, a.size, chunk)
        )
    )


def _slerp_tensor(base, getters, weights):
    """Merges one tensor; `getters` fetch the fine-tuned tensors lazily."""
    base = base()
    exact = 0  # the model the merged task vector equals exactly, if any
    first = getters[0]()
    delta = first - base
    total = weights[0]
    for i in range(1, len(getters)):
        total += weights[i]
        step = 0.0 if weights[i] == 0 else weights[i] / total
        if step == 0:
            continue  # the model has no weight: not even read
        theta = getters[i]()
        if step >= 1:
            delta, exact, first = theta - base, i, theta
        else:
            delta, exact = _pair(delta, theta - base, step), None
        del theta
    if exact is not None:
        return first
    return base + delta


def _liti_tensor(init, merged, eta):
    if eta == 0:
        return init()
    if eta == 1:
        return merged()
    return (1 - eta) * init() + eta * merged()


def _unit(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number in [0, 1]; got {value!r}."
        ) from None
    if not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be in [0, 1]; got {value!r}.")
    return value


def _as_list(fine_tuned):
    if isinstance(fine_tuned, (str, os.PathLike, dict)) or not isinstance(
        fine_tuned, (list, tuple)
    ):
        fine_tuned = [fine_tuned]
    fine_tuned = list(fine_tuned)
    if not fine_tuned:
        raise ValueError("`fine_tuned` is empty: give at least one model.")
    return fine_tuned


def _weights(t, count):
    if t is None:
        return [1.0 / count] * count
    if isinstance(t, (list, tuple, np.ndarray)):
        weights = [_unit("t", w) for w in t]
        if len(weights) != count:
            raise ValueError(
                f"`t` has {len(weights)} weights for {count} fine-tuned "
                "models; give one per model."
            )
        if abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"The weights `t` must sum to 1; got {t!r}.")
        return weights
    t = _unit("t", t)
    if count != 2:
        raise ValueError(
            f"A single `t` merges two models; got {count}. Give one weight "
            "per model (summing to 1), or None for uniform weights."
        )
    return [1.0 - t, t]


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
            **{k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE},
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
                if k not in _NOT_ARCHITECTURE
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
        return {k: _h5_dtype(d) for k, d in self.datasets.items()}

    def get(self, name):
        dataset = self.datasets[name]
        with damaged.reading(
            dataset.file.filename, "a Keras weights file", damaged.PRESET_FIX
        ):
            return _float(_h5_read(dataset))

    def close(self):
        for handle in self.handles.values():
            handle.close()


def _h5_dtype(dataset):
    if dataset.attrs.get("dtype") == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return dataset.dtype


def _h5_read(dataset):
    raw = dataset[()]
    dtype = _h5_dtype(dataset)
    return raw.view(dtype) if raw.dtype != dtype else raw


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


def _run(items, output, merge):
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
                    target = out[name[len(file) + 1 :]]
                    dtype = _h5_dtype(dataset)
                    value = compute(name).astype(dtype, copy=False)
                    target[...] = value.view(target.dtype)
    return output
