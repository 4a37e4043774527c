"""Run in a subprocess by test_distribution.py: 8 virtual CPU devices, JAX.

Prints one JSON line of measurements; the test asserts on them. The 2 x 4
mesh takes `Gemma2Backbone.get_layout_map(mesh)` as KerasHub users call it,
with no architecture: the map must find each weight's shape by itself.
"""

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gemma2  # noqa: E402
from keras_gemma2.distribution import get_layout_map  # noqa: E402
from keras_gemma2.distribution import kv_cache_layout  # noqa: E402
from keras_gemma2.distribution import plan_layouts  # noqa: E402
from tests import references  # noqa: E402

KWARGS = {**references.TINY_KWARGS, "dtype": "float32"}  # 2 kv heads


def build(weights):
    backbone = keras_gemma2.Gemma2Backbone(**KWARGS)
    backbone.set_weights(weights)
    return keras_gemma2.Gemma2CausalLM(backbone)


def run(lm, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    logits = keras.ops.convert_to_numpy(lm(inputs))
    prompt = {
        "token_ids": np.pad(token_ids[:, :4], [(0, 0), (0, 6)]),
        "padding_mask": np.pad(
            np.ones_like(token_ids[:, :4]), [(0, 0), (0, 6)]
        ),
    }
    generated = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    lm.backbone.enable_lora(rank=2)
    for w in lm.backbone.weights:  # the same adapters in every run
        if "lora_kernel" in w.path:
            values = np.linspace(-0.1, 0.1, int(np.prod(w.shape)))
            w.assign(values.reshape(w.shape).astype("float32"))
    lm.compile(optimizer=keras.optimizers.SGD(0.1))
    labels = np.roll(token_ids, -1, axis=1)
    losses = [
        float(lm.train_on_batch(inputs, labels, return_dict=True)["loss"])
        for _ in range(2)
    ]
    return logits, generated, losses


def shardings(lm, mesh_shape):
    """Each weight's sharded axes as placed, and as the plan says."""
    plan = plan_layouts(KWARGS, mesh_shape[1])
    placed, planned = {}, {}
    for w in lm.backbone.weights:
        if "lora" in w.path:
            continue
        spec = tuple(w.value.sharding.spec)
        spec = spec + (None,) * (len(w.shape) - len(spec))
        placed[w.path] = [i for i, a in enumerate(spec) if a == "model"]
        expected = []
        for pattern, (_, axis) in plan.items():
            if w.path.endswith(pattern) and axis is not None:
                expected = [axis]
        planned[w.path] = expected
    return placed, planned


def unsharded_matrices(lm):
    """Paths of the embedding and kernels that the model axis leaves whole."""
    return [
        w.path
        for w in lm.backbone.weights
        if len(w.shape) >= 2
        and "lora" not in w.path
        and "model" not in tuple(w.value.sharding.spec)
    ]


def undividable_error():
    """What building the tiny model on a 7-device model axis raises."""
    mesh = keras.distribution.DeviceMesh(
        (1, 7), ("batch", "model"), keras.distribution.list_devices()[:7]
    )
    layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(mesh)
    parallel = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    try:
        with parallel.scope():
            keras_gemma2.Gemma2Backbone(**KWARGS)
    except Exception as error:  # the test asserts on its type and text
        return {"type": type(error).__name__, "message": str(error)}
    return None


def main():
    assert len(keras.distribution.list_devices()) == 8
    token_ids = references.random_token_ids(batch=2, length=9, seed=5)
    keras.utils.set_random_seed(0)
    weights = keras_gemma2.Gemma2Backbone(**KWARGS).get_weights()
    single = run(build(weights), token_ids)
    report = {}
    # No architecture on 2 x 4 (the KerasHub call); the tiny one on 1 x 8.
    for mesh_shape, architecture in (((2, 4), None), ((1, 8), KWARGS)):
        mesh = keras.distribution.DeviceMesh(
            mesh_shape, ("batch", "model"), keras.distribution.list_devices()
        )
        if architecture is None:
            layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(mesh)
        else:
            layout_map = get_layout_map(architecture, mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        with distribution.scope():
            lm = build(weights)
            placed, planned = shardings(lm, mesh_shape)
            unsharded = unsharded_matrices(lm)
            logits, generated, losses = run(lm, token_ids)
        report[str(mesh_shape)] = {
            "logits_diff": float(np.abs(logits - single[0]).max()),
            "same_generation": bool((generated == single[1]).all()),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, single[2])),
            "losses": losses,
            "placed_as_planned": placed == planned,
            "sharded_weights": sum(bool(v) for v in placed.values()),
            "unsharded_matrices": unsharded,
            "cache_axes": list(kv_cache_layout(KWARGS, mesh).axes),
        }
    data_parallel = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()[:2]
    )
    with data_parallel.scope():
        _, _, losses = run(build(weights), token_ids)
    report["data_parallel"] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, single[2]))
    }
    report["undividable"] = undividable_error()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
