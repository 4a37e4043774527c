"""Gemma 2 grouped-query attention with RoPE, query scale and a soft cap.

Einsum legend: b batch, t query positions, s key positions, d model width,
n query heads, k key-value heads, g query heads per key-value head (n = k * g),
h head_dim.
"""

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding

# Finite, so that a fully masked row (a padded query) gives a uniform softmax
# instead of NaN.
_MASKED_SCORE = -1e30


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Attention(keras.layers.Layer):
    """Grouped-query self-attention of one Gemma 2 block.

    Queries are scaled by `query_pre_attn_scalar ** -0.5` (256 for 2B and 9B,
    144 for 27B, whose head_dim is 128), scores are soft-capped with
    `cap * tanh(scores / cap)` in float32 before masking, and the softmax is
    taken in float32.

    Args:
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads; must divide
            `num_query_heads`.
        head_dim: int. Width of each head.
        query_pre_attn_scalar: float. Queries are multiplied by its inverse
            square root.
        attention_logit_soft_cap: float or None. The attention soft cap
            (50 in Gemma 2); `None` disables it.
        rope_max_wavelength: float. RoPE base. Defaults to `10000`.
        dropout: float. Dropout on the attention probabilities.

    Example:
    ```python
    attention = keras_gemma2.layers.Gemma2Attention(
        num_query_heads=4, num_key_value_heads=2, head_dim=8,
        query_pre_attn_scalar=8, attention_logit_soft_cap=50.0,
    )
    x = np.random.rand(1, 5, 16).astype("float32")
    mask = np.tril(np.ones((1, 5, 5), bool))
    y, _ = attention(x, attention_mask=mask)
    ```
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_soft_cap=None,
        rope_max_wavelength=10000.0,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_head_counts(num_query_heads, num_key_value_heads)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.rope_max_wavelength = rope_max_wavelength
        self.dropout = dropout
        self.num_groups = num_query_heads // num_key_value_heads

        self.query = keras.layers.EinsumDense(
            "btd,ndh->btnh",
            output_shape=(None, num_query_heads, head_dim),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="query",
        )
        self.key = keras.layers.EinsumDense(
            "bsd,kdh->bskh",
            output_shape=(None, num_key_value_heads, head_dim),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="key",
        )
        self.value = keras.layers.EinsumDense(
            "bsd,kdh->bskh",
            output_shape=(None, num_key_value_heads, head_dim),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="value",
        )
        self.attention_output = keras.layers.EinsumDense(
            "btnh,nhd->btd",
            output_shape=(None, None),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="attention_output",
        )
        # keras_hub's RoPE rotates the first half of each head's features with
        # the second half: the layout of HF's `rotate_half` and of Gemma.
        self.rotary = RotaryEmbedding(
            max_wavelength=rope_max_wavelength,
            dtype=self.dtype_policy,
            name="rotary",
        )
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=self.dtype_policy, name="attention_dropout"
        )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.query.build(input_shape)
        self.key.build(input_shape)
        self.value.build(input_shape)
        # The output width is the input's, known only now.
        self.attention_output.partial_output_shape = (None, hidden_dim)
        self.attention_output.build(
            (None, None, self.num_query_heads, self.head_dim)
        )
        self.built = True

    def call(
        self,
        x,
        attention_mask,
        cache=None,
        cache_update_index=0,
        training=False,
    ):
        """Attends; returns `(output, cache)`.

        `cache` is `None` or `[batch, 2, cache_length, num_key_value_heads,
        head_dim]` (keys then values); the new keys and values are written at
        `cache_update_index` and the updated cache is returned.
        """
        start = 0 if cache is None else cache_update_index
        # [b, t, n, h]
        query = self.rotary(self.query(x), start_index=start)
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)
        # [b, t, k, h]
        key = self.rotary(self.key(x), start_index=start)
        value = self.value(x)
        if cache is not None:
            key_cache = ops.slice_update(
                cache[:, 0, ...], [0, cache_update_index, 0, 0], key
            )
            value_cache = ops.slice_update(
                cache[:, 1, ...], [0, cache_update_index, 0, 0], value
            )
            cache = ops.stack([key_cache, value_cache], axis=1)
            # [b, s, k, h]
            key, value = key_cache, value_cache

        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        # [b, t, k, g, h]
        query = ops.reshape(
            query,
            (batch, length, self.num_key_value_heads, self.num_groups, -1),
        )
        # [b, k, g, t, s]
        scores = ops.einsum("btkgh,bskh->bkgts", query, key)
        scores = ops.cast(scores, "float32")
        if self.attention_logit_soft_cap is not None:
            cap = self.attention_logit_soft_cap
            scores = ops.tanh(scores / cap) * cap
        # attention_mask: [b or 1, t, s] -> [b or 1, 1, 1, t, s]
        mask = ops.expand_dims(ops.expand_dims(attention_mask, 1), 1)
        scores = ops.where(mask, scores, _MASKED_SCORE)
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        probs = self.dropout_layer(probs, training=training)
        # [b, t, k, g, h] -> [b, t, n, h]
        out = ops.einsum("bkgts,bskh->btkgh", probs, value)
        out = ops.reshape(
            out, (batch, length, self.num_query_heads, self.head_dim)
        )
        return self.attention_output(out), cache

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "rope_max_wavelength": self.rope_max_wavelength,
                "dropout": self.dropout,
            }
        )
        return config


def check_head_counts(num_query_heads, num_key_value_heads):
    """Raises a ValueError naming valid values unless GQA can group heads."""
    if num_key_value_heads >= 1 and num_query_heads % num_key_value_heads == 0:
        return
    divisors = [
        d for d in range(1, num_query_heads + 1) if num_query_heads % d == 0
    ]
    raise ValueError(
        f"`num_query_heads` ({num_query_heads}) must be divisible by "
        f"`num_key_value_heads` ({num_key_value_heads}): in grouped-query "
        "attention each key/value head serves the same number of query "
        f"heads. Valid num_key_value_heads: {divisors}."
    )
