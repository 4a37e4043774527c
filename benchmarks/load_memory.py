"""Peak memory while loading a sharded Hugging Face Gemma 2 checkpoint.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/load_memory.py [--layers 16]

Writes a random-weight Gemma 2 checkpoint of a few hundred million float32
parameters as safetensors shards (with its index and config.json), then loads
it in a fresh process each with keras_gemma2 (`Gemma2Backbone.from_preset`),
KerasHub (`GemmaBackbone.from_preset`, its transformers converter) and
transformers (`Gemma2ForCausalLM.from_pretrained`). For each it prints the
growth of resident memory while loading (peak RSS minus RSS before the load)
over the bytes of the finished model's weights: 1.0 is the floor, 2.0 means
a second copy of the model was held at some point. Target for ours: <= 1.25.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CONFIG = {
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "query_pre_attn_scalar": 128,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "torch_dtype": "float32",
    "tie_word_embeddings": True,
}


def _tensors(config, layer):
    d, f = config["hidden_size"], config["intermediate_size"]
    nh = config["num_attention_heads"] * config["head_dim"]
    kh = config["num_key_value_heads"] * config["head_dim"]
    p = f"model.layers.{layer}."
    return {
        p + "self_attn.q_proj.weight": (nh, d),
        p + "self_attn.k_proj.weight": (kh, d),
        p + "self_attn.v_proj.weight": (kh, d),
        p + "self_attn.o_proj.weight": (d, nh),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
        **{
            p + name + ".weight": (d,)
            for name in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            )
        },
    }


def write_checkpoint(folder, config):
    """One shard per 4 layers, each written and freed before the next."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    groups = [
        {
            "model.embed_tokens.weight": (
                config["vocab_size"],
                config["hidden_size"],
            ),
            "model.norm.weight": (config["hidden_size"],),
        }
    ]
    layers = config["num_hidden_layers"]
    for start in range(0, layers, 4):
        group = {}
        for layer in range(start, min(start + 4, layers)):
            group.update(_tensors(config, layer))
        groups.append(group)
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {
            key: rng.standard_normal(shape, dtype="float32") * 0.02
            for key, shape in group.items()
        }
        save_file(arrays, os.path.join(folder, name))
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({key: name for key in group})
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return total


_MEASURE = r"""
import math, os, sys, json
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
library, folder = sys.argv[1], sys.argv[2]
def warm_up():
    # Start the backend's runtime (thread pools, allocator) before measuring:
    # a fixed cost of the first operation, not of loading.
    import keras
    keras.ops.convert_to_numpy(keras.ops.ones((4, 4)) @ keras.ops.ones((4, 4)))
if library == "keras_gemma2":
    import keras_gemma2
    warm_up()
    before = status("VmRSS")
    model = keras_gemma2.Gemma2Backbone.from_preset(folder, dtype="float32")
    nbytes = sum(math.prod(w.shape) * 4 for w in model.weights)
elif library == "keras_hub":
    import keras_hub
    warm_up()
    before = status("VmRSS")
    model = keras_hub.models.GemmaBackbone.from_preset(folder, dtype="float32")
    nbytes = sum(math.prod(w.shape) * 4 for w in model.weights)
else:
    import torch, transformers
    before = status("VmRSS")
    model = transformers.Gemma2ForCausalLM.from_pretrained(
        folder, dtype=torch.float32)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
print(json.dumps({"before": before, "peak": status("VmHWM"), "model": nbytes}))
"""


def measure(library, folder):
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, library, folder],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if result.returncode != 0:
        return None, result.stderr.strip().splitlines()[-1:]
    return json.loads(result.stdout.strip().splitlines()[-1]), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    config = {**CONFIG, "num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory() as folder:
        size = write_checkpoint(folder, config)
        print(f"checkpoint: {size / 2**30:.2f} GiB, {size // 4:,} parameters")
        ratios = {}
        for library in ("keras_gemma2", "keras_hub", "transformers"):
            numbers, error = measure(library, folder)
            if numbers is None:
                print(f"{library:14s} failed: {error}")
                continue
            growth = numbers["peak"] - numbers["before"]
            ratios[library] = growth / numbers["model"]
            print(
                f"{library:14s} peak RSS growth {growth / 2**30:.2f} GiB / "
                f"model {numbers['model'] / 2**30:.2f} GiB = "
                f"{ratios[library]:.2f}"
            )
    if "keras_gemma2" in ratios:
        verdict = "meets" if ratios["keras_gemma2"] <= 1.25 else "misses"
        print(f"keras_gemma2 {verdict} the 1.25 target")
        for peer, ratio in ratios.items():
            if peer != "keras_gemma2":
                print(f"ours / {peer}: {ratios['keras_gemma2'] / ratio:.2f}")


if __name__ == "__main__":
    main()
