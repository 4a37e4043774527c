"""Direct layer calls for eager decoding on PyTorch.

Keras' `Layer.__call__` does per-call bookkeeping (argument binding, input
conversion, masking, autocast scopes) that costs ~40 us a call on PyTorch,
where nothing is compiled: about 200 sublayer calls make it a third of a
decode step of a 12-layer model. Inside `direct_calls()`, `call(layer, ...)`
goes straight to `layer.call` for built, unquantized layers whose compute
and variable dtypes agree (where `__call__` would only pass the inputs
through); everywhere else, and outside the context, it is `layer(...)`.
Outputs are bit-identical (tests/test_generation.py).
"""

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def direct_calls():
    """Within this context, `call` skips `Layer.__call__` where it may."""
    previous = getattr(_state, "enabled", False)
    _state.enabled = True
    try:
        yield
    finally:
        _state.enabled = previous


def call(layer, *args, **kwargs):
    """`layer(*args, **kwargs)`, or `layer.call(...)` in `direct_calls()`."""
    if getattr(_state, "enabled", False) and _direct(layer):
        return layer.call(*args, **kwargs)
    return layer(*args, **kwargs)


def _direct(layer):
    # The properties, not `layer.dtype_policy`: a layer loaded from a
    # quantized preset holds a `DTypePolicyMap`, which reports no
    # quantization itself; the properties resolve the layer's entry.
    return (
        layer.built
        and layer.quantization_mode is None
        and layer.compute_dtype == layer.variable_dtype
    )
