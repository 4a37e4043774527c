"""Gemma2DecoderBlock: four RMSNorms around attention and a GeGLU FFN."""

import keras
from keras import ops

from keras_gemma2.layers import direct
from keras_gemma2.layers.attention import Gemma2Attention
from keras_gemma2.layers.einsum_dense import Gemma2EinsumDense
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2DecoderBlock(keras.layers.Layer):
    """One Gemma 2 transformer block.

    ```
    x = x + post_attention_norm(attention(pre_attention_norm(x)))
    x = x + post_ffw_norm(ffw_linear(gelu(ffw_gating(h)) * ffw_gating_2(h)))
        where h = pre_ffw_norm(x)
    ```

    Args:
        hidden_dim: int. Model width.
        intermediate_dim: int. FFN width of each gate (HF's
            `intermediate_size`; KerasHub's `intermediate_dim` is twice this).
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads.
        head_dim: int. Width of each attention head.
        query_pre_attn_scalar: float. Queries are scaled by its inverse
            square root.
        attention_type: `"local"` (sliding window) or `"global"`.
        sliding_window_size: int. Window of a local block.
        attention_logit_soft_cap: float or None. Attention soft cap.
        use_post_attention_norm: bool. Apply the post-attention RMSNorm.
        use_post_ffw_norm: bool. Apply the post-FFN RMSNorm.
        layer_norm_epsilon: float. RMSNorm epsilon.
        rope_max_wavelength: float. RoPE base.
        dropout: float. Dropout rate.

    Example:
    ```python
    block = keras_gemma2.layers.Gemma2DecoderBlock(
        hidden_dim=16, intermediate_dim=32, num_query_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        attention_type="local", sliding_window_size=3,
    )
    y = block(np.random.rand(2, 5, 16).astype("float32"))
    ```
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_type="global",
        sliding_window_size=4096,
        attention_logit_soft_cap=None,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000.0,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attention_type not in ("local", "global"):
            raise ValueError(
                "`attention_type` must be 'local' or 'global'. "
                f"Received: attention_type={attention_type!r}"
            )
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_type = attention_type
        self.sliding_window_size = sliding_window_size
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.dropout = dropout

        def norm(name):
            return Gemma2RMSNormalization(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        def dense(equation, output_shape, name):
            return Gemma2EinsumDense(
                equation,
                output_shape=output_shape,
                kernel_initializer="glorot_uniform",
                dtype=self.dtype_policy,
                name=name,
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = Gemma2Attention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attention_logit_soft_cap=attention_logit_soft_cap,
            rope_max_wavelength=rope_max_wavelength,
            dropout=dropout,
            sliding_window_size=(
                sliding_window_size if attention_type == "local" else None
            ),
            dtype=self.dtype_policy,
            name="attention",
        )
        self.post_attention_norm = (
            norm("post_attention_norm") if use_post_attention_norm else None
        )
        self.pre_ffw_norm = norm("pre_ffw_norm")
        self.ffw_gating = dense(
            "btd,df->btf", (None, intermediate_dim), "ffw_gating"
        )
        self.ffw_gating_2 = dense(
            "btd,df->btf", (None, intermediate_dim), "ffw_gating_2"
        )
        self.ffw_linear = dense("btf,fd->btd", (None, hidden_dim), "ffw_linear")
        self.post_ffw_norm = (
            norm("post_ffw_norm") if use_post_ffw_norm else None
        )
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=self.dtype_policy, name="residual_dropout"
        )

    @property
    def window_size(self):
        """The sliding window of a local block, `None` for a global one.

        The attention layer holds it; `attention_type` and
        `sliding_window_size` are only the constructor's (and config's)
        way to say it."""
        return self.attention.sliding_window_size

    def build(self, input_shape):
        ffw_shape = tuple(input_shape[:-1]) + (self.intermediate_dim,)
        for layer in (self.pre_attention_norm, self.pre_ffw_norm):
            layer.build(input_shape)
        for layer in (self.post_attention_norm, self.post_ffw_norm):
            if layer is not None:
                layer.build(input_shape)
        self.attention.build(input_shape)
        self.ffw_gating.build(input_shape)
        self.ffw_gating_2.build(input_shape)
        self.ffw_linear.build(ffw_shape)
        self.built = True

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        valid_length=None,
        extend=False,
        training=False,
    ):
        """Runs the block; returns `x`, or `(x, cache)` with a cache.

        Args:
            x: `[batch, length, hidden_dim]`.
            padding_mask: optional `[batch, length]` mask of real tokens.
            cache: optional `(keys, values)` ring of this layer (see
                `Gemma2Attention`). With one token, `x` is the token at
                `cache_update_index` (a decode step); with several, `x` holds
                positions `0 ...` (a prefill) and a new cache is returned.
            cache_update_index: int or int tensor. Position of a decode step.
            valid_length: int or int tensor. Leading prefill positions to
                keep in the cache; defaults to all.
            extend: bool. Several tokens continue the cache from
                `cache_update_index` (see `Gemma2Attention`).
        """
        x = ops.cast(x, self.compute_dtype)
        h = direct.call(self.pre_attention_norm, x)
        h, cache = direct.call(
            self.attention,
            h,
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            valid_length=valid_length,
            extend=extend,
            training=training,
        )
        if self.post_attention_norm is not None:
            h = direct.call(self.post_attention_norm, h)
        x = x + direct.call(self.dropout_layer, h, training=training)

        h = direct.call(self.pre_ffw_norm, x)
        # GeGLU with the tanh approximation of GeLU, as Gemma was trained.
        gate = keras.activations.gelu(
            direct.call(self.ffw_gating, h), approximate=True
        )
        h = direct.call(
            self.ffw_linear, gate * direct.call(self.ffw_gating_2, h)
        )
        if self.post_ffw_norm is not None:
            h = direct.call(self.post_ffw_norm, h)
        x = x + direct.call(self.dropout_layer, h, training=training)
        if cache is None:
            return x
        return x, cache

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "attention_type": self.attention_type,
                "sliding_window_size": self.sliding_window_size,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "use_post_attention_norm": self.use_post_attention_norm,
                "use_post_ffw_norm": self.use_post_ffw_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "dropout": self.dropout,
            }
        )
        return config
