"""Full-sequence forward pass: ours vs KerasHub's GemmaCausalLM vs transformers.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/forward.py [--repeats 5]

Builds the same random-weight Gemma 2 config in each library and prints
tokens/s for a scoring/prefill forward pass and the ratios ours/peer. Not a
test: numbers depend on the machine (this one: 2 CPU cores). Generation
speed and memory are measured by the generation benchmark of the speed issue.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gemma2  # noqa: E402

CONFIG = {
    "vocabulary_size": 32000,
    "num_layers": 6,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "hidden_dim": 512,
    "intermediate_dim": 2048,
    "head_dim": 64,
    "sliding_window_size": 128,
}


def _time(fn, repeats):
    fn()  # compile / warm up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def ours(inputs):
    lm = keras_gemma2.Gemma2CausalLM(
        keras_gemma2.Gemma2Backbone(**CONFIG), preprocessor=None
    )
    return lambda: lm.predict_on_batch(inputs)


def keras_hub_gemma(inputs):
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=CONFIG["vocabulary_size"],
        num_layers=CONFIG["num_layers"],
        num_query_heads=CONFIG["num_query_heads"],
        num_key_value_heads=CONFIG["num_key_value_heads"],
        hidden_dim=CONFIG["hidden_dim"],
        intermediate_dim=2 * CONFIG["intermediate_dim"],  # theirs is 2x
        head_dim=CONFIG["head_dim"],
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=30.0,
        attention_logit_soft_cap=50.0,
        use_sliding_window_attention=True,
        sliding_window_size=CONFIG["sliding_window_size"],
    )
    lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    return lambda: lm.predict_on_batch(inputs)


def transformers_gemma2(inputs):
    import torch
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=CONFIG["vocabulary_size"],
        hidden_size=CONFIG["hidden_dim"],
        intermediate_size=CONFIG["intermediate_dim"],
        num_hidden_layers=CONFIG["num_layers"],
        num_attention_heads=CONFIG["num_query_heads"],
        num_key_value_heads=CONFIG["num_key_value_heads"],
        head_dim=CONFIG["head_dim"],
        query_pre_attn_scalar=CONFIG["head_dim"],
        sliding_window=CONFIG["sliding_window_size"],
    )
    config._attn_implementation = "eager"  # SDPA would drop the soft cap
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.as_tensor(inputs["token_ids"], dtype=torch.long)

    def run():
        with torch.no_grad():
            model(input_ids=ids)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.length)
    inputs = {
        "token_ids": rng.integers(4, CONFIG["vocabulary_size"], shape).astype(
            "int32"
        ),
        "padding_mask": np.ones(shape, "int32"),
    }
    tokens = args.batch_size * args.length
    print(f"backend {keras.config.backend()}, batch {shape}, config {CONFIG}")
    results = {}
    for name, build in (
        ("keras_gemma2", ours),
        ("keras_hub", keras_hub_gemma),
        ("transformers (torch eager)", transformers_gemma2),
    ):
        seconds = _time(build(inputs), args.repeats)
        results[name] = tokens / seconds
        print(f"{name:28s} {results[name]:10.0f} tokens/s")
    for name, speed in results.items():
        if name != "keras_gemma2":
            ratio = results["keras_gemma2"] / speed
            print(f"ours / {name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
