"""Gemma2Embedding: the tied token embedding, scaled by sqrt(hidden_dim)."""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Embedding(ReversibleEmbedding):
    """KerasHub's `ReversibleEmbedding` with Gemma's input scale.

    Forward: `embeddings[ids] * sqrt(output_dim)`, the normalizer cast to the
    compute dtype before the multiply as in the reference (in bfloat16
    sqrt(3584) = 59.87 becomes 60.0). Reverse: hidden states times the
    transposed table, soft-capped by `logit_soft_cap`.

    The scale lives in the layer rather than in the backbone's functional
    graph: Keras 3.15 marks a symbolic multiply by a constant as sparse
    (`ops.Multiply.compute_output_spec`), which breaks re-tracing the blocks.

    Example:
    ```python
    embedding = keras_gemma2.layers.Gemma2Embedding(64, 16, logit_soft_cap=30.0)
    x = embedding(np.array([[2, 5, 7]]))
    logits = embedding(x, reverse=True)
    ```
    """

    def call(self, inputs, reverse=False):
        if reverse:
            return super().call(inputs, reverse=True)
        return self._scale(super().call(inputs))

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses (`type(self) is not ReversibleEmbedding`)
        # because their `call` may differ; ours only adds the input scale,
        # which `quantized_call` applies too.
        super().quantize(mode, type_check=False, config=config)

    def quantized_call(self, inputs, reverse=False):
        x = super().quantized_call(inputs, reverse=reverse)
        return x if reverse else self._scale(x)

    def _scale(self, x):
        return x * ops.cast(ops.sqrt(float(self.output_dim)), x.dtype)
