"""How big each Gemma 2 size is: parameters, KV cache, devices needed.

The parameter count builds a `Gemma2Backbone` with deferred variables, so
this module imports the backbone; `architectures` holds the sizes only.
The tables are in the README (`device_table`, `kv_cache_table`).
"""

import functools
import math

from keras_gemma2 import deferred
from keras_gemma2.architectures import ARCHITECTURES
from keras_gemma2.architectures import axis_sizes
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.layers.attention_masks import cache_capacity
from keras_gemma2.layers.attention_masks import layer_windows


def abstract_parameter_count(kwargs):
    """Counts a `Gemma2Backbone`'s parameters without allocating them.

    The backbone is built inside a `keras.StatelessScope` that defers every
    initializer, so the 27B's 27 billion weights are shapes only.

    Args:
        kwargs: dict. `Gemma2Backbone` arguments, e.g. `GEMMA2_27B`.

    Example:
    ```python
    from keras_gemma2.architectures import GEMMA2_9B
    from keras_gemma2.memory import abstract_parameter_count
    abstract_parameter_count(GEMMA2_9B)  # 9241705984
    ```
    """
    # Cached: an abstract build of the 27B takes seconds, and
    # `device_table` asks for each size eight times.
    items = tuple(sorted(kwargs.items()))
    try:
        hash(items)
    except TypeError:  # an unhashable argument (a list): counted uncached
        return _parameter_count(kwargs)
    return _cached_parameter_count(items)


@functools.cache
def _cached_parameter_count(items):
    return _parameter_count(dict(items))


def _parameter_count(kwargs):
    # The variables stay deferred and are dropped: nothing is allocated.
    with deferred.deferred_variables():
        backbone = Gemma2Backbone(**kwargs)
    return sum(math.prod(w.shape) for w in backbone.weights)


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
    sizes = axis_sizes(architecture)
    windows = layer_windows(
        architecture["num_layers"],
        architecture.get("use_sliding_window_attention", True),
        architecture.get("sliding_window_size", 4096),
    )
    positions = sum(
        cache_capacity(window if ring else None, sequence_length)
        for window in windows
    )
    per_position = 2 * batch_size * sizes["k"] * sizes["h"] * _BYTES[dtype]
    return positions * per_position


def kv_cache_table(lengths=(2048, 4096, 8192), dtype="bfloat16"):
    """Markdown: KV-cache GiB at batch 1, ours vs a full-length cache."""
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
    if mode not in ("generate", "lora"):
        raise ValueError(f"`mode` must be 'generate' or 'lora'; got {mode!r}.")
    width = _BYTES[dtype]
    sizes = axis_sizes(architecture)
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
