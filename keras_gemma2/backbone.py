"""Gemma2Backbone: token embedding -> decoder blocks -> final RMSNorm."""

import gc
import os

import keras
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras_hub.models import Backbone

from keras_gemma2 import lora
from keras_gemma2 import presets as presets_lib
from keras_gemma2 import sharding
from keras_gemma2.layers import direct
from keras_gemma2.layers.attention import check_head_counts
from keras_gemma2.layers.attention_masks import attention_layer_types
from keras_gemma2.layers.attention_masks import cache_capacity
from keras_gemma2.layers.decoder_block import Gemma2DecoderBlock
from keras_gemma2.layers.embedding import Gemma2Embedding
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization
from keras_gemma2.quantization import quantizable


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Backbone(presets_lib.RegisteredPresetsMixin, Backbone):
    """The Gemma 2 decoder network, with every hyperparameter explicit.

    Takes `token_ids` and `padding_mask` and returns the final hidden states
    `[batch, length, hidden_dim]` (after the final RMSNorm). `logits()` turns
    hidden states into soft-capped vocabulary logits with the tied embedding,
    `embed()` turns token ids into scaled embeddings; the cached decoding of
    `Gemma2CausalLM` calls the same helpers, so there is one forward pass.

    Args:
        vocabulary_size: int. Size of the vocabulary (256000 in Gemma 2).
        num_layers: int. Number of decoder blocks.
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads (GQA); must
            divide `num_query_heads`.
        hidden_dim: int. Model width.
        intermediate_dim: int. FFN width of each of the two gates (HF's
            `intermediate_size`; KerasHub's `intermediate_dim` is twice it).
        head_dim: int. Width of each attention head.
        query_pre_attn_scalar: float or None. Queries are scaled by its
            inverse square root; `None` means `head_dim`. 144 for the 27B.
        layer_norm_epsilon: float. RMSNorm epsilon. Defaults to `1e-6`.
        rope_max_wavelength: float. RoPE base. Defaults to `10000`.
        attention_logit_soft_cap: float or None. Defaults to `50.0`.
        final_logit_soft_cap: float or None. Defaults to `30.0`.
        use_sliding_window_attention: bool. If `True`, even-indexed layers
            attend within a sliding window. Defaults to `True`.
        sliding_window_size: int. The window. Defaults to `4096`.
        use_post_attention_norm: bool. Defaults to `True`.
        use_post_ffw_norm: bool. Defaults to `True`.
        dropout: float. Dropout rate. Defaults to `0`.
        dtype: string or `keras.DTypePolicy`. Weights and compute dtype.
            On JAX and TensorFlow with only a CPU, `"bfloat16"` becomes
            `"float32"` (see below).

    XLA:CPU has no bfloat16 matrix product: it computes bfloat16 dots in
    float32 and hoists the weights' conversions out of the decoding loop, so
    a bfloat16 model's `generate` held float32 copies of its weights beside
    them (compiled temporaries of 3.7x the bfloat16 bytes; the 2B ran out of
    24 GB). There, a bfloat16 backbone holds its weights in float32 instead:
    one float32 copy and nothing besides it, with float32 arithmetic, which
    is what the dots did anyway. Set `KERAS_GEMMA2_XLA_CPU_BFLOAT16=keep` to
    keep bfloat16. PyTorch and accelerators keep bfloat16.

    Example:
    ```python
    backbone = keras_gemma2.Gemma2Backbone(
        vocabulary_size=64, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        head_dim=8, sliding_window_size=3,
    )
    hidden = backbone({
        "token_ids": np.array([[2, 10, 11, 12]]),
        "padding_mask": np.array([[1, 1, 1, 1]]),
    })
    logits = backbone.logits(hidden)
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_pre_attn_scalar=None,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000.0,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=4096,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        dropout=0.0,
        dtype=None,
        **kwargs,
    ):
        _validate_architecture(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            sliding_window_size=sliding_window_size,
            num_layers=num_layers,
        )
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = head_dim
        dtype = xla_cpu_dtype(dtype)

        # === Layers ===
        self.token_embedding = Gemma2Embedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            logit_soft_cap=final_logit_soft_cap,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            ),
            dtype=dtype,
            name="token_embedding",
        )
        self.attention_types = attention_layer_types(
            num_layers, use_sliding_window_attention
        )
        self.transformer_layers = [
            Gemma2DecoderBlock(
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                query_pre_attn_scalar=query_pre_attn_scalar,
                attention_type=attention_type,
                sliding_window_size=sliding_window_size,
                attention_logit_soft_cap=attention_logit_soft_cap,
                use_post_attention_norm=use_post_attention_norm,
                use_post_ffw_norm=use_post_ffw_norm,
                layer_norm_epsilon=layer_norm_epsilon,
                rope_max_wavelength=rope_max_wavelength,
                dropout=dropout,
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            for i, attention_type in enumerate(self.attention_types)
        ]
        self.final_normalization = Gemma2RMSNormalization(
            epsilon=layer_norm_epsilon,
            dtype=dtype,
            name="final_normalization",
        )

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(
            shape=(None,), dtype="int32", name="padding_mask"
        )
        x = self.embed(token_ids)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask)
        sequence_output = direct.call(self.final_normalization, x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=sequence_output,
            dtype=dtype,
            **kwargs,
        )
        if not in_stateless_scope():
            # Loaders that defer the variables call it once they are filled.
            direct.torch_kernel_layout(self)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.use_sliding_window_attention = use_sliding_window_attention
        self.sliding_window_size = sliding_window_size
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.dropout = dropout

    def embed(self, token_ids):
        """Token ids `[b, t]` -> embeddings scaled by sqrt(hidden_dim)."""
        return direct.call(self.token_embedding, token_ids)

    def logits(self, hidden_states):
        """Hidden states `[b, t, d]` -> soft-capped logits `[b, t, vocab]`."""
        return direct.call(self.token_embedding, hidden_states, reverse=True)

    def decode(
        self, x, caches, cache_update_index, valid_length=None, extend=False
    ):
        """Runs the blocks over `x` with per-layer caches.

        One token is a decode step at position `cache_update_index` (one per
        row if a `[batch]` tensor); several are a prefill from position 0
        that keeps the first `valid_length` in the caches, or with
        `extend=True` continue the caches from `cache_update_index` (see
        `Gemma2DecoderBlock.call`).

        Returns the final hidden states and the list of updated caches.
        """
        new_caches = []
        for block, cache in zip(self.transformer_layers, caches):
            x, cache = direct.call(
                block,
                x,
                cache=cache,
                cache_update_index=cache_update_index,
                valid_length=valid_length,
                extend=extend,
            )
            new_caches.append(cache)
        return direct.call(self.final_normalization, x), new_caches

    def cache_capacities(self, max_length, draft_tokens=0):
        """Positions each layer's cache holds when generating `max_length`.

        Global layers keep every position; local layers only their window,
        as a ring. With `draft_tokens=k` (speculative decoding) every cache
        has `k` more slots: a verification writes up to `k` drafts past the
        last accepted position, and in a ring of `window + k` a rejected
        draft overwrites only positions that have left the window.

        Example:
        ```python
        backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        backbone.cache_capacities(256)  # (64, 256, 64, 256, 64, 256)
        ```
        """
        return tuple(
            cache_capacity(
                block.window_size and block.window_size + draft_tokens,
                max_length + draft_tokens,
            )
            for block in self.transformer_layers
        )

    def init_cache(self, batch_size, max_length, dtype=None, draft_tokens=0):
        """Empty per-layer `(keys, values)` caches for `max_length` tokens.

        Each is `[batch_size, capacity, num_key_value_heads, head_dim]` with
        the capacities of `cache_capacities(max_length, draft_tokens)`.
        """
        dtype = dtype or self.compute_dtype
        return tuple(
            tuple(
                ops.zeros(
                    (
                        batch_size,
                        capacity,
                        self.num_key_value_heads,
                        self.head_dim,
                    ),
                    dtype=dtype,
                )
                for _ in range(2)
            )
            for capacity in self.cache_capacities(max_length, draft_tokens)
        )

    def enable_lora(self, rank, target_layer_names=None):
        """KerasHub's `enable_lora`, refusing a rank below 1 before it
        freezes anything; `keras_gemma2.lora.enable` adds alpha, dropout
        and any target."""
        lora.check_rank(rank)
        return super().enable_lora(rank, target_layer_names)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the matrices and the embedding (`"int8"`, `"int4"`).

        Keras' `Model.quantize` visits every leaf layer and warns for each
        one that has no quantized form (norms, dropout); by default only
        the `EinsumDense` matrices and the embedding are visited here.
        `filters` narrows that further, as in Keras.

        For inference on PyTorch, pass `config=keras.quantizers.
        Int8QuantizationConfig(activation_quantizer=None)`: weight-only
        int8, which `layers.direct` decodes with an int8 GEMV that reads
        one byte a weight. The default int8 (Keras' own, weights and
        activations) runs its products through `torch._int_mm` there
        (`layers.einsum_dense`). Both train with LoRA.

        Example:
        ```python
        backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        backbone.quantize("int8")
        ```
        """
        if self.dtype_policy.compute_dtype == "float16":
            raise ValueError(
                "Gemma 2 is not quantized in float16 (its activations "
                "overflow there); load it in float32 or bfloat16 first."
            )

        super().quantize(
            mode,
            config=config,
            filters=lambda layer: quantizable(layer, filters),
            **kwargs,
        )
        # One collection for all the float matrices dropped: our layers skip
        # Keras' one per matrix (`einsum_dense.DeletesWithoutCollecting`).
        gc.collect()
        direct.torch_kernel_layout(self)

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
        architecture=None,
    ):
        """A `keras.distribution.LayoutMap` that shards Gemma 2 of any size.

        Each weight's sharded axis is chosen from its own shape as it is
        created: embeddings by vocabulary, attention projections by heads
        (by head_dim where the model axis does not divide the key/value
        heads), FFN matrices by width; norms and LoRA adapters replicated.
        So the same call serves the tiny preset, 2B, 9B, 27B and custom
        sizes; a weight the model axis cannot divide raises a ValueError
        naming it. See `keras_gemma2.distribution.get_layout_map`.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: string. The mesh axis for weights.
            data_parallel_dim_name: string. The mesh axis for batches.
            architecture: dict or None. Backbone kwargs to check the mesh
                against up front; the layouts follow the weights' shapes
                either way. Defaults to None.

        Example:
        ```python
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            (1, len(devices)), ("batch", "model"), devices
        )
        layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        with distribution.scope():
            backbone = keras_gemma2.Gemma2Backbone(
                vocabulary_size=97, num_layers=2, num_query_heads=4,
                num_key_value_heads=2, hidden_dim=24, intermediate_dim=40,
                head_dim=8,
            )
        ```
        """
        return sharding.get_layout_map(
            architecture,
            device_mesh,
            model_parallel_dim_name=model_parallel_dim_name,
            data_parallel_dim_name=data_parallel_dim_name,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "final_logit_soft_cap": self.final_logit_soft_cap,
                "use_sliding_window_attention": (
                    self.use_sliding_window_attention
                ),
                "sliding_window_size": self.sliding_window_size,
                "use_post_attention_norm": self.use_post_attention_norm,
                "use_post_ffw_norm": self.use_post_ffw_norm,
                "dropout": self.dropout,
            }
        )
        return config


def xla_cpu_dtype(dtype):
    """`"float32"` for a bfloat16 `dtype` on JAX or TensorFlow with only a
    CPU (see `Gemma2Backbone`); `dtype` itself otherwise."""
    if keras.config.backend() not in ("jax", "tensorflow"):
        return dtype
    if os.environ.get("KERAS_GEMMA2_XLA_CPU_BFLOAT16") == "keep":
        return dtype
    policy = keras.dtype_policies.get(
        dtype if dtype is not None else keras.config.dtype_policy()
    )
    if type(policy) is not keras.DTypePolicy or policy.name != "bfloat16":
        return dtype
    devices = keras.distribution.list_devices()
    if any(not device.lower().startswith("cpu") for device in devices):
        return dtype
    return "float32"


def _validate_architecture(
    num_query_heads, num_key_value_heads, sliding_window_size, num_layers
):
    """Raises a ValueError naming the fix for an impossible architecture."""
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be at least 1; got {num_layers}.")
    check_head_counts(num_query_heads, num_key_value_heads)
    if sliding_window_size is None or sliding_window_size < 1:
        raise ValueError(
            "`sliding_window_size` must be a positive number of tokens (4096 "
            f"in Gemma 2); got {sliding_window_size}. To make every layer "
            "global, pass `use_sliding_window_attention=False` instead."
        )
