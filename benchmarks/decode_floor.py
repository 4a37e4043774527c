"""The fastest a decode step of the small config can be here, in pure JAX.

    .venv/bin/python benchmarks/decode_floor.py

One batch-1 decode step of the generation benchmark's small config is, at
its core, 12 x (query, key, value, output, two gates, down) matrix-vector
products plus the 32000 x 768 logits product: every weight read once. This
script runs exactly those products (no attention, no norms) in a jitted
`fori_loop` and prints the steps/s: an upper bound for any Keras model of
that size on this machine, to read `benchmarks/generate.py`'s bandwidth
fractions against. Not a test.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = (
    12,
    768,
    8,
    4,
    64,
    3072,
    32000,
)
STEPS = 50


def main():
    rng = np.random.default_rng(0)

    def weight(*shape):
        # Distinct values, passed as arguments: XLA can neither fold nor
        # deduplicate them.
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.01)

    layers = [
        {
            "q": weight(HIDDEN, HEADS * HEAD_DIM),
            "k": weight(HIDDEN, KV_HEADS * HEAD_DIM),
            "v": weight(HIDDEN, KV_HEADS * HEAD_DIM),
            "o": weight(HEADS * HEAD_DIM, HIDDEN),
            "gate": weight(HIDDEN, FFN),
            "up": weight(HIDDEN, FFN),
            "down": weight(FFN, HIDDEN),
        }
        for _ in range(LAYERS)
    ]
    embedding = weight(VOCAB, HIDDEN)
    weight_bytes = 4 * (
        sum(w.size for layer in layers for w in layer.values()) + embedding.size
    )

    def step(layers, embedding, x):
        for w in layers:
            q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
            x = x + (q + jnp.tile(k + v, 2)) @ w["o"]
            x = x + (jax.nn.gelu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
        return x + (x @ embedding.T)[:, :HIDDEN] * 1e-6

    @jax.jit
    def run(layers, embedding, x):
        return jax.lax.fori_loop(
            0, STEPS, lambda i, x: step(layers, embedding, x), x
        )

    x = jnp.ones((1, HIDDEN))
    run(layers, embedding, x).block_until_ready()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run(layers, embedding, x).block_until_ready()
        times.append((time.perf_counter() - started) / STEPS)
    best = min(times)
    array = np.ones(2**28, np.float32)
    total = jax.jit(jnp.sum)
    device_array = jnp.asarray(array)
    total(device_array).block_until_ready()
    read = []
    for _ in range(5):
        started = time.perf_counter()
        total(device_array).block_until_ready()
        read.append(time.perf_counter() - started)
    bandwidth = array.nbytes / min(read)
    limit = bandwidth / weight_bytes
    print(
        f"weights {weight_bytes / 2**20:.0f} MiB; pure-JAX decode floor "
        f"{best * 1e3:.1f} ms/step = {1 / best:.1f} tokens/s; jitted sum "
        f"reads {bandwidth / 1e9:.1f} GB/s, limit {limit:.1f} tokens/s: the "
        f"floor is {1 / best / limit:.0%} of it"
    )


if __name__ == "__main__":
    main()
