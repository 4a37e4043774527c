"""Gemma2Embedding: the tied token embedding, scaled by sqrt(hidden_dim)."""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding

from keras_gemma2.layers.einsum_dense import DeletesWithoutCollecting
from keras_gemma2.layers.einsum_dense import int8_matmul


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Embedding(DeletesWithoutCollecting, ReversibleEmbedding):
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

    # `layers.direct` runs the tied logits as one `F.linear` on PyTorch.
    _keras_gemma2_is_embedding = True

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
        if not reverse:
            return self._scale(super().quantized_call(inputs))
        if self.quantization_mode != "int8":
            return super().quantized_call(inputs, reverse=True)
        return self._int8_logits(inputs)

    def _int8_logits(self, inputs):
        """Keras' int8 reverse pass, with a gradient for the hidden states.

        Keras rounds the hidden states to int8 before the logits matmul and
        gives that rounding no gradient, so nothing reaches the layers
        below: LoRA on an int8 model did not train (loss flat, measured by
        `benchmarks/finetune_memory.py`). The forward pass here is Keras'
        own; the backward pass is the straight-through gradient through
        the soft cap and the dequantized table, as Keras' int8
        `EinsumDense` does for its inputs.
        """
        cap = self.logit_soft_cap
        forward = self._int8_reverse

        @ops.custom_gradient
        def logits_with_gradient(x, table, scale):
            logits = forward(x)

            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                if cap is not None:
                    # d/dz of cap * tanh(z / cap) = 1 - (logits / cap)^2.
                    upstream = upstream * (1 - ops.square(logits / cap))
                # The float table is int8 / scale, one scale per token.
                upstream = upstream / ops.cast(scale, upstream.dtype)
                x_grad = ops.matmul(upstream, ops.cast(table, upstream.dtype))
                return (x_grad, None, None)

            return logits, grad_fn

        return logits_with_gradient(
            inputs,
            ops.convert_to_tensor(self._embeddings),
            ops.convert_to_tensor(self.embeddings_scale),
        )

    def _int8_reverse(self, inputs):
        """Keras' int8 reverse pass; on PyTorch its int8 matmul runs through
        `torch._int_mm` (see `layers.einsum_dense`: Keras casts both to
        int32 there, which has no CPU kernel), with the same int32 sums."""
        if not (
            keras.config.backend() == "torch"
            and self.tie_weights
            and self.inputs_quantizer
        ):
            return super().quantized_call(inputs, reverse=True)
        quantized, inputs_scale = self.inputs_quantizer(inputs)
        logits = int8_matmul(
            ops.reshape(quantized, (-1, self.output_dim)), self._embeddings
        )
        logits = ops.reshape(logits, (*ops.shape(inputs)[:-1], self.input_dim))
        logits = ops.cast(logits, self.compute_dtype)
        logits = ops.divide(
            logits,
            ops.multiply(inputs_scale, ops.transpose(self.embeddings_scale)),
        )
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def _scale(self, x):
        return x * ops.cast(ops.sqrt(float(self.output_dim)), x.dtype)
