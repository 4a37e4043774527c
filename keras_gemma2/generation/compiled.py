"""Compiled functions of the generation engine, and bucketed shapes.

The engine runs three compiled functions: a prefill over new prompts
(their length rounded up to a bucket), a decode step that advances every
row of the batch by one token, and an extension of a cached sequence by
several tokens. Each takes the model's variables as arguments on JAX, is
XLA-compiled on TensorFlow, and runs under `torch.no_grad()` on PyTorch
(where caches are then updated in place). Shapes are bucketed so that a
chat, whose prompts grow by a few tokens each turn, compiles once per
bucket and not once per message.
"""

import contextlib
import functools
import itertools
import threading

import keras
import numpy as np
from keras import ops
from keras_hub.samplers import Sampler

from keras_gemma2.layers import direct

# The compiled PyTorch decode step of the running `generate`, if any.
_torch_step = threading.local()

# Prompt and total lengths round up to powers of two from this size ...
_MIN_BUCKET = 16
# ... up to this size, then to multiples of it.
_LARGE_BUCKET = 1024


def bucket_length(length):
    """The compiled length for `length` tokens.

    Example:
    >>> [bucket_length(n) for n in (1, 16, 17, 300, 1024, 1025, 3000)]
    [16, 16, 32, 512, 1024, 2048, 3072]
    """
    if length <= _LARGE_BUCKET:
        size = _MIN_BUCKET
        while size < length:
            size *= 2
        return size
    return -(-length // _LARGE_BUCKET) * _LARGE_BUCKET


def compile_function(model, fn, static_argnames=(), donate_argnums=()):
    """`fn(*tensors, **static)` compiled with `model`'s state as inputs.

    JAX: `jax.jit`, with the model's and its sampler's variables passed in
    (as KerasHub's `make_generate_function` does) and the sampler's seed
    written back. TensorFlow: `tf.function(jit_compile=True)` unless the
    model was compiled with `jit_compile=False`. PyTorch: eager under
    `torch.no_grad()`, calling sublayers directly (`layers.direct`), with
    each decode step `torch.compile`d if the model was compiled with
    `jit_compile=True` (`torch_compiled_step`). Each traces once per input
    shape and static value. On JAX the positional arguments listed in
    `donate_argnums` (the caches of a step) are donated: XLA updates them
    in place instead of copying them every call.
    """
    backend = keras.config.backend()
    if backend == "torch":
        return _torch_function(model, fn)
    if backend == "tensorflow":
        return _tf_function(model, fn)
    if backend == "jax":
        return _jax_function(model, fn, static_argnames, donate_argnums)

    def eager_function(*args, **static):
        return fn(*args, **static)

    return eager_function


def _torch_function(model, fn):
    # torch.no_grad: PyTorch, an optional dependency, on its backend only.
    import torch

    direct.torch_kernel_layout(model)
    compiled_gemv = direct.use_compiled_gemv(model)
    step = None
    if getattr(model, "_generate_torch_compile", False):
        step = torch_compiled_step(model)

    def torch_function(*args, **static):
        with torch.no_grad(), direct.direct_calls(compiled_gemv):
            with _using_step(step):
                return fn(*args, **static)

    return torch_function


def _tf_function(model, fn):
    # tf.function: TensorFlow, imported on its backend only.
    import tensorflow as tf

    function = tf.function(
        fn, jit_compile=getattr(model, "_generate_jit_compile", True)
    )

    def tf_function(*args, **static):
        return function(*args, **static)

    return tf_function


def _jax_function(model, fn, static_argnames, donate_argnums=()):
    # jax.jit: JAX, imported on its backend only.
    import jax

    @functools.partial(
        jax.jit,
        static_argnames=tuple(static_argnames),
        # Positions of `fn`'s own arguments: the state comes first.
        donate_argnums=tuple(i + 1 for i in donate_argnums),
    )
    def jitted(state, *args, **static):
        sampler_values, trainable, non_trainable = state
        sampler = model.sampler
        mapping = itertools.chain(
            zip(sampler.variables, sampler_values),
            zip(model.trainable_variables, trainable),
            zip(model.non_trainable_variables, non_trainable),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = fn(*args, **static)
        sampler_values = []
        for variable in sampler.variables:
            value = scope.get_current_value(variable)
            sampler_values.append(variable if value is None else value)
        return outputs, sampler_values

    def jax_function(*args, **static):
        sampler = model.sampler
        outputs, sampler_values = jitted(*_jax_state(model), *args, **static)
        for variable, value in zip(sampler.variables, sampler_values):
            variable.assign(value)
        return outputs

    def lower(*args, **static):
        """`jax.jit(...).lower(...)` with the model's state: for
        `.compile().memory_analysis()` (the memory guards in the tests)."""
        return jitted.lower(*_jax_state(model), *args, **static)

    jax_function.lower = lower
    return jax_function


def torch_compiled_step(model):
    """`model.call_with_cache` for one token, through `torch.compile`.

    Eager PyTorch spends more of a small model's decode step in Python (the
    Keras ops' argument handling, ~200 sublayer calls) than in its matrix
    products: 57 ms a step on the benchmark's small config, where the
    products take about 25. Compiled whole (Dynamo traces through the Keras
    layers; `fullgraph=True`, so a graph break fails loudly), a step is one
    Inductor graph: 26 ms. The first call compiles for 30-70 s on this
    2-core machine (Inductor's disk cache roughly halves it in later
    processes), so it is opt-in: `compile(jit_compile=True)` on PyTorch.

    The position is a tensor and the capacity axis of the global layers'
    caches is marked dynamic, so neither a new step nor a longer
    `max_length` recompiles. Caches are updated in place, as in eager.
    """
    # torch: an optional dependency, used on the PyTorch backend only
    import torch
    import torch._dynamo

    def step(token_ids, cache, index):
        # Products inside the graph are Inductor's own: a nested compiled
        # GEMV, or `F.linear` as a custom op, measured slower there.
        with direct.direct_calls(False):
            return model.call_with_cache(token_ids, cache, index)

    direct.raise_recompile_limit()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    blocks = model.backbone.transformer_layers

    def run(token_ids, cache, index):
        for block, layer_cache in zip(blocks, cache):
            if block.window_size is None:
                for tensor in layer_cache:
                    torch._dynamo.maybe_mark_dynamic(tensor, 1)
        index = torch.as_tensor(index, dtype=torch.int32)
        # A column of the generation's ids: its stride is the length.
        return compiled(token_ids.contiguous(), cache, index)

    return run


@contextlib.contextmanager
def _using_step(step):
    previous = getattr(_torch_step, "step", None)
    _torch_step.step = step
    try:
        yield
    finally:
        _torch_step.step = previous


def _jax_state(model):
    sampler = model.sampler
    return (
        (
            [v.value for v in sampler.variables],
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        ),
    )


def picks_one_token_per_step(sampler):
    """Whether `sampler` decides each token as it goes (greedy, top-k, ...).

    Beam and contrastive search override `Sampler.__call__` with their own
    loop; they run through KerasHub's loop and cannot stream.
    """
    return type(sampler).__call__ is Sampler.__call__


def decode_step(model):
    """`model.call_with_cache` for one token per row: the compiled PyTorch
    step of the running function if there is one (`torch_compiled_step`)."""
    return getattr(_torch_step, "step", None) or model.call_with_cache


def next_logits(model, token_ids, cache, index):
    """`(logits, hidden_states, cache)` predicting position `index`.

    Feeds the token at `index - 1` through one cached decode step: the
    `next` of KerasHub's sampler contract, shared by our loop and by beam
    and contrastive search.
    """
    batch_size = ops.shape(token_ids)[0]
    previous = ops.slice(token_ids, [0, index - 1], [batch_size, 1])
    logits, hidden_states, cache = decode_step(model)(
        previous, cache, index - 1
    )
    return ops.squeeze(logits, 1), ops.squeeze(hidden_states, 1), cache


def is_stop_token(token_ids, stop_token_ids):
    """Where `token_ids` holds any of `stop_token_ids` (a bool tensor)."""
    found = ops.zeros_like(token_ids, dtype="bool")
    for stop_id in stop_token_ids:
        found = ops.logical_or(found, token_ids == stop_id)
    return found


def output_mask(token_ids, prompt_mask, stop_token_ids, limits):
    """`[batch, length]` mask of the kept tokens of a generation.

    Prompt tokens, and generated tokens up to and including the first stop
    token, below each row's limit. Backend ops: it runs inside a compiled
    `generate_step` and on the numpy results of the decoding loop alike.
    """
    prompt_mask = ops.cast(prompt_mask, "bool")
    length = ops.shape(token_ids)[1]
    positions = ops.expand_dims(ops.arange(length, dtype="int32"), 0)
    kept = positions < ops.expand_dims(ops.cast(limits, "int32"), 1)
    if stop_token_ids:
        is_stop = ops.logical_and(
            is_stop_token(token_ids, stop_token_ids),
            ops.logical_not(prompt_mask),
        )
        is_stop = ops.cast(is_stop, "int32")
        # True strictly after the first stop token of the row.
        after_stop = (ops.cumsum(is_stop, axis=-1) - is_stop) > 0
        kept = ops.logical_and(kept, ops.logical_not(after_stop))
    return ops.logical_or(kept, prompt_mask)


def check_token_ids(token_ids, vocabulary_size, argument="token_ids"):
    """Refuses ids outside `[0, vocabulary_size)`, naming the first one.

    An embedding lookup does not check its indices: JAX clamps them, so an
    id past the vocabulary silently reads the last row. `token_ids` is a
    numpy array, checked on the host once per call (a min and a max).

    Example:
    ```python
    import numpy as np
    from keras_gemma2.generation import check_token_ids
    check_token_ids(np.array([[2, 5, 9]]), vocabulary_size=10)  # fine
    ```
    """
    token_ids = np.asarray(token_ids)
    if token_ids.size == 0:
        return
    low, high = token_ids.min(), token_ids.max()
    if low >= 0 and high < vocabulary_size:
        return
    bad = (token_ids < 0) | (token_ids >= vocabulary_size)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    value = int(token_ids[where])
    raise ValueError(
        f"`{argument}` holds {value} at index {list(where)}, outside this "
        f"model's vocabulary of {vocabulary_size} ids (0 to "
        f"{vocabulary_size - 1}). Tokenize with this model's tokenizer "
        "(`lm.preprocessor.tokenizer`), or pass strings."
    )
