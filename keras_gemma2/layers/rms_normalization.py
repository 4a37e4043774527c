"""Gemma's RMSNorm: float32 statistics and a `(1 + scale)` gain."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2RMSNormalization(keras.layers.Layer):
    """Root-mean-square normalization as Gemma 2 defines it.

    `y = x * rsqrt(mean(x ** 2) + epsilon) * (1 + scale)`, where `scale` starts
    at zero. The statistics and the gain are computed in float32 and the result
    is cast back to the compute dtype only at the end: HF's `Gemma2RMSNorm`
    does the same ("Llama does x.to(float16) * w whilst Gemma is
    (x * w).to(float16)", huggingface/transformers#29402).

    Args:
        epsilon: float. Added to the mean square. Defaults to `1e-6`.

    Example:
    ```python
    norm = keras_gemma2.layers.Gemma2RMSNormalization()
    y = norm(np.ones((2, 3, 8), "float32"))
    ```
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            trainable=True,
            shape=(input_shape[-1],),
            initializer="zeros",
        )
        self.built = True

    def call(self, x):
        x_float = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x_float), axis=-1, keepdims=True)
        normed = x_float * ops.rsqrt(mean_square + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
