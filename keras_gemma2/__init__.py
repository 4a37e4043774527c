"""keras_gemma2: Gemma 2 in Keras 3 on TensorFlow, JAX and PyTorch.

The public names load on first use (PEP 562), so `import keras_gemma2`, the
command line's `--help` and `keras-gemma2 rag index` on an up-to-date
database import neither Keras nor a backend. The first model name used
(`keras_gemma2.Gemma2CausalLM`, say) imports all the model classes at once,
so every Keras serializable of the package is registered from then on.
"""

import importlib

__version__ = "0.1.0"

# Submodules reachable as attributes: `keras_gemma2.lora`, ...
_SUBMODULES = (
    "architectures",
    "callbacks",
    "data",
    "generation",
    "layers",
    "lora",
    "merging",
    "presets",
    "rag",
    "sampling",
    "structured",
)
# Public name -> the module that defines it.
_NAMES = {
    "Gemma2Backbone": "keras_gemma2.backbone",
    "Gemma2CausalLM": "keras_gemma2.causal_lm",
    "Gemma2CausalLMPreprocessor": "keras_gemma2.causal_lm_preprocessor",
    "ChatSession": "keras_gemma2.chat",
    "format_chat": "keras_gemma2.chat",
    "Gemma2Distiller": "keras_gemma2.distillation",
    "Gemma2Attention": "keras_gemma2.layers.attention",
    "Gemma2DecoderBlock": "keras_gemma2.layers.decoder_block",
    "Gemma2RMSNormalization": "keras_gemma2.layers.rms_normalization",
    "Gemma2Tokenizer": "keras_gemma2.tokenizer",
    "DamagedFileError": "keras_gemma2.convert.damaged",
}
# Modules that register Keras serializables: imported together on first use
# of any model name, so that a saved config naming one of them loads.
_MODELS = (
    "keras_gemma2.causal_lm",
    "keras_gemma2.distillation",
)

__all__ = [*_SUBMODULES, *_NAMES, "__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_gemma2.{name}")
    if name in _NAMES:
        for module in _MODELS:
            importlib.import_module(module)
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'keras_gemma2' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
