"""LoRA adapters: targets and alpha, adapter files, merge and unmerge.

Built on Keras' own `EinsumDense.enable_lora`; what is ours is the file
format (a small safetensors file keyed by weight path, with the rank, alpha,
targets and the architecture it was trained on), loading that checks
everything before assigning anything, and merging that can be undone.

```python
lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
keras_gemma2.lora.enable(lm.backbone, rank=4, alpha=8)
# ... lm.fit(...) ...
keras_gemma2.lora.save_adapters(lm.backbone, "adapters.safetensors")
```
"""

import json
import numbers
import os

import keras
import numpy as np
from keras import ops
from keras import random

from keras_gemma2 import atomic
from keras_gemma2.convert import damaged
from keras_gemma2.convert import to_peft

# Our EinsumDense names inside each decoder block.
ATTENTION_TARGETS = ("query", "key", "value", "attention_output")
FFN_TARGETS = ("ffw_gating", "ffw_gating_2", "ffw_linear")
ALL_TARGETS = ATTENTION_TARGETS + FFN_TARGETS
DEFAULT_TARGETS = ("query", "value")
# The backbone config an adapter file must match.
_ARCHITECTURE_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "num_key_value_heads",
    "hidden_dim",
    "intermediate_dim",
    "head_dim",
)
_FORMAT = "keras_gemma2.lora/1"
_WHAT = "a safetensors adapter file"


def enable(
    backbone, rank, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, seed=None
):
    """Freezes the backbone and adds LoRA adapters to the target matrices.

    Works on float and on `quantize("int8")`-ed backbones (the base stays
    int8, the adapters are float: QLoRA-style training).

    Args:
        backbone: a `Gemma2Backbone`.
        rank: int. The adapters' rank.
        alpha: float. Adapter outputs are scaled by `alpha / rank`; defaults
            to `rank` (a scale of 1).
        targets: names among `"query"`, `"key"`, `"value"`,
            `"attention_output"`, `"ffw_gating"`, `"ffw_gating_2"`,
            `"ffw_linear"`, or `"all"`. Defaults to query and value.
        dropout: float in [0, 1). In training, the adapters see their input
            through dropout of this rate (the base matrix sees it whole),
            as in PEFT's `lora_dropout`.
        seed: int. Seeds the dropout.

    Example:
    ```python
    backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.enable(
        backbone, rank=4, alpha=8, targets="all", dropout=0.05
    )
    ```
    """
    targets = _check_targets(targets)
    check_rank(rank)
    if alpha is not None and (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not alpha > 0
    ):
        raise ValueError(
            f"`alpha` must be a number above 0 (adapter outputs are scaled "
            f"by alpha / rank); got {alpha!r}. Leave it out for alpha = rank."
        )
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not 0 <= dropout < 1
    ):
        raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
    if getattr(backbone, "_lora_enabled_layers", None):
        raise ValueError(
            "LoRA is already enabled on this backbone; enable it once, on a "
            "fresh model."
        )
    backbone.trainable = True
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    enabled = []
    for index, block in enumerate(backbone.transformer_layers):
        for name in targets:
            layer = _target_layer(block, name)
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=alpha)
            layer.lora_dropout = float(dropout)
            if dropout:
                with _unlocked(layer):
                    layer._lora_seed_generator = keras.random.SeedGenerator(
                        None if seed is None else seed + 1000 * index
                    )
                _add_dropout(layer)
            enabled.append(layer)
    # KerasHub's bookkeeping, so that its own LoRA helpers see the layers.
    # (A quantized backbone's tracker is locked: Keras locks it after
    # `quantize`.)
    with _unlocked(backbone):
        backbone._lora_enabled_layers = enabled
        backbone._lora_rank = rank
        backbone._lora_targets = targets
        backbone._lora_dropout = float(dropout)


def _add_dropout(layer):
    """Routes the adapters' input through dropout in training.

    Keras' `EinsumDense` folds LoRA into its kernel (float) or adds it after
    the base einsum (int8), both on the same input, so it has no LoRA
    dropout. In training this computes the base output with LoRA switched
    off, then adds `scale * (dropout(x) . a) @ b`; at inference the layer's
    own call runs unchanged. Instance attributes, so that only layers with
    dropout pay for it and the class (and Keras' quantization of it) is
    untouched.
    """

    def with_dropout(original):
        def call(inputs, training=None):
            if not (training and layer.lora_enabled):
                return original(inputs, training=training)
            layer.lora_enabled = False
            try:
                outputs = original(inputs, training=training)
            finally:
                layer.lora_enabled = True
            dropped = random.dropout(
                inputs, layer.lora_dropout, seed=layer._lora_seed_generator
            )
            lora_x = ops.einsum(layer.equation, dropped, layer.lora_kernel_a)
            lora_x = ops.matmul(lora_x, layer.lora_kernel_b)
            scale = layer.lora_alpha / layer.lora_rank
            return ops.add(outputs, ops.cast(scale, outputs.dtype) * lora_x)

        return call

    layer.call = with_dropout(layer.call)
    layer.quantized_call = with_dropout(layer.quantized_call)


class _unlocked:
    """Lets attributes be set on a built (tracker-locked) layer."""

    def __init__(self, layer):
        self.tracker = getattr(layer, "_tracker", None)

    def __enter__(self):
        self.locked = self.tracker is not None and self.tracker.locked
        if self.locked:
            self.tracker.unlock()

    def __exit__(self, *exc):
        if self.locked:
            self.tracker.lock()


def adapter_variables(backbone):
    """`{weight path: variable}` of every LoRA matrix, in layer order."""
    found = {}
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False) or _merged(layer):
            for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
                found[variable.path] = variable
    return found


def save_adapters(backbone, path):
    """Writes only the LoRA matrices, keyed by weight path, atomically.

    The file (safetensors) records the rank, alpha, targets and the
    architecture; `load_adapters` checks them.

    Example:
    ```python
    import os, tempfile
    backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.enable(backbone, rank=2)
    path = os.path.join(tempfile.mkdtemp(), "adapters.safetensors")
    keras_gemma2.lora.save_adapters(backbone, path)
    ```
    """
    variables = adapter_variables(backbone)
    if not variables:
        raise ValueError(
            "This backbone has no LoRA adapters: call "
            "`keras_gemma2.lora.enable(backbone, rank)` and train first."
        )
    layer = backbone._lora_enabled_layers[0]
    metadata = {
        "format": _FORMAT,
        "rank": str(backbone._lora_rank),
        "alpha": json.dumps(layer.lora_alpha),
        "targets": json.dumps(list(backbone._lora_targets)),
        "dropout": json.dumps(getattr(backbone, "_lora_dropout", 0.0)),
        "architecture": json.dumps(_architecture(backbone)),
    }
    tensors = {
        name: np.ascontiguousarray(ops.convert_to_numpy(v))
        for name, v in variables.items()
    }
    path = os.path.abspath(os.fspath(path))
    with atomic.staged_file(path) as staging:
        atomic.save_safetensors(tensors, staging, metadata=metadata)
    return path


def load_adapters(backbone, path):
    """Loads adapters saved by `save_adapters` onto a backbone.

    Enables LoRA with the file's rank, alpha and targets if the backbone
    has none. Every name, shape and the architecture are checked before
    any weight is assigned: a mismatch raises and changes nothing. So is
    the file itself: a truncated or damaged one raises a
    `keras_gemma2.convert.damaged.DamagedFileError` (a ValueError) that
    names it, and changes nothing.

    Example:
    ```python
    import os, tempfile
    trained = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.enable(trained, rank=2)
    path = os.path.join(tempfile.mkdtemp(), "adapters.safetensors")
    keras_gemma2.lora.save_adapters(trained, path)
    base = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.load_adapters(base, path)
    ```
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter file at {path!r}.")
    path = os.fspath(path)
    tensors, metadata = _read_adapter_file(path)
    with damaged.reading(path, _WHAT, damaged.ADAPTER_FIX):
        saved = json.loads(metadata["architecture"])
        rank = int(metadata["rank"])
        alpha = json.loads(metadata["alpha"])
        saved_targets = json.loads(metadata["targets"])
        dropout = json.loads(metadata.get("dropout", "0.0"))
    _check_architecture(saved, _architecture(backbone))
    targets = _check_targets(saved_targets)
    enabled = bool(getattr(backbone, "_lora_enabled_layers", None))
    # Names and shapes are checked before LoRA is enabled or any weight
    # assigned, so that a bad file leaves the model as it was.
    expected = (
        {n: tuple(v.shape) for n, v in adapter_variables(backbone).items()}
        if enabled
        else _adapter_shapes(backbone, rank, targets)
    )
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"The adapters in {path!r} do not fit this model's LoRA layers: "
            f"missing {missing[:3]}, unexpected {extra[:3]}. Enable LoRA "
            "with the same rank and targets, or load onto a fresh model."
        )
    for name, shape in expected.items():
        if shape != tuple(tensors[name].shape):
            raise ValueError(
                f"{name}: shape {tuple(tensors[name].shape)} in the file, "
                f"{shape} in the model (rank {rank})."
            )
    if not enabled:
        enable(backbone, rank, alpha=alpha, targets=targets, dropout=dropout)
    for name, variable in adapter_variables(backbone).items():
        variable.assign(tensors[name])


def _read_adapter_file(path):
    """`(tensors, metadata)` of an adapter file, read whole: checked and in
    memory before anything is enabled or assigned, so a damaged file leaves
    the backbone as it was."""
    # safetensors: only adapter files need it (see convert.damaged)
    from safetensors import safe_open

    damaged.safetensors_header(path, _WHAT, damaged.ADAPTER_FIX)
    with damaged.reading(path, _WHAT, damaged.ADAPTER_FIX):
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{path!r} is not a keras_gemma2 LoRA adapter file (no "
            f"'{_FORMAT}' format tag)."
        )
    return tensors, metadata


def _check_architecture(saved, ours):
    differences = [
        f"{key} {saved.get(key)} (adapters) != {ours[key]} (model)"
        for key in _ARCHITECTURE_KEYS
        if saved.get(key) != ours[key]
    ]
    if differences:
        raise ValueError(
            "These adapters were trained on another architecture: "
            + "; ".join(differences)
            + ". Load them onto the base model they were trained from."
        )


def merge(backbone):
    """Folds the adapters into their kernels, for serving.

    Afterwards the forward pass does no LoRA work; `unmerge` restores the
    adapters (up to float rounding).

    Example:
    ```python
    backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.enable(backbone, rank=2)
    keras_gemma2.lora.merge(backbone)
    keras_gemma2.lora.unmerge(backbone)
    ```
    """
    layers = [
        layer
        for layer in getattr(backbone, "_lora_enabled_layers", [])
        if layer.lora_enabled
    ]
    if not layers:
        raise ValueError("No unmerged LoRA adapters to merge.")
    if any(layer.quantization_mode for layer in layers):
        raise ValueError(
            "The base weights are quantized: merging would round the "
            "adapters into int8 kernels. Generate with the adapters "
            "unmerged, or merge into a float model and quantize after."
        )
    for layer in layers:
        # Keras' `kernel` is base + (alpha / rank) * a @ b while enabled.
        layer._kernel.assign(layer.kernel)
        layer.lora_enabled = False
        layer._lora_merged = True


def unmerge(backbone):
    """Takes merged adapters back out of their kernels."""
    layers = [
        layer
        for layer in getattr(backbone, "_lora_enabled_layers", [])
        if _merged(layer)
    ]
    if not layers:
        raise ValueError("No merged LoRA adapters to unmerge.")
    for layer in layers:
        delta = ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
        scale = layer.lora_alpha / layer.lora_rank
        layer._kernel.assign(layer._kernel - scale * delta)
        layer.lora_enabled = True
        layer._lora_merged = False


def export_peft(backbone, path, overwrite=False, base_model_name_or_path=None):
    """Writes the adapters as a PEFT folder; see `convert.to_peft`."""
    return to_peft.export_peft(
        backbone,
        path,
        overwrite=overwrite,
        base_model_name_or_path=base_model_name_or_path,
    )


def _merged(layer):
    return getattr(layer, "_lora_merged", False)


def _architecture(backbone):
    return {key: getattr(backbone, key) for key in _ARCHITECTURE_KEYS}


def _target_layer(block, name):
    if name in ATTENTION_TARGETS:
        return getattr(block.attention, name)
    return getattr(block, name)


def check_rank(rank):
    """Refuses a LoRA rank that is not an int of at least 1."""
    if (
        isinstance(rank, bool)
        or not isinstance(rank, numbers.Integral)
        or rank < 1
    ):
        raise ValueError(
            f"`rank` must be an int of at least 1; got {rank!r}. Typical "
            "LoRA ranks are 4 to 64."
        )


def _check_targets(targets):
    if targets == "all":
        return ALL_TARGETS
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"Unknown LoRA targets {unknown}: choose among {ALL_TARGETS} or "
            "'all'."
        )
    return targets


def _adapter_shapes(backbone, rank, targets):
    """`{path: shape}` of the adapters `enable(backbone, rank, ...,
    targets)` would add (Keras: a is kernel[:-1] + (rank,), b is
    (rank, kernel[-1]))."""
    shapes = {}
    for block in backbone.transformer_layers:
        for name in targets:
            layer = _target_layer(block, name)
            kernel = tuple(layer.kernel.shape)
            shapes[f"{layer.path}/lora_kernel_a"] = kernel[:-1] + (rank,)
            shapes[f"{layer.path}/lora_kernel_b"] = (rank, kernel[-1])
    return shapes
