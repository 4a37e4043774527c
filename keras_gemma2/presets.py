"""The preset registry: name -> metadata and handle, and name resolution."""

import contextvars
import difflib
import json
import os
import pathlib

from keras_hub.models import Backbone
from keras_hub.models import CausalLM

from keras_gemma2 import atomic
from keras_gemma2 import quantization
from keras_gemma2.convert import damaged
from keras_gemma2.convert import loader

_KAGGLE = "kaggle://keras/gemma2/keras"

# The folder that holds `gemma2_tiny_en`: package data, so that a wheel
# install (`pip install .`, `pip install git+URL`) carries it.
# `KERAS_GEMMA2_PRESETS_DIR` overrides it for installs that keep the presets
# elsewhere.
PRESETS_DIR = pathlib.Path(
    os.environ.get(
        "KERAS_GEMMA2_PRESETS_DIR",
        pathlib.Path(__file__).resolve().parent / "bundled_presets",
    )
)


def _entry(description, params, handle, default_dtype="bfloat16"):
    return {
        "metadata": {
            "description": description,
            "params": params,
            "path": "gemma2",
        },
        "kaggle_handle": handle,
        "default_dtype": default_dtype,
    }


PRESETS = {
    "gemma2_2b_en": _entry(
        "2 billion parameter, 26-layer, base Gemma 2 model.",
        2_614_341_888,
        f"{_KAGGLE}/gemma2_2b_en/2",
    ),
    "gemma2_instruct_2b_en": _entry(
        "2 billion parameter, 26-layer, instruction-tuned Gemma 2 model.",
        2_614_341_888,
        f"{_KAGGLE}/gemma2_instruct_2b_en/2",
    ),
    "gemma2_9b_en": _entry(
        "9 billion parameter, 42-layer, base Gemma 2 model.",
        9_241_705_984,
        f"{_KAGGLE}/gemma2_9b_en/4",
    ),
    "gemma2_instruct_9b_en": _entry(
        "9 billion parameter, 42-layer, instruction-tuned Gemma 2 model.",
        9_241_705_984,
        f"{_KAGGLE}/gemma2_instruct_9b_en/4",
    ),
    "gemma2_27b_en": _entry(
        "27 billion parameter, 46-layer, base Gemma 2 model.",
        27_227_128_320,
        f"{_KAGGLE}/gemma2_27b_en/3",
    ),
    "gemma2_instruct_27b_en": _entry(
        "27 billion parameter, 46-layer, instruction-tuned Gemma 2 model.",
        27_227_128_320,
        f"{_KAGGLE}/gemma2_instruct_27b_en/3",
    ),
    "gemma2_tiny_en": _entry(
        "Tiny 6-layer Gemma 2 architecture trained on Python's own English "
        "documentation; ships with keras_gemma2 and loads offline.",
        None,  # filled in from the shipped folder's metadata.json
        str(PRESETS_DIR / "gemma2_tiny_en"),
        default_dtype=None,
    ),
}


# The folder an outer `save_to_preset` call is staging, if any (a task
# saves its backbone and preprocessor through the same method).
_SAVING = contextvars.ContextVar("keras_gemma2_saving", default=None)


class classproperty(property):
    """A read-only property of the class (KerasHub's `presets` is one)."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)


class RegisteredPresetsMixin:
    """Our registry in `presets`, any format in `from_preset`, atomic saves.

    Put it before the KerasHub base class: `class X(RegisteredPresetsMixin,
    Backbone)`. Classes without weights set `_preset_takes_dtype = False`.
    """

    _preset_takes_dtype = True

    @classproperty
    def presets(cls):
        """The registered presets: name -> metadata and handle."""
        return registered_presets()

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Loads a registered preset name or a preset folder.

        `preset` may be a registered name (`cls.presets`), a folder saved by
        this package, a KerasHub Gemma 2 preset (folder or `kaggle://`
        handle) or a Hugging Face Gemma 2 checkpoint (folder with
        `config.json`, safetensors and `tokenizer.model`, or an `hf://`
        handle). Other formats are converted tensor by tensor into the new
        model; every key and shape is checked first, so a bad checkpoint
        raises before anything loads. Pickled weights are refused, and a
        damaged file (truncated, or not its format) raises a
        `keras_gemma2.convert.damaged.DamagedFileError` (a ValueError) that
        names the file and the fix.
        Registered Gemma 2 checkpoints load in bfloat16 unless `dtype=` says
        otherwise; a folder loads in the dtype it was saved in. An unknown
        name raises a ValueError that lists the close matches.

        Args:
            preset: string. A name in `cls.presets`, a folder or a handle.
            quantize: optional `"int8"`, `"int4"` or a Keras
                `QuantizationConfig` (e.g. weight-only int8 for inference on
                PyTorch, see `Gemma2Backbone.quantize`): quantize the
                matrices and the embedding while loading. From a KerasHub
                or Hugging Face checkpoint each matrix is quantized as soon
                as it is read, so peak memory is the quantized model plus
                one float matrix (the 9B in int8: 12.2 GB); a preset of
                ours loads whole, then is quantized.
            progress: optional callable, called as `progress(done, total)`
                after each tensor converted from a KerasHub or Hugging Face
                checkpoint (the CLI's `convert` draws its progress bar with
                it); a preset of ours loads at once, without calls.
            **kwargs: forwarded to KerasHub's `from_preset`, e.g. `dtype`,
                `load_weights`.

        Example:
        ```python
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        backbone = keras_gemma2.Gemma2Backbone.from_preset(
            "gemma2_tiny_en", dtype="bfloat16"
        )
        tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
        ```
        """
        preset, kwargs = resolve(preset, kwargs)
        progress = kwargs.pop("progress", None)
        quantize = kwargs.get("quantize")
        if quantize is not None:
            _check_quantize(cls, quantize)
        converted = loader.load_foreign(cls, preset, kwargs, progress=progress)
        if converted is not None:
            return converted
        kwargs.pop("quantize", None)
        if quantize is not None:
            model = cls.from_preset(preset, **kwargs)
            if isinstance(quantize, str):
                model.quantize(quantize)
            else:
                model.quantize(config=quantize)
            return model
        if not cls._preset_takes_dtype:
            kwargs.pop("dtype", None)
        if "://" in preset:
            return super().from_preset(preset, **kwargs)
        # `load_foreign` checked every file first; an h5 whose length is
        # right but whose bytes are not still fails inside KerasHub.
        with damaged.reading(
            preset,
            "a keras_gemma2 preset folder",
            damaged.PRESET_FIX,
            errors=(OSError,),
        ):
            return super().from_preset(preset, **kwargs)

    def save_to_preset(self, preset_dir, **kwargs):
        """Saves a preset folder atomically.

        The preset is written to a temporary sibling folder and renamed into
        place, so an interrupted save never leaves a half-written preset and
        an existing preset at `preset_dir` is replaced whole. A non-empty
        folder that is not a preset is refused rather than overwritten.

        Example:
        ```python
        import tempfile
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        lm.save_to_preset(tempfile.mkdtemp() + "/my_preset")
        ```
        """
        if _SAVING.get() is not None:
            # A task saves its backbone and preprocessor into its own
            # staging folder: only the outermost save stages and renames.
            return super().save_to_preset(preset_dir, **kwargs)
        preset_dir = os.path.abspath(preset_dir)
        backbone = getattr(self, "backbone", self)
        if any(
            getattr(layer, "_lora_merged", False)
            for layer in getattr(backbone, "_lora_enabled_layers", [])
        ):
            raise ValueError(
                "LoRA adapters are merged into this model's kernels; a "
                "preset saved now would add them twice on load. Call "
                "`keras_gemma2.lora.unmerge(backbone)` before saving (or "
                "save the adapters with `keras_gemma2.lora.save_adapters`)."
            )
        check_preset_target(preset_dir)
        token = _SAVING.set(preset_dir)
        try:
            with atomic.staged_folder(preset_dir, "saving") as staging:
                super().save_to_preset(staging, **kwargs)
        finally:
            _SAVING.reset(token)


def check_preset_target(path):
    """Refuses to replace a file, or a non-empty folder that is not a
    preset."""
    atomic.check_target(
        path,
        fix="it is not a preset; choose a new folder so that nothing in it "
        "is lost",
        replaceable=lambda p: os.path.exists(os.path.join(p, "config.json")),
    )


def registered_presets():
    """A copy of the registry, with the tiny preset's parameter count."""
    presets = {name: dict(entry) for name, entry in PRESETS.items()}
    tiny = presets["gemma2_tiny_en"]
    metadata_path = pathlib.Path(tiny["kaggle_handle"]) / "metadata.json"
    if metadata_path.exists():
        params = json.loads(metadata_path.read_text()).get("parameter_count")
        tiny["metadata"] = {**tiny["metadata"], "params": params}
    return presets


def _check_quantize(cls, mode):
    if not issubclass(cls, (Backbone, CausalLM)):
        raise ValueError(
            f"`quantize` applies to models, not to {cls.__name__}: pass it "
            "to Gemma2CausalLM.from_preset or Gemma2Backbone.from_preset."
        )
    quantization.check_quantization_mode(mode)


def resolve(preset, kwargs):
    """Maps a preset name to its handle and applies its default dtype.

    Returns `(handle, kwargs)`. Paths and `scheme://` handles pass through;
    an unknown name raises a ValueError that lists the close matches.
    """
    if isinstance(preset, pathlib.Path):
        preset = str(preset)
    if not isinstance(preset, str):
        raise TypeError(
            "`preset` must be a preset name (see `Gemma2CausalLM.presets`) or "
            f"a path to a preset folder; got {type(preset).__name__}."
        )
    if preset in PRESETS:
        entry = PRESETS[preset]
        if entry["default_dtype"] and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": entry["default_dtype"]}
        handle = entry["kaggle_handle"]
        if "://" not in handle and not os.path.isdir(handle):
            raise FileNotFoundError(
                f"The bundled preset `{preset}` is not at {handle}. "
                + (
                    "Unset KERAS_GEMMA2_PRESETS_DIR, or point it at the "
                    "folder that holds it."
                    if "KERAS_GEMMA2_PRESETS_DIR" in os.environ
                    else "Reinstall keras_gemma2 (the wheel carries it), or "
                    "set KERAS_GEMMA2_PRESETS_DIR to the folder that holds it."
                )
            )
        return handle, kwargs
    if "://" in preset or os.path.exists(preset):
        return preset, kwargs
    close = difflib.get_close_matches(preset, list(PRESETS), n=3, cutoff=0.5)
    hint = (
        f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    )
    raise ValueError(
        f"Unknown preset {preset!r}: it is neither a registered name nor an "
        f"existing folder.{hint} Registered presets: {', '.join(PRESETS)}."
    )
