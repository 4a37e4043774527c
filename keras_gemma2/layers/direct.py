"""Direct layer calls and matrix products for eager decoding on PyTorch.

Keras' `Layer.__call__` does per-call bookkeeping (argument binding, input
conversion, masking, autocast scopes) that costs ~40 us a call on PyTorch,
where nothing is compiled: about 200 sublayer calls make it a third of a
decode step of a 12-layer model. Inside `direct_calls()`, `call(layer, ...)`
goes straight to `layer.call` for built, unquantized layers whose compute
and variable dtypes agree (where `__call__` would only pass the inputs
through); everywhere else, and outside the context, it is `layer(...)`.

On PyTorch it also replaces the products themselves. `torch.einsum` over a
Keras `EinsumDense` kernel permutes (and, for the query kernel `ndh`,
copies) the weights on every call, then runs a batched product: a Gemma 2 2B
decode step took 0.75 s in bfloat16 against transformers' 0.28 s. Here:

- `torch_kernel_layout(model)` stores every `EinsumDense` kernel output
  axes first, contracted axes last (`[out, in]`, the layout of
  `torch.nn.Linear`), behind a permuted view, so Keras still sees its own
  shapes and a checkpoint still saves and loads the same values;
- a dense layer then runs as one `F.linear` (oneDNN's bfloat16 kernels),
  and the tied output embedding as one `F.linear` over the table;
- a product of at most `_GEMV_ROWS` rows (a decode step) runs as a
  matrix-vector kernel that TorchInductor compiles once per shape: oneDNN's
  GEMV reads bfloat16 weights at about 17 GB/s on this 2-core machine, the
  compiled reduction at about 31 GB/s, near the memory's bandwidth. It is
  used only for weights of at least `COMPILED_GEMV_MIN_BYTES` (a first
  process pays about 30 s of compiling, which a tiny model never earns
  back; Inductor's disk cache makes later processes fast), and set with
  `KERAS_GEMMA2_TORCH_GEMV=compiled|eager`.

Greedy outputs are unchanged (tests/test_generation.py compares them with
transformers and KerasHub on every backend).
"""

import contextlib
import functools
import os
import threading

import keras

_state = threading.local()

# Rows (batch x new tokens) up to which the compiled GEMV beats `F.linear`,
# measured on the 2B's FFN kernel (9216 x 2304): one row in bfloat16 (25 vs
# 15 GB/s; at four rows oneDNN wins, 13.6 vs 8.4). Not float32: measured
# on a quiet machine by `benchmarks/gemv.py`, oneDNN's float32 GEMV matched
# or beat it at every Gemma matrix shape but 9216 x 2304.
_GEMV_ROWS = {"bfloat16": 1}
# Weights from which a bfloat16 matrix is worth the compiled GEMV (out x
# in): at 9216 x 2304 it read 39 against oneDNN's 29.5 GB/s, at 2048 x 2304
# they tied, and below (768 x 3072: 19.2 against 21.0) oneDNN won. int8 weights
# always take it: the alternative dequantizes the whole matrix every call.
_GEMV_MIN_WEIGHTS = 2**22
# Weights dequantized at a time by an int8 product of many rows.
_DEQUANTIZE_BLOCK = 2**24
# Weight bytes of a model from which the compiled GEMV pays for its compile.
COMPILED_GEMV_MIN_BYTES = 2**27


@contextlib.contextmanager
def direct_calls(compiled_gemv=False):
    """Within this context, `call` skips `Layer.__call__` where it may.

    Args:
        compiled_gemv: bool. On PyTorch, run decode-step products through
            the compiled matrix-vector kernel (see the module docstring).
    """
    previous = getattr(_state, "enabled", False), getattr(_state, "gemv", False)
    _state.enabled = True
    _state.gemv = compiled_gemv
    try:
        yield
    finally:
        _state.enabled, _state.gemv = previous


def call(layer, *args, **kwargs):
    """`layer(*args, **kwargs)`, or a direct call in `direct_calls()`."""
    if getattr(_state, "enabled", False):
        if _direct(layer):
            fast = _torch_product(layer, args, kwargs)
            if fast is not None:
                return fast
            return layer.call(*args, **kwargs)
        if _weight_only_int8(layer):
            fast = _torch_product(layer, args, kwargs)
            if fast is not None:
                return fast
    return layer(*args, **kwargs)


def _weight_only_int8(layer):
    """A built int8 layer without activation quantization, whose compute
    and variable dtypes agree (what `quantize("int8")` makes on torch)."""
    return (
        layer.built
        and layer.quantization_mode == "int8"
        and getattr(layer, "inputs_quantizer", None) is None
        and not getattr(layer, "lora_enabled", False)
        and layer.compute_dtype == layer.variable_dtype
    )


def _direct(layer):
    # The properties, not `layer.dtype_policy`: a layer loaded from a
    # quantized preset holds a `DTypePolicyMap`, which reports no
    # quantization itself; the properties resolve the layer's entry.
    return (
        layer.built
        and layer.quantization_mode is None
        and layer.compute_dtype == layer.variable_dtype
    )


def use_compiled_gemv(model):
    """Whether `model`'s decode steps should use the compiled GEMV."""
    choice = os.environ.get("KERAS_GEMMA2_TORCH_GEMV", "auto")
    if choice not in ("auto", "compiled", "eager"):
        raise ValueError(
            "KERAS_GEMMA2_TORCH_GEMV must be 'auto', 'compiled' or 'eager'. "
            f"Received: {choice!r}"
        )
    if choice != "auto":
        return choice == "compiled"
    weight_bytes = sum(
        v.value.numel() * v.value.element_size() for v in model.weights
    )
    return weight_bytes >= COMPILED_GEMV_MIN_BYTES


# --- PyTorch products -------------------------------------------------------


def _dense_spec(layer):
    """`(perm, in_size, out_shape, batch_rank)` of a plain `EinsumDense`.

    `perm` orders the kernel's axes output first, contracted last. `None`
    when the equation is not `batch + contracted, kernel -> batch + out` or
    the layer has a bias or LoRA (those keep Keras' own call).
    """
    if not isinstance(layer, keras.layers.EinsumDense):
        return None
    if layer.bias is not None or getattr(layer, "lora_enabled", False):
        return None
    return product_spec(layer)


def product_spec(layer):
    """`_dense_spec` of an `EinsumDense`'s equation alone (bias and LoRA
    aside): `None` when it is not a plain product."""
    spec = layer.__dict__.get("_keras_gemma2_dense_spec")
    if spec is not None:
        return spec or None
    spec = _parse_equation(layer.equation, tuple(layer._kernel.shape))
    layer.__dict__["_keras_gemma2_dense_spec"] = spec or False
    return spec


def kernel_2d(layer):
    """The kernel of a plain `EinsumDense` as a torch `[out, in]` matrix: a
    view in the layout of `torch_kernel_layout`, else a copy."""
    perm, in_size, _, _ = product_spec(layer)
    return layer._kernel.value.permute(perm).reshape(-1, in_size)


def _parse_equation(equation, kernel_shape):
    inputs, output = equation.split("->")
    x, kernel = inputs.split(",")
    contracted = [a for a in kernel if a not in output]
    outputs = [a for a in kernel if a in output]
    batch = x[: len(x) - len(contracted)]
    if (
        "." in equation
        or len(kernel) != len(kernel_shape)
        or x[len(batch) :] != "".join(contracted)
        or output != batch + "".join(outputs)
    ):
        return None
    perm = tuple(kernel.index(a) for a in outputs + contracted)
    in_size = 1
    for a in contracted:
        in_size *= kernel_shape[kernel.index(a)]
    out_shape = tuple(kernel_shape[kernel.index(a)] for a in outputs)
    return perm, in_size, out_shape, len(batch)


def _torch_product(layer, args, kwargs):
    """The fast PyTorch product for `layer`, or `None` to call it."""
    if not _is_torch():
        return None
    if getattr(layer, "_keras_gemma2_is_embedding", False):
        if kwargs.get("reverse") and len(args) == 1:
            return _logits(layer, args[0])
        return None
    if kwargs or len(args) != 1:
        return None
    spec = _dense_spec(layer)
    if spec is None:
        return None
    perm, in_size, out_shape, batch_rank = spec
    kernel = layer._kernel.value.permute(perm)
    if not kernel.is_contiguous():
        return None
    (x,) = args
    out_size = kernel.numel() // in_size
    scale = None
    if layer.quantization_mode == "int8":
        # Keras' weights are int8 / kernel_scale, one scale per output.
        scale = layer.kernel_scale.value.reshape(-1)
        if scale.numel() != out_size:
            return None
    y = _linear(x.reshape(-1, in_size), kernel.view(out_size, in_size), scale)
    return y.view(*x.shape[:batch_rank], *out_shape)


def _logits(embedding, x):
    """Tied logits `x @ table.T`, soft-capped as `ReversibleEmbedding` does."""
    # torch: an optional dependency, used on the PyTorch backend only
    import torch

    if not embedding.tie_weights or embedding.reverse_dtype is not None:
        return None
    scale = None
    if embedding.quantization_mode == "int8":
        table = embedding._embeddings.value
        scale = embedding.embeddings_scale.value.reshape(-1)
    else:
        table = embedding.embeddings.value
    logits = _linear(x.reshape(-1, x.shape[-1]), table, scale)
    logits = logits.view(*x.shape[:-1], table.shape[0])
    cap = embedding.logit_soft_cap
    if cap is not None:
        logits = torch.mul(torch.tanh(torch.div(logits, cap)), cap)
    return logits


def _linear(x, weight, scale=None):
    """`x @ weight.T` for `x` `[rows, in]` and `weight` `[out, in]`; an int8
    `weight` stands for `weight / scale` (`scale` `[out]`)."""
    # torch: an optional dependency, used on the PyTorch backend only
    import torch

    if getattr(_state, "gemv", False) and x.shape[0] <= _GEMV_ROWS.get(
        str(x.dtype).removeprefix("torch."), 0
    ):
        if scale is not None:
            return _compiled_gemv(scaled=True)(x, weight, scale)
        if weight.numel() >= _GEMV_MIN_WEIGHTS:
            return _compiled_gemv()(x, weight)
    if scale is None:
        return torch.nn.functional.linear(x, weight)
    # Rows of a prefill: dequantize, as Keras' weight-only int8 call does,
    # then oneDNN's GEMM; in blocks of outputs, so that the 9B's int8
    # embedding (256000 x 3584) is never whole in bfloat16 (1.8 GB).
    block = max(1, _DEQUANTIZE_BLOCK // weight.shape[1])
    scale = scale.to(x.dtype)
    outputs = [
        torch.nn.functional.linear(
            x, weight[i : i + block].to(x.dtype) / scale[i : i + block, None]
        )
        for i in range(0, weight.shape[0], block)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


@functools.cache
def _compiled_gemv(scaled=False):
    """The matrix-vector kernel, compiled once (per shape, by Dynamo).

    A reduction, not `F.linear`: Inductor turns it into one vectorized loop
    that streams the weights once, with float32 accumulation (as oneDNN's
    bfloat16 GEMM accumulates). `scaled`: over int8 weights, dequantized
    inside the kernel (one byte read a weight). Upstream gap: Keras' int8
    `EinsumDense` on torch either runs `torch.einsum` on int8 tensors (no
    CPU kernel: 0.39x the float32 speed) or, weight-only, dequantizes the
    whole kernel first.
    """
    # torch: an optional dependency, used on the PyTorch backend only
    import torch

    def gemv(x, weight, scale=None):
        sums = (x[:, None, :].float() * weight.float()).sum(-1)
        if scale is not None:
            sums = sums / scale.float()
        return sums.to(x.dtype)

    raise_recompile_limit()
    return torch.compile(gemv, dynamic=False)


def raise_recompile_limit():
    """One compile per matrix shape (and row count): a model has a dozen,
    past Dynamo's default limit of 8 per function (beyond which it warns
    and runs eagerly)."""
    # torch: an optional dependency, used on the PyTorch backend only
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)


def _is_torch():
    return keras.config.backend() == "torch"


def torch_kernel_layout(model):
    """Stores `model`'s `EinsumDense` kernels `[out, in]` on PyTorch.

    Each kernel variable keeps its Keras shape and values; only its memory
    order changes (the variable holds a permuted view of a contiguous
    `[out..., in...]` tensor). One kernel is copied at a time, so memory
    grows by at most the largest kernel. Idempotent; a no-op on other
    backends and for LoRA layers and quantized ones other than int8.
    """
    if not _is_torch():
        return
    # torch: an optional dependency, used on the PyTorch backend only
    import torch

    layers = list(model._flatten_layers(include_self=True))
    stale = []
    for layer in layers:
        if not layer.built or layer.quantization_mode not in (None, "int8"):
            continue
        spec = _dense_spec(layer)
        if spec is None:
            continue
        if not layer._kernel.value.permute(spec[0]).is_contiguous():
            stale.append((layer._kernel, spec[0]))
    if not stale:
        return
    # Freed as soon as its copy is made, not kept by a cached ParameterDict.
    drop_torch_params(layers)
    for variable, perm in stale:
        value = variable.value
        inverse = tuple(perm.index(axis) for axis in range(len(perm)))
        with torch.no_grad():
            stored = value.permute(perm).contiguous().permute(inverse)
        requires_grad = value.requires_grad
        del value
        variable._value = torch.nn.Parameter(
            stored, requires_grad=requires_grad
        )


def drop_torch_params(layers):
    """Drops the ParameterDict that Keras' torch layers cache (rebuilt on
    use), so that it does not keep replaced variable values alive."""
    if not _is_torch():
        return
    for layer in layers:
        layer._modules.pop("_torch_params", None)
        layer.__dict__.pop("_torch_params", None)
