"""`from_preset` for presets in other formats: KerasHub and Hugging Face."""

import collections
import gc

import keras
import numpy as np
from keras_hub.models import Backbone
from keras_hub.models import CausalLM
from keras_hub.models import Preprocessor
from keras_hub.tokenizers import Tokenizer

from keras_gemma2 import architectures
from keras_gemma2 import deferred
from keras_gemma2 import quantization
from keras_gemma2.convert import damaged
from keras_gemma2.convert import from_huggingface
from keras_gemma2.convert import from_keras_hub
from keras_gemma2.convert.files import PresetFiles
from keras_gemma2.layers import direct

OURS, HUGGING_FACE, KERAS_HUB = "keras_gemma2", "huggingface", "keras_hub"
# Float bytes dropped by quantizing while loading between two collections.
_COLLECT_EVERY = 2**28


def detect_format(files):
    """`(format, config)` of a preset, from its `config.json`."""
    if not files.exists("config.json"):
        refusal = from_huggingface.pickled_weights_error(files)
        if refusal is not None:
            raise refusal
        raise ValueError(
            f"{files.preset} has no config.json, so it is neither a Keras "
            "preset nor a Hugging Face checkpoint."
        )
    config = files.json("config.json", fix=damaged.COPY_FIX)
    registered = config.get("registered_name")
    if registered == from_keras_hub.KERAS_HUB_BACKBONE:
        return KERAS_HUB, config
    if registered:
        if registered.startswith("keras_gemma2>"):
            return OURS, config
        raise ValueError(
            f"{files.preset}/config.json describes a {registered}, not a "
            "Gemma 2 model."
        )
    if "model_type" in config:
        return HUGGING_FACE, config
    raise ValueError(
        f"{files.preset}/config.json is neither a Keras preset config "
        "(`registered_name`) nor a Hugging Face config (`model_type`)."
    )


def load_foreign(cls, preset, kwargs, progress=None):
    """Loads `cls` from a KerasHub or HF preset; `None` for our own format.

    The models are built through `cls` and the classes it names
    (`backbone_cls`, `preprocessor_cls`, `tokenizer_cls`), so this module
    imports none of them. `progress`, if given, is called as
    `progress(done, total)` after each tensor (the CLI draws a progress bar
    with it).
    """
    files = PresetFiles(preset)
    fmt, config = detect_format(files)
    kwargs = dict(kwargs)
    if fmt == OURS:
        weighted = issubclass(cls, (Backbone, CausalLM))
        check_own_preset(files, weighted and kwargs.get("load_weights", True))
        return None
    dtype = kwargs.pop("dtype", None)
    load_weights = kwargs.pop("load_weights", True)
    quantize = kwargs.pop("quantize", None)
    if issubclass(cls, Backbone):
        return load_backbone(
            cls, files, fmt, config, dtype, load_weights, progress, quantize
        )
    if issubclass(cls, Tokenizer):
        return load_tokenizer(cls, files, fmt)
    if issubclass(cls, Preprocessor):
        return load_preprocessor(cls, files, fmt, **kwargs)
    if issubclass(cls, CausalLM):
        backbone = load_backbone(
            cls.backbone_cls,
            files,
            fmt,
            config,
            dtype,
            load_weights,
            progress,
            quantize,
        )
        if "preprocessor" in kwargs:
            preprocessor = kwargs.pop("preprocessor")
        else:
            preprocessor = load_preprocessor(cls.preprocessor_cls, files, fmt)
        return cls(backbone=backbone, preprocessor=preprocessor, **kwargs)
    raise TypeError(f"{cls.__name__} cannot be loaded from a {fmt} preset.")


# The JSON files KerasHub's `from_preset` reads from a preset of ours.
_OWN_JSON = (
    "config.json",
    "metadata.json",
    "tokenizer.json",
    "preprocessor.json",
    "task.json",
)


def check_own_preset(files, weights=True):
    """Refuses a preset of ours with a damaged file, before KerasHub reads
    it (and before any model is built).

    Every JSON file must parse and `config.json` must hold a `config`; with
    `weights`, every `*.weights.h5` must open (HDF5 checks its length).
    Network handles check `config.json` and `model.weights.h5` only, the
    files KerasHub downloads anyway.
    """
    for name in _OWN_JSON if files.is_local else ("config.json",):
        if files.exists(name):
            config = files.json(name, fix=damaged.PRESET_FIX)
            if name == "config.json" and not isinstance(
                config.get("config"), dict
            ):
                raise damaged.DamagedFileError(
                    files.path(name),
                    "lacks config (the backbone's arguments), which a "
                    "Keras preset config.json has",
                    damaged.PRESET_FIX,
                )
    if not weights:
        return
    weight_files = [n for n in files.listdir() if n.endswith(".weights.h5")]
    for name in weight_files or ["model.weights.h5"]:
        if files.exists(name):
            damaged.open_h5(
                files.path(name), "a Keras weights file", damaged.PRESET_FIX
            ).close()


def load_backbone(
    backbone_cls,
    files,
    fmt,
    config,
    dtype=None,
    load_weights=True,
    progress=None,
    quantize=None,
):
    """A `backbone_cls` (`Gemma2Backbone`) with the preset's weights, checked
    before loading.

    Tensors go one at a time from the files into the model's variables, so
    peak memory stays near the size of the finished model. With `quantize`
    (`"int8"`, `"int4"`), each matrix is quantized as soon as it is filled:
    peak memory is the quantized model plus one float matrix.
    """
    if fmt == HUGGING_FACE:
        kwargs, specs, source = from_huggingface.plan(files, config)
        read = from_huggingface.read_weight
        dtype = dtype or from_huggingface.checkpoint_dtype(config)
    else:
        kwargs, specs, source = from_keras_hub.plan(files, config)
        read = from_keras_hub.read_weight
        dtype = dtype or _keras_dtype_name(config["config"].get("dtype"))
    try:
        # Built with deferred variables, each filled straight from the file:
        # no random initialisation is allocated beside the loaded weights.
        with deferred.deferred_variables() as created:
            backbone = backbone_cls(**kwargs, dtype=dtype)
        by_path = {spec.path: spec for spec in specs}
        missing = {v.path for v in backbone.weights} - set(by_path)
        assert not missing, f"no source for {sorted(missing)}"
        dims = architectures.axis_sizes(kwargs)
        to_quantize = _layers_by_float_variable(backbone) if quantize else {}
        # Taken off the list as they are filled: a quantized layer's float
        # variable is then freed at once, not when loading ends.
        total = len(created)
        uncollected = 0
        pending = collections.deque(created)
        del created[:]
        done = 0
        while pending:
            variable = pending.popleft()
            done += 1
            spec = by_path.get(variable.path) if load_weights else None
            value = None
            if spec is not None:
                # float32 numpy: every backend casts it into the variable's
                # dtype (torch cannot take ml_dtypes' bfloat16 arrays); a
                # float32 tensor is memory-mapped, not copied.
                value = np.asarray(read(spec, source, dims), dtype="float32")
            deferred.initialize(variable, value)
            del value
            layer = to_quantize.pop(id(variable), None)
            if layer is not None:
                # A reference cycle holds each dropped float matrix until a
                # `gc.collect()`. Keras runs one per layer (seconds each in
                # a big process; our layers skip it); here one runs per 256
                # MiB dropped, which bounds memory at a few collections.
                uncollected += int(np.prod(variable.shape)) * 4
                _quantize_layer(layer, quantize)
                if uncollected >= _COLLECT_EVERY:
                    gc.collect()
                    uncollected = 0
            if progress is not None:
                progress(done, total)
    finally:
        if hasattr(source, "close"):
            source.close()
    direct.torch_kernel_layout(backbone)
    if quantize:
        direct.drop_torch_params(backbone._flatten_layers(include_self=True))
        gc.collect()
    return backbone


def _layers_by_float_variable(backbone):
    """`{id(variable): layer}`: the one float variable of each quantizable
    layer, which is quantized as soon as that variable is filled."""
    found = {}
    for layer in backbone._flatten_layers():
        if quantization.quantizable(layer):
            (variable,) = layer.weights
            found[id(variable)] = layer
    return found


def _quantize_layer(layer, quantize):
    if isinstance(quantize, str):
        layer.quantize(quantize)
    else:  # a keras.quantizers.QuantizationConfig
        layer.quantize(quantize.mode, config=quantize)
    direct.drop_torch_params([layer])


_TOKENIZER_FILES = {
    OURS: "tokenizer.json",
    HUGGING_FACE: "tokenizer.model",
    KERAS_HUB: "assets/tokenizer/vocabulary.spm",
}


def has_tokenizer(preset):
    """Whether a preset of any format carries a tokenizer."""
    files = PresetFiles(preset)
    fmt, _ = detect_format(files)
    return files.exists(_TOKENIZER_FILES[fmt])


def load_tokenizer(tokenizer_cls, files, fmt):
    """A `tokenizer_cls` (`Gemma2Tokenizer`) on the preset's vocabulary."""
    name = _TOKENIZER_FILES[fmt]
    if not files.exists(name):
        raise FileNotFoundError(
            f"{files.preset} has no {name}, so its tokenizer cannot be "
            "loaded. Pass `preprocessor=None` to load the model alone."
        )
    return tokenizer_cls(proto=files.path(name))


def load_preprocessor(preprocessor_cls, files, fmt, sequence_length=None):
    """A `preprocessor_cls` (`Gemma2CausalLMPreprocessor`) around its
    `tokenizer_cls` on the preset's vocabulary."""
    if sequence_length is None and fmt == KERAS_HUB:
        if files.exists("preprocessor.json"):
            config = files.json("preprocessor.json").get("config", {})
            sequence_length = config.get("sequence_length")
    tokenizer = load_tokenizer(preprocessor_cls.tokenizer_cls, files, fmt)
    return preprocessor_cls(tokenizer, sequence_length=sequence_length or 1024)


def _keras_dtype_name(dtype):
    """The variable dtype of a serialized Keras dtype policy, or None."""
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name")
    if dtype is None:
        return None
    return keras.DTypePolicy(dtype).variable_dtype
