"""What `quantize` accepts and touches: the modes, the quantizable layers.

Shared by `Gemma2Backbone.quantize`, the `quantize=` argument of
`from_preset` and quantizing while loading (`convert.loader`).
"""

import re

import keras

from keras_gemma2.layers.embedding import Gemma2Embedding

QUANTIZATION_MODES = ("int8", "int4")


def quantizable(layer, filters=None):
    """Whether `Gemma2Backbone.quantize` quantizes `layer`: the `EinsumDense`
    matrices and the embedding, narrowed by Keras-style `filters`."""
    if not isinstance(layer, (keras.layers.EinsumDense, Gemma2Embedding)):
        return False
    if filters is None:
        return True
    if callable(filters):
        return filters(layer)
    patterns = [filters] if isinstance(filters, str) else filters
    return any(re.search(p, layer.path) for p in patterns)


def check_quantization_mode(mode):
    """Raises a ValueError naming the modes unless `mode` is one, or a
    Keras `QuantizationConfig` of one."""
    if isinstance(mode, keras.quantizers.QuantizationConfig):
        mode = mode.mode
    if mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"`quantize` must be one of {QUANTIZATION_MODES} or a Keras "
            f"QuantizationConfig of one. Received: quantize={mode!r}"
        )
