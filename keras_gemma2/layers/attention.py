"""Gemma 2 grouped-query attention with RoPE, query scale and a soft cap.

Einsum legend: b batch, t query positions, s key positions, d model width,
n query heads, k key-value heads, g query heads per key-value head (n = k * g),
h head_dim.
"""

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding

from keras_gemma2.layers import direct
from keras_gemma2.layers.attention_masks import causal_mask
from keras_gemma2.layers.attention_masks import decoder_attention_mask
from keras_gemma2.layers.attention_masks import sliding_window_mask
from keras_gemma2.layers.einsum_dense import Gemma2EinsumDense

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
        sliding_window_size: int or None. The window of a local layer (a key
            at most `sliding_window_size - 1` positions back); `None` for a
            global layer.

    Sequences longer than `chunk_size` (1024; an attribute, not saved) are
    attended in blocks with an online softmax, so memory does not grow with
    the square of the length.

    Example:
    ```python
    attention = keras_gemma2.layers.Gemma2Attention(
        num_query_heads=4, num_key_value_heads=2, head_dim=8,
        query_pre_attn_scalar=8, attention_logit_soft_cap=50.0,
    )
    x = np.random.rand(1, 5, 16).astype("float32")
    mask = np.tril(np.ones((1, 5, 5), bool))
    y, _ = attention(x, attention_mask=mask)
    y, _ = attention(x)  # causal mask from positions
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
        sliding_window_size=None,
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
        self.sliding_window_size = sliding_window_size
        self.chunk_size = 1024
        self.num_groups = num_query_heads // num_key_value_heads

        self.query = Gemma2EinsumDense(
            "btd,ndh->btnh",
            output_shape=(None, num_query_heads, head_dim),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="query",
        )
        self.key = Gemma2EinsumDense(
            "bsd,kdh->bskh",
            output_shape=(None, num_key_value_heads, head_dim),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="key",
        )
        self.value = Gemma2EinsumDense(
            "bsd,kdh->bskh",
            output_shape=(None, num_key_value_heads, head_dim),
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="value",
        )
        self.attention_output = Gemma2EinsumDense(
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
        attention_mask=None,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        valid_length=None,
        extend=False,
        training=False,
    ):
        """Attends; returns `(output, cache)`.

        Args:
            x: `[batch, length, hidden_dim]`.
            attention_mask: optional explicit `[batch or 1, length, length]`
                boolean mask. Without it the mask follows from positions
                (causal, the sliding window of a local layer) and
                `padding_mask`.
            padding_mask: optional `[batch, length]` mask of real tokens.
            cache: optional `(keys, values)`, each `[batch, capacity,
                num_key_value_heads, head_dim]`: a ring that holds position
                `p` at slot `p % capacity`. A global layer's capacity is the
                generation length; a local layer's is at most its window.
            cache_update_index: int, int tensor or `[batch]` int tensor.
                With a cache and one token, the position of that token (a
                decode step); a `[batch]` tensor puts each row at its own
                position. With `extend=True`, the position of the first of
                several tokens.
            valid_length: int, int tensor or `[batch]` int tensor. With a
                cache and several tokens (a prefill from position 0), how
                many leading positions are written to the cache. Defaults to
                all of them.
            extend: bool. With a cache and several tokens, they continue
                the cached sequence from `cache_update_index` instead of
                starting it: they attend to the cached positions and to each
                other, and are all written to the cache.
            training: bool.

        A decode step writes its key and value in place of the oldest slot
        and reads only the `capacity` cached positions; no length x length
        mask is built. A prefill attends over `x` itself (in chunks with an
        online softmax when longer than `chunk_size`) and returns a new
        cache holding the last `capacity` of its first `valid_length`
        positions.
        """
        # An int when traced with a known length; None or symbolic otherwise.
        length = x.shape[1]
        decoding = cache is not None and isinstance(length, int) and length == 1
        extend = extend and cache is not None and not decoding
        start = cache_update_index if decoding or extend else 0
        rope = _rope_arguments(start, ops.shape(x)[1])
        # [b, t, n, h]
        query = direct.call(self.rotary, direct.call(self.query, x), **rope)
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)
        # [b, t, k, h]
        key = direct.call(self.rotary, direct.call(self.key, x), **rope)
        value = direct.call(self.value, x)
        if decoding:
            return self._decode_step(query, key, value, cache, start)
        if extend:
            return self._extend(query, key, value, cache, start)
        if attention_mask is not None:
            out = self._attend(query, key, value, attention_mask, training)
        else:
            out = self._self_attend(query, key, value, padding_mask, training)
        if cache is not None:
            cache = _fill_ring(key, value, cache, valid_length)
        return out, cache

    def _output(self, out):
        """`[b, t, k, g, h]` heads -> `[b, t, hidden_dim]`."""
        batch, length = ops.shape(out)[0], ops.shape(out)[1]
        out = ops.reshape(
            out, (batch, length, self.num_query_heads, self.head_dim)
        )
        return direct.call(self.attention_output, out)

    def _group(self, query):
        """`[b, t, n, h]` -> `[b, t, k, g, h]`."""
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        return ops.reshape(
            query,
            (batch, length, self.num_key_value_heads, self.num_groups, -1),
        )

    def _scores(self, query, key):
        """Soft-capped float32 scores `[b, k, g, t, s]`."""
        scores = ops.cast(
            ops.einsum("btkgh,bskh->bkgts", query, key), "float32"
        )
        if self.attention_logit_soft_cap is not None:
            cap = self.attention_logit_soft_cap
            scores = ops.tanh(scores / cap) * cap
        return scores

    def _attend(self, query, key, value, attention_mask, training=False):
        """Plain softmax attention under a `[b or 1, t, s]` mask."""
        query = self._group(query)
        scores = self._scores(query, key)
        # [b or 1, t, s] -> [b or 1, 1, 1, t, s]
        mask = ops.expand_dims(ops.expand_dims(attention_mask, 1), 1)
        scores = ops.where(mask, scores, _MASKED_SCORE)
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        probs = direct.call(self.dropout_layer, probs, training=training)
        return self._output(ops.einsum("bkgts,bskh->btkgh", probs, value))

    def _self_attend(self, query, key, value, padding_mask, training):
        length = query.shape[1]
        if not isinstance(length, int) or length <= self.chunk_size:
            mask = decoder_attention_mask(
                ops.shape(query)[1],
                ops.shape(key)[1],
                padding_mask=padding_mask,
                window_size=self.sliding_window_size,
            )
            return self._attend(query, key, value, mask, training)
        return self._chunked_attend(query, key, value, padding_mask, training)

    def _chunked_attend(self, query, key, value, padding_mask, training):
        """Self-attention in query x key blocks with an online softmax.

        Peak memory holds one `[b, heads, chunk, chunk]` block of scores
        instead of `[b, heads, length, length]`: an 8192-token prompt
        prefills in bounded memory. The soft cap is applied per block, before
        the running maximum, so the result equals `_attend` up to float
        rounding. A local layer visits only the key blocks inside its window.
        """
        length, chunk = query.shape[1], self.chunk_size
        window = self.sliding_window_size
        query = self._group(query)
        outputs = []
        for q_start in range(0, length, chunk):
            q_end = min(q_start + chunk, length)
            q = query[:, q_start:q_end]
            k_first = 0 if window is None else max(0, q_start - window + 1)
            running_max = total = acc = None
            for k_start in range(k_first, q_end, chunk):
                k_end = min(k_start + chunk, q_end)
                scores = self._scores(q, key[:, k_start:k_end])
                mask = decoder_attention_mask(
                    q_end - q_start,
                    k_end - k_start,
                    start_index=q_start,
                    padding_mask=None
                    if padding_mask is None
                    else padding_mask[:, k_start:k_end],
                    window_size=window,
                    key_start_index=k_start,
                )
                mask = ops.expand_dims(ops.expand_dims(mask, 1), 1)
                scores = ops.where(mask, scores, _MASKED_SCORE)
                block_max = ops.max(scores, axis=-1, keepdims=True)
                new_max = (
                    block_max
                    if running_max is None
                    else ops.maximum(running_max, block_max)
                )
                probs = ops.exp(scores - new_max)
                block_total = ops.sum(probs, axis=-1, keepdims=True)
                probs = direct.call(
                    self.dropout_layer,
                    ops.cast(probs, self.compute_dtype),
                    training=training,
                )
                # [b, t, k, g, h]
                block_out = ops.cast(
                    ops.einsum(
                        "bkgts,bskh->btkgh", probs, value[:, k_start:k_end]
                    ),
                    "float32",
                )
                if running_max is None:
                    total, acc = block_total, block_out
                else:
                    rescale = ops.exp(running_max - new_max)
                    total = total * rescale
                    acc = acc * _heads_last(rescale) + block_out
                    total = total + block_total
                running_max = new_max
            outputs.append(
                ops.cast(acc / _heads_last(total), self.compute_dtype)
            )
        return self._output(ops.concatenate(outputs, axis=1))

    def _decode_step(self, query, key, value, cache, index):
        """One token at position `index` (a scalar, or `[batch]`: one
        position per row): write the ring, read `capacity`."""
        key_cache, value_cache = cache
        capacity = key_cache.shape[1]
        index = ops.cast(index, "int32")
        slot = index % capacity
        key_cache = _write_slot(key_cache, key, slot)
        value_cache = _write_slot(value_cache, value, slot)
        # [1 or b, capacity]: the position each slot holds once `index` is
        # written.
        positions = _slot_positions(index, capacity)
        valid = positions >= 0
        if self.sliding_window_size is not None:
            valid = ops.logical_and(
                valid,
                ops.reshape(index, (-1, 1)) - positions
                < self.sliding_window_size,
            )
        mask = ops.expand_dims(valid, 1)
        out = self._attend(query, key_cache, value_cache, mask)
        return out, (key_cache, value_cache)

    def _extend(self, query, key, value, cache, start):
        """Tokens at `start, start + 1, ...` after the cached positions.

        They attend to the ring as it was (the positions before `start`)
        and to each other, then all are written: writing first would let a
        later token overwrite a slot an earlier one still needs.
        """
        key_cache, value_cache = cache
        capacity = key_cache.shape[1]
        length = query.shape[1]
        start = ops.cast(start, "int32")
        # [1 or b, 1]
        first = ops.reshape(start, (-1, 1))
        # [1 or b, capacity]: the positions the ring holds before `start`.
        cached = _slot_positions(start - 1, capacity)
        # [1 or b, t]
        new = first + ops.expand_dims(ops.arange(length, dtype="int32"), 0)
        # [1 or b, t, capacity + t]
        key_positions = ops.concatenate([cached, new], axis=-1)
        if self.sliding_window_size is None:
            mask = causal_mask(new, key_positions)
        else:
            mask = sliding_window_mask(
                new, key_positions, self.sliding_window_size
            )
        mask = ops.logical_and(mask, ops.expand_dims(key_positions >= 0, 1))
        out = self._attend(
            query,
            ops.concatenate([key_cache, key], axis=1),
            ops.concatenate([value_cache, value], axis=1),
            mask,
        )
        # The last `capacity` new positions (earlier ones would be
        # overwritten within this write), one slot each.
        for offset in range(max(length - capacity, 0), length):
            slot = (start + offset) % capacity
            key_cache = _write_slot(
                key_cache, key[:, offset : offset + 1], slot
            )
            value_cache = _write_slot(
                value_cache, value[:, offset : offset + 1], slot
            )
        return out, (key_cache, value_cache)

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
                "sliding_window_size": self.sliding_window_size,
            }
        )
        return config


def _heads_last(x):
    """`[b, k, g, t, 1]` -> `[b, t, k, g, 1]`."""
    return ops.transpose(x, (0, 3, 1, 2, 4))


def _rope_arguments(start, length):
    """RoPE's arguments for tokens at `start ...`: one start for all rows,
    or `[batch, length]` positions when each row has its own start."""
    if _is_per_row(start):
        steps = ops.expand_dims(ops.arange(length, dtype="int32"), 0)
        return {"positions": ops.expand_dims(start, 1) + steps}
    return {"start_index": start}


def _is_per_row(index):
    """Whether `index` (an int, scalar or `[batch]` tensor) is per row."""
    return len(getattr(index, "shape", ())) == 1


def _slot_positions(index, capacity):
    """`[1 or batch, capacity]`: the position each ring slot holds once
    `index` (a scalar or `[batch]`) is written: the latest `p <= index`
    with `p % capacity == slot`; negative where never written."""
    index = ops.reshape(ops.cast(index, "int32"), (-1, 1))
    slots = ops.expand_dims(ops.arange(capacity, dtype="int32"), 0)
    # `%`, not `ops.mod`: a compiled PyTorch step keeps `capacity` symbolic
    # (`ops.mod` would make it a tensor, fixing the graph to one capacity).
    return index - (index - slots) % capacity


def _fill_ring(key, value, cache, valid_length):
    """A new ring cache holding the last `capacity` of the first
    `valid_length` positions (a scalar or one per row) of `key`/`value`
    (`[b, t, k, h]`).

    Later positions of a bucketed prefill are left out: in a ring they would
    overwrite slots still inside the window of the next decode step.
    """
    capacity = cache[0].shape[1]
    length = ops.shape(key)[1]
    last = (length if valid_length is None else valid_length) - 1
    # Slots never written (p < 0) take position 0 and stay masked.
    positions = ops.maximum(_slot_positions(last, capacity), 0)
    if not _is_per_row(last):
        return (
            ops.take(key, positions[0], axis=1),
            ops.take(value, positions[0], axis=1),
        )
    positions = positions[:, :, None, None]
    return (
        ops.take_along_axis(key, positions, axis=1),
        ops.take_along_axis(value, positions, axis=1),
    )


def _write_slot(cache, update, slot):
    """Writes `update` (`[b, 1, k, h]`) at `slot` of `cache` (`[b, c, k, h]`):
    one slot for every row, or a `[b]` slot per row.

    On PyTorch without gradients (generation) the slot is copied in place:
    Keras' `slice_update` clones the whole cache on torch, every step.
    """
    per_row = _is_per_row(slot)
    if keras.config.backend() == "torch":
        # torch: an optional dependency, imported on its backend only
        import torch

        if not torch.is_grad_enabled():
            index = torch.as_tensor(slot, device=cache.device).long()
            if per_row:
                rows = torch.arange(cache.shape[0], device=cache.device)
                cache.index_put_((rows, index), update[:, 0])
            else:
                cache.index_copy_(1, index.reshape(1), update)
            return cache
    if per_row:
        rows = ops.arange(ops.shape(cache)[0], dtype="int32")
        indices = ops.stack([rows, ops.cast(slot, "int32")], axis=1)
        return ops.scatter_update(cache, indices, update[:, 0])
    return ops.slice_update(cache, [0, slot, 0, 0], update)


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
