"""SLERP of task vectors, LITI, and WARP's chain of both, tensor by tensor."""

import os

import numpy as np

from keras_gemma2.merging.sources import run_merge

# Below this angle (radians) two task vectors count as parallel (or as
# antiparallel within it of pi) and SLERP falls back to linear
# interpolation, its limit.
_PARALLEL = 1e-6


def slerp(base, fine_tuned, t=None, output=None):
    """Merges the fine-tuned models' task vectors along the sphere.

    Per weight tensor, with `d_i = theta_i - theta_base` flattened:
    `slerp(d1, d2, t) = sin((1 - t) W) / sin(W) d1 + sin(t W) / sin(W) d2`
    with `W` the angle between `d1` and `d2`; the result is `theta_base +
    slerp(...)`. Where `W` is within 1e-6 of 0 or pi (parallel or opposite
    vectors), or either vector is zero (a tensor one model left
    unchanged), it falls back to linear interpolation `(1 - t) d1 + t d2`.
    Equal-norm task vectors merge to that norm; `t = 0` and `t = 1` give
    the first and the second model exactly.

    More than two models (WARP's iterative pairwise rule): with weights
    `w_1..w_M`, `d = d_1`, then for `i = 2..M`: `d = slerp(d, d_i, w_i /
    (w_1 + ... + w_i))`. Uniform weights (the default) give `t_i = 1 / i`.
    The order matters for M > 2 (SLERP is not associative).

    Args:
        base: the model the fine-tuning started from (or its EMA anchor):
            a Keras model, a preset folder or a dict of arrays.
        fine_tuned: list of models of the same kind and architecture.
        t: None (uniform weights), a float in [0, 1] for two models (the
            weight of the second), or one weight in [0, 1] per model,
            summing to 1.
        output: for models, None (a new model of `base`'s class) or a model
            to write into (`base` or a fine-tuned one, to save memory; not
            a LoRA model); for presets, the folder to write (required).

    Returns:
        The merged model, preset folder path or dict.

    Example:
    ```python
    base = {"w": np.zeros(2)}
    policy_1, policy_2 = {"w": np.array([1.0, 0.0])}, {"w": np.array([0, 1.0])}
    merged = keras_gemma2.merging.slerp(base, [policy_1, policy_2], t=0.5)
    # Unit task vectors at 90 degrees: the result stays on the unit circle.
    np.testing.assert_allclose(merged["w"], [0.5**0.5, 0.5**0.5])
    # Models (or preset folders) merge the same way, tensor by tensor:
    init = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    tuned = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.merging.slerp(init, [tuned, tuned], t=0.3, output=tuned)
    ```
    """
    fine_tuned = _as_list(fine_tuned)
    weights = _weights(t, len(fine_tuned))
    return run_merge(
        [base] + fine_tuned,
        output,
        lambda arrays: _slerp_tensor(arrays[0], arrays[1:], weights),
    )


def liti(init, merged, eta=0.5, output=None):
    """Moves the merged model back towards the initialisation.

    `theta = (1 - eta) theta_init + eta theta_merged`, per weight; `eta = 0`
    gives `init` and `eta = 1` gives `merged` exactly.

    Args:
        init: the initialisation (a model, preset folder or dict).
        merged: the merged model, of the same kind and architecture.
        eta: float in [0, 1].
        output: as in `slerp`.

    Example:
    ```python
    init = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    merged = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.merging.liti(init, merged, eta=0.3, output=merged)
    ```
    """
    eta = _unit("eta", eta)
    return run_merge(
        [init, merged],
        output,
        lambda arrays: _liti_tensor(arrays[0], arrays[1], eta),
    )


def warp(init, fine_tuned, t=None, eta=0.5, output=None):
    """WARP's merge: `liti(init, slerp(init, fine_tuned, t), eta)`.

    The task vectors are taken relative to `init`, the weights the
    fine-tuning started from (WARP's SFT initialisation), and the SLERP
    result is interpolated back towards `init`. Both stages run in one pass
    over the weights (one result in memory, one preset written). The EMA
    stage is `EMAAnchor`, used during fine-tuning. For WARP's iterations,
    pass the result as the next round's `init`.

    Args:
        init: the initialisation: a model, preset folder or dict.
        fine_tuned: list of fine-tuned models of the same kind.
        t: the SLERP weights, as in `slerp` (None: uniform).
        eta: float in [0, 1], as in `liti`.
        output: as in `slerp`.

    Example:
    ```python
    import os, tempfile
    folder = tempfile.mkdtemp()
    policy = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    policy.save_to_preset(os.path.join(folder, "policy_1"))
    policy.save_to_preset(os.path.join(folder, "policy_2"))
    keras_gemma2.merging.warp(
        "gemma2_tiny_en",
        [os.path.join(folder, "policy_1"), os.path.join(folder, "policy_2")],
        t=0.5,
        eta=0.5,
        output=os.path.join(folder, "merged"),
    )
    merged = keras_gemma2.Gemma2Backbone.from_preset(
        os.path.join(folder, "merged")
    )
    ```
    """
    fine_tuned = _as_list(fine_tuned)
    weights = _weights(t, len(fine_tuned))
    eta = _unit("eta", eta)

    def merge(arrays):
        return _liti_tensor(
            arrays[0],
            lambda: _slerp_tensor(arrays[0], arrays[1:], weights),
            eta,
        )

    return run_merge([init] + fine_tuned, output, merge)


# --- per-tensor arithmetic ---------------------------------------------


def _pair(d1, d2, t):
    """SLERP of two flat-or-not task vectors (same shape) at `t`."""
    n1 = np.sqrt(_dot(d1, d1))
    n2 = np.sqrt(_dot(d2, d2))
    if n1 == 0 or n2 == 0:
        omega = 0.0
    else:
        cos = np.clip(_dot(d1, d2) / (n1 * n2), -1.0, 1.0)
        omega = float(np.arccos(cos))
    if omega < _PARALLEL or np.pi - omega < _PARALLEL:
        return (1 - t) * d1 + t * d2
    sin = np.sin(omega)
    a = np.sin((1 - t) * omega) / sin
    b = np.sin(t * omega) / sin
    return a.astype(d1.dtype) * d1 + b.astype(d1.dtype) * d2


def _dot(a, b, chunk=1 << 22):
    """`a . b` accumulated in float64, a chunk at a time (bounded memory)."""
    a = a.reshape(-1)
    b = b.reshape(-1)
    return float(
        sum(
            np.dot(
                a[i : i + chunk].astype(np.float64),
                b[i : i + chunk].astype(np.float64),
            )
            for i in range(0, a.size, chunk)
        )
    )


def _slerp_tensor(base, getters, weights):
    """Merges one tensor; `getters` fetch the fine-tuned tensors lazily."""
    base = base()
    exact = 0  # the model the merged task vector equals exactly, if any
    first = getters[0]()
    delta = first - base
    total = weights[0]
    for i in range(1, len(getters)):
        total += weights[i]
        step = 0.0 if weights[i] == 0 else weights[i] / total
        if step == 0:
            continue  # the model has no weight: not even read
        theta = getters[i]()
        if step >= 1:
            delta, exact, first = theta - base, i, theta
        else:
            delta, exact = _pair(delta, theta - base, step), None
        del theta
    if exact is not None:
        return first
    return base + delta


def _liti_tensor(init, merged, eta):
    if eta == 0:
        return init()
    if eta == 1:
        return merged()
    return (1 - eta) * init() + eta * merged()


def _unit(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number in [0, 1]; got {value!r}."
        ) from None
    if not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be in [0, 1]; got {value!r}.")
    return value


def _as_list(fine_tuned):
    if isinstance(fine_tuned, (str, os.PathLike, dict)) or not isinstance(
        fine_tuned, (list, tuple)
    ):
        fine_tuned = [fine_tuned]
    fine_tuned = list(fine_tuned)
    if not fine_tuned:
        raise ValueError("`fine_tuned` is empty: give at least one model.")
    return fine_tuned


def _weights(t, count):
    if t is None:
        return [1.0 / count] * count
    if isinstance(t, (list, tuple, np.ndarray)):
        weights = [_unit("t", w) for w in t]
        if len(weights) != count:
            raise ValueError(
                f"`t` has {len(weights)} weights for {count} fine-tuned "
                "models; give one per model."
            )
        if abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"The weights `t` must sum to 1; got {t!r}.")
        return weights
    t = _unit("t", t)
    if count != 2:
        raise ValueError(
            f"A single `t` merges two models; got {count}. Give one weight "
            "per model (summing to 1), or None for uniform weights."
        )
    return [1.0 - t, t]
