"""Pure functions that build boolean attention masks (True = may attend)."""

from keras import ops


def attention_layer_types(num_layers, use_sliding_window_attention=True):
    """Returns each layer's attention type, `"local"` or `"global"`.

    Gemma 2 alternates, starting local: layers 0, 2, 4, ... use a sliding
    window and layers 1, 3, 5, ... attend over the whole context. With
    `use_sliding_window_attention=False` every layer is global.

    Example:
    >>> attention_layer_types(4)
    ('local', 'global', 'local', 'global')
    """
    if not use_sliding_window_attention:
        return ("global",) * num_layers
    return tuple("local" if i % 2 == 0 else "global" for i in range(num_layers))


def layer_windows(
    num_layers, use_sliding_window_attention=True, sliding_window_size=4096
):
    """Each layer's sliding window: an int for a local layer, `None` for a
    global one (`attention_layer_types`'s alternation).

    Example:
    >>> layer_windows(3, sliding_window_size=4)
    (4, None, 4)
    """
    types = attention_layer_types(num_layers, use_sliding_window_attention)
    return tuple(sliding_window_size if t == "local" else None for t in types)


def cache_capacity(window, max_length):
    """Positions a layer's decode cache holds for `max_length` tokens: a
    ring of its `window`, or every position for a global layer (`None`).

    Example:
    >>> cache_capacity(4, 20), cache_capacity(None, 20), cache_capacity(4, 3)
    (4, 20, 3)
    """
    return min(window or max_length, max_length)


def causal_mask(query_positions, key_positions):
    """`[..., q, k]` mask: a query sees keys at its own position or before."""
    return ops.expand_dims(key_positions, -2) <= ops.expand_dims(
        query_positions, -1
    )


def sliding_window_mask(query_positions, key_positions, window_size):
    """`[..., q, k]` mask: keys at `q - window_size < k <= q`."""
    distance = ops.expand_dims(query_positions, -1) - ops.expand_dims(
        key_positions, -2
    )
    return ops.logical_and(distance >= 0, distance < window_size)


def decoder_attention_mask(
    query_length,
    key_length,
    start_index=0,
    padding_mask=None,
    window_size=None,
    key_start_index=0,
):
    """The `[batch or 1, query_length, key_length]` mask of one decoder layer.

    Args:
        query_length: int. Number of query positions.
        key_length: int. Number of key positions (the cache length when
            decoding with a cache).
        start_index: int or int tensor. Position of the first query.
        padding_mask: optional `[batch, key_length]` mask of real tokens.
        window_size: optional int. The sliding window of a local layer;
            `None` for a global layer.
        key_start_index: int. Position of the first key (a block of keys
            in chunked attention).
    """
    # [q]
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(
        start_index, "int32"
    )
    # [k]
    key_positions = ops.arange(key_length, dtype="int32") + key_start_index
    if window_size is None:
        mask = causal_mask(query_positions, key_positions)
    else:
        mask = sliding_window_mask(query_positions, key_positions, window_size)
    # [1, q, k]
    mask = ops.expand_dims(mask, 0)
    if padding_mask is not None:
        # [batch, 1, k]
        keys = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)
        mask = ops.logical_and(mask, keys)
    return mask
