"""Sharding Gemma 2 over a device mesh, and how many devices each size needs.

Layout legend (our kernels): v vocabulary, d hidden_dim, n query heads,
k key/value heads, h head_dim, f FFN width of one gate, r LoRA rank.
"""

import math

# Each weight's candidate placements of the model axis, best first: the
# first whose sharded dimension the model axis divides is used. Heads first
# (no communication inside attention), then head_dim, then the model width.
# fmt: off
_CANDIDATES = (
    ("token_embedding/embeddings", ("v", "d"), ((0,), (1,))),
    ("attention/query/kernel", ("n", "d", "h"), ((0,), (2,), (1,))),
    ("attention/key/kernel", ("k", "d", "h"), ((0,), (2,), (1,))),
    ("attention/value/kernel", ("k", "d", "h"), ((0,), (2,), (1,))),
    ("attention/attention_output/kernel", ("n", "h", "d"),
     ((0,), (1,), (2,))),
    ("ffw_gating/kernel", ("d", "f"), ((1,), (0,))),
    ("ffw_gating_2/kernel", ("d", "f"), ((1,), (0,))),
    ("ffw_linear/kernel", ("f", "d"), ((0,), (1,))),
)
# fmt: on


def _sizes(architecture):
    k = architecture
    return {
        "v": k["vocabulary_size"],
        "d": k["hidden_dim"],
        "n": k["num_query_heads"],
        "k": k["num_key_value_heads"],
        "h": k["head_dim"],
        "f": k["intermediate_dim"],
    }


def plan_layouts(architecture, model_axis_size):
    """Our variable path pattern -> which axis of it the model axis shards.

    `architecture` is one kwargs dict or a list of them (a plan valid for
    all). Returns `{pattern: (axes, sharded_axis_or_None)}`; raises a
    ValueError naming the weight and sizes when no axis can be divided.
    """
    architectures = (
        [architecture] if isinstance(architecture, dict) else architecture
    )
    all_sizes = [_sizes(a) for a in architectures]
    plan = {}
    for pattern, axes, candidates in _CANDIDATES:
        if model_axis_size == 1:
            plan[pattern] = (axes, None)
            continue
        for (axis,) in candidates:
            if all(s[axes[axis]] % model_axis_size == 0 for s in all_sizes):
                plan[pattern] = (axes, axis)
                break
        else:
            shapes = sorted({s[a] for s in all_sizes for a in axes})
            raise ValueError(
                f"The model axis has {model_axis_size} devices, which divides "
                f"no dimension of {pattern} (axes {axes}, sizes {shapes}). "
                "Use a model axis size that divides one of them."
            )
    return plan


def get_layout_map(
    architecture,
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `keras.distribution.LayoutMap` for a Gemma 2 architecture.

    Shards along the mesh's model axis: the embedding by vocabulary, the
    attention projections by heads and the feed-forward matrices by width.
    Where the model axis does not divide the heads (the 27B's 16 key/value
    heads on 32 devices, or the tiny 2 on 4), the projection is sharded by
    head_dim instead, and failing that by the model width; a weight that no
    axis can divide raises a ValueError naming it and the sizes (KerasHub's
    layout map raises `IndivisibleError` as soon as the key/value heads do
    not divide, keras-hub#1613). Norms and LoRA adapters are replicated:
    they are small, and replicated adapters keep LoRA's optimizer state on
    every device. `kv_cache_layout` gives the matching cache layout.

    Args:
        architecture: dict, or None. `Gemma2Backbone` kwargs
            (`architectures.GEMMA2_9B`, `backbone.get_config()`); `None`
            gives one map valid for all of 2B, 9B and 27B.
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: string. The mesh axis that shards weights.
        data_parallel_dim_name: string. The mesh axis that shards batches.

    Example:
    ```python
    from keras_gemma2.architectures import GEMMA2_9B
    from keras_gemma2.distribution import get_layout_map
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    layout_map = get_layout_map(GEMMA2_9B, mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    ```
    """
    import keras

    _check_backend()
    names = device_mesh.axis_names
    for name in (model_parallel_dim_name, data_parallel_dim_name):
        if name not in names:
            raise ValueError(
                f"The device mesh has axes {tuple(names)}, not {name!r}; "
                "pass `model_parallel_dim_name`/`data_parallel_dim_name`."
            )
    model_size = device_mesh.shape[names.index(model_parallel_dim_name)]
    if architecture is None:
        from keras_gemma2.architectures import ARCHITECTURES

        architecture = list(ARCHITECTURES.values())
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, (axes, sharded) in plan_layouts(
        architecture, model_size
    ).items():
        layout = [None] * len(axes)
        if sharded is not None:
            layout[sharded] = model_parallel_dim_name
        layout_map[_regex(pattern)] = tuple(layout)
    # Replicated: every RMSNorm scale and, matched by no pattern (Keras
    # replicates those), the LoRA adapters `.../lora_kernel_a|b`.
    layout_map[r".*(norm|normalization)/scale$"] = (None,)
    return layout_map


def _check_backend():
    import keras

    if keras.config.backend() == "torch":
        raise RuntimeError(
            "keras.distribution has no PyTorch implementation in Keras 3.15. "
            "Set KERAS_BACKEND=jax (or tensorflow) before importing Keras."
        )


def _regex(pattern):
    # Anchored to the end of the path: `query/kernel` must not match
    # `query/lora_kernel_a`.
    return ".*" + pattern + "$"


def kv_cache_layout(
    architecture,
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """The layout of one layer's cached keys (or values), `[batch, length,
    k, h]`.

    Batch on the data axis; key/value heads on the model axis when it
    divides them, else head_dim, as the key/value projections.
    """
    import keras

    _check_backend()
    names = device_mesh.axis_names
    model_size = device_mesh.shape[names.index(model_parallel_dim_name)]
    plan = plan_layouts(architecture, model_size)
    _, sharded = plan["attention/key/kernel"]
    layout = [data_parallel_dim_name, None, None, None]
    if sharded == 0:
        layout[2] = model_parallel_dim_name
    elif sharded == 2:
        layout[3] = model_parallel_dim_name
    return keras.distribution.TensorLayout(tuple(layout), device_mesh)


# --- memory -----------------------------------------------------------------

_BYTES = {"bfloat16": 2, "float32": 4}
# Adam keeps two moments; gradients one more copy: per trainable parameter.
_LORA_TRAIN_COPIES = 4


def kv_cache_bytes(
    architecture,
    sequence_length=8192,
    batch_size=1,
    dtype="bfloat16",
    ring=True,
):
    """Bytes of the keys and values cached to generate `sequence_length`.

    With `ring=True` (what `Gemma2CausalLM.generate` keeps), local layers
    hold only their window and global layers every position; `ring=False`
    gives a full-length cache on every layer, as KerasHub 0.32 keeps.

    Example:
    ```python
    from keras_gemma2.architectures import GEMMA2_27B
    from keras_gemma2.distribution import kv_cache_bytes
    kv_cache_bytes(GEMMA2_27B, 8192) / kv_cache_bytes(GEMMA2_27B, 8192,
                                                     ring=False)  # 0.75
    ```
    """
    from keras_gemma2.layers.attention_masks import attention_layer_types

    sizes = _sizes(architecture)
    window = architecture.get("sliding_window_size", 4096)
    types = attention_layer_types(
        architecture["num_layers"],
        architecture.get("use_sliding_window_attention", True),
    )
    positions = sum(
        min(window, sequence_length)
        if ring and kind == "local"
        else sequence_length
        for kind in types
    )
    per_position = 2 * batch_size * sizes["k"] * sizes["h"] * _BYTES[dtype]
    return positions * per_position


def kv_cache_table(lengths=(2048, 4096, 8192), dtype="bfloat16"):
    """Markdown: KV-cache GiB at batch 1, ours vs a full-length cache."""
    from keras_gemma2.architectures import ARCHITECTURES

    head = "| size | " + " | ".join(
        f"{n // 1024}k ours | {n // 1024}k full" for n in lengths
    )
    rows = [head + " |", "|---|" + "---|---|" * len(lengths)]
    for size, architecture in ARCHITECTURES.items():
        cells = []
        for length in lengths:
            for ring in (True, False):
                nbytes = kv_cache_bytes(
                    architecture, length, dtype=dtype, ring=ring
                )
                cells.append(f"{nbytes / 2**30:.2f}")
        rows.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def memory_bytes(
    architecture,
    mode="generate",
    dtype="bfloat16",
    batch_size=1,
    sequence_length=8192,
    lora_rank=4,
):
    """Estimated bytes to generate with, or LoRA fine-tune, an architecture.

    `generate`: weights plus the KV cache of `kv_cache_bytes` (local
    layers keep only their window).
    `lora`: weights, float32 LoRA adapters on query and value with Adam
    state and gradients, and per-layer activations kept for the backward
    pass (`batch * length * (hidden * 14 + heads * length)` values a
    layer, the attention scores included).

    Example:
    ```python
    from keras_gemma2.architectures import GEMMA2_2B
    from keras_gemma2.distribution import memory_bytes
    memory_bytes(GEMMA2_2B, "generate") / 2**30  # GiB
    ```
    """
    from keras_gemma2.architectures import abstract_parameter_count

    if mode not in ("generate", "lora"):
        raise ValueError(f"`mode` must be 'generate' or 'lora'; got {mode!r}.")
    width = _BYTES[dtype]
    sizes = _sizes(architecture)
    layers = architecture["num_layers"]
    weights = abstract_parameter_count(architecture) * width
    if mode == "generate":
        return weights + kv_cache_bytes(
            architecture, sequence_length, batch_size, dtype
        )
    # LoRA on query [n, d, h] and value [k, d, h]: a [.., d, r] and [r, h].
    per_layer = (sizes["n"] + sizes["k"]) * (
        sizes["d"] * lora_rank + lora_rank * sizes["h"]
    )
    adapters = layers * per_layer * 4 * _LORA_TRAIN_COPIES
    tokens = batch_size * sequence_length
    activations = (
        layers
        * tokens
        * (sizes["d"] * 14 + sizes["n"] * sequence_length)
        * width
    )
    return weights + adapters + activations


def devices_needed(architecture, device_gib, mode="generate", **kwargs):
    """How many devices of `device_gib` GiB hold `memory_bytes(...)`.

    10% of each device is kept free for the runtime and fragmentation.
    """
    usable = device_gib * 2**30 * 0.9
    return math.ceil(memory_bytes(architecture, mode, **kwargs) / usable)


def device_table(
    device_gibs=(16, 24, 40, 80), generate_length=8192, lora_length=1024
):
    """Markdown: devices needed per size and mode, from the architectures.

    Generation at batch 1 with a `generate_length`-token cache; LoRA at
    batch 1 on `lora_length`-token sequences; bfloat16 weights.
    """
    from keras_gemma2.architectures import ARCHITECTURES

    head = "| size | mode | " + " | ".join(f"{g} GB" for g in device_gibs)
    rows = [head + " |", "|---|---|" + "---|" * len(device_gibs)]
    lengths = {"generate": generate_length, "lora": lora_length}
    for size, architecture in ARCHITECTURES.items():
        for mode, length in lengths.items():
            cells = [
                str(
                    devices_needed(
                        architecture, g, mode, sequence_length=length
                    )
                )
                for g in device_gibs
            ]
            rows.append(f"| {size} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
