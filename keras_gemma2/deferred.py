"""Building models without allocating their weights, then filling them.

Keras creates variables inside a `keras.StatelessScope(initialize_variables=
False)` with deferred initializers and keeps them in a global list that the
next stateless scope to close would initialise. `deferred_variables()` takes
ours off that list; `initialize()` then gives each one its value directly, so
a loaded checkpoint never sits beside a random initialisation of the same
model. These are Keras internals (3.15): they are kept to this one module.
"""

import contextlib

import keras
from keras.src.backend.common import global_state

_PENDING = "uninitialized_variables"


@contextlib.contextmanager
def deferred_variables():
    """Yields a list that ends up holding the variables created inside.

    Example:
    ```python
    from keras_gemma2 import deferred
    with deferred.deferred_variables() as created:
        layer = keras.layers.Dense(4)
        layer.build((None, 3))
    for variable in created:
        deferred.initialize(variable)
    ```
    """
    before = list(global_state.get_global_attribute(_PENDING) or [])
    known = {id(v) for v in before}
    created = []
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield created
    finally:
        pending = global_state.get_global_attribute(_PENDING) or []
        created.extend(v for v in pending if id(v) not in known)
        global_state.set_global_attribute(_PENDING, before)


def initialize(variable, value=None):
    """Gives a deferred variable `value` (numpy), or its own initializer's."""
    if value is not None:
        variable._initializer = lambda shape, dtype: value
    variable._deferred_initialize()
