"""Generation speed and memory: ours vs KerasHub GemmaCausalLM vs transformers.

    .venv/bin/python benchmarks/generate.py [--backends jax,tensorflow,torch]
        [--configs small,long,prefill-8k] [--batches 1,4]
        [--libraries ours,ours-compiled,keras_hub,transformers]
        [--dtypes float32,bfloat16,int8] [--repeats 2] [--quick]
        [--json OUT.json] [--write-readme README.md] [--threads N]
        [--timeout SECONDS]

Builds the same random-weight Gemma 2 architecture (12 layers, hidden 768,
8 query / 4 key-value heads of 64, FFN 3072 per gate, vocabulary 32000,
sliding window 256, soft caps 50/30) in keras_gemma2
(`Gemma2CausalLM`), KerasHub (`GemmaCausalLM` with its Gemma 2 flags; its
`intermediate_dim` is twice ours) and transformers (`Gemma2ForCausalLM`,
eager attention: SDPA would drop the attention soft cap), and generates
greedily from random prompts (`<bos>` then ids >= 4) without ever stopping
early:

- small: batch 1 and 4 (`--batches`), prompt 128, 128 new tokens;
- long: batch 1, prompt 1024, 256 new tokens;
- prefill-8k: batch 1, prompt 8192, 1 new token; only time to first token
  and peak memory, for ours (chunked attention, bounded memory) and KerasHub
  (which materialises heads x 8192 x 8192 attention scores); transformers is
  skipped.

Each run holds its weights in one of `--dtypes` (default `float32`):

- float32: weights and compute in float32 (the only dtype before
  `--dtypes` existed; unchanged);
- bfloat16: weights and compute in bfloat16: ours
  `Gemma2Backbone(..., dtype="bfloat16")`, KerasHub
  `GemmaBackbone(..., dtype="bfloat16")`, transformers the model
  `.to(torch.bfloat16)`. On JAX and TensorFlow with only a CPU our backbone
  deliberately holds a bfloat16 model in float32 (XLA:CPU kept float32
  copies of bfloat16 weights): the "held" column shows the dtypes of the
  variables really held, most bytes first (the worker also records
  `backbone.dtype_policy.name`, or the torch model's dtype, as
  `held_dtype`), and a note names each such run;
- int8: ours and KerasHub built in bfloat16 as above, then
  `lm.quantize("int8")` (int8 matrices with float scales; the run fails
  if no layer came out quantized). transformers is skipped: it has no CPU
  int8 without extra libraries (bitsandbytes, optimum-quanto, torchao).

Ours and KerasHub run on each Keras backend given; transformers runs once
(PyTorch). On TensorFlow, KerasHub also runs with `jit_compile=False` as the
row "keras_hub (no XLA)"; the other TensorFlow rows set `jit_compile=True`
explicitly, because Keras resolves the default `"auto"` to no XLA on a
machine without accelerators.

Every measurement runs in a fresh subprocess (this script re-invoked with
`--worker SPEC` and `KERAS_BACKEND` set), so peak memory is per library. The
worker builds the model, then measures:

- first_call_s: the first full generate call (prompt, N new tokens), i.e.
  compilation plus one run;
- T1: a generate with 1 new token (time to first token, prefill included)
  and TN: a generate with N new tokens, each the best of `--repeats` after
  both shapes were warmed up. prefill tokens/s = batch * prompt / T1;
  decode tokens/s = batch * (N - 1) / (TN - T1). KerasHub's generate takes
  the prompt right-padded to its total length and prefills over all of it,
  so for KerasHub TN - T1 also contains a prefill over the N - 1 extra
  positions: a cost its generate really pays;
- kv_cache_mib: ours, the tensors of `backbone.init_cache(batch, length)`
  for the length its generate allocates (prompt + N rounded up to its
  compile bucket; local layers hold only their window); KerasHub, its one
  `[batch, layers, 2, prompt + N, kv_heads, head_dim]` cache (the shape
  `GemmaCausalLM._build_cache` makes, from that formula: calling it would
  run an extra eager prefill); transformers, the tensors left in the cache
  returned by `generate(..., return_dict_in_generate=True)`;
- peak RSS (`ru_maxrss`) at the end, and RSS after building.

The parent measures this machine's memory-read bandwidth once (best of 5
sums of a 1 GiB float32 array: numpy, numpy over one thread per core, and a
jitted `jax.numpy.sum`; the fastest counts). Decoding reads every weight once
per step, so the bandwidth limit is batch * bandwidth / weight bytes tokens/s,
where weight bytes (`weight_bytes`, the "weights MiB" column) is what the
worker finds in the model it built: the element bytes summed over
`backbone.weights` (Keras; int8 matrices count 1 byte per element plus
their scales) or `p.numel() * p.element_size()` over the parameters
(transformers), the tied embedding counted once. The table gives decode
speed as a fraction of that limit. Then it prints ratios, each between rows
of the same dtype: ours/KerasHub and ours/transformers decode speed,
long/small and batch 4/batch 1 decode speed, first-call time ours/KerasHub,
the 8k prefill's peak memory; and, per library and backend, decode speed
in bfloat16 and int8 over float32 (same config and batch).

`--quick` runs a tiny model (2 layers, hidden 64, vocabulary 512, window 8;
prompt 16 with 8 new tokens, long 64 + 16, prefill 256) as a smoke test: its
timings are mostly overhead and noise (its weights fit in cache, so it can
even beat the bandwidth limit). `--threads` sets `torch.set_num_threads`
for the PyTorch runs (default: all cores); `--timeout` abandons a worker.
`--write-readme README.md` replaces the block between
`<!-- generate-benchmark:start -->` and `<!-- generate-benchmark:end -->`
with a Markdown table, the command, date, machine and library versions.
A worker that fails (out of memory, a library error) becomes an error row.
Not a test: numbers depend on the machine.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from _common import find as _find  # noqa: E402
from _common import names as _names  # noqa: E402
from _common import peak_rss_mib as _peak_rss_mib  # noqa: E402
from _common import rss_now_mib as _rss_now_mib  # noqa: E402
from _common import timed as _timed  # noqa: E402

MODEL = {
    "vocabulary_size": 32000,
    "num_layers": 12,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "hidden_dim": 768,
    "intermediate_dim": 3072,
    "head_dim": 64,
    "query_pre_attn_scalar": 64,
    "sliding_window_size": 256,
    "attention_logit_soft_cap": 50.0,
    "final_logit_soft_cap": 30.0,
}
QUICK_MODEL = {
    **MODEL,
    "vocabulary_size": 512,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window_size": 8,
}
# name: (prompt, new tokens, batches or None for --batches, prefill only)
CONFIGS = {
    "small": (128, 128, None, False),
    "long": (1024, 256, (1,), False),
    "prefill-8k": (8192, 1, (1,), True),
}
QUICK_CONFIGS = {
    "small": (16, 8, None, False),
    "long": (64, 16, (1,), False),
    "prefill-8k": (256, 1, (1,), True),
}
BACKENDS = ("jax", "tensorflow", "torch")
LIBRARIES = ("ours", "ours-compiled", "keras_hub", "transformers")
# Ours on PyTorch with `compile(jit_compile=True)`: the torch.compile'd
# decode step (JAX and TensorFlow always compile).
COMPILED = "ours (torch.compile)"
DTYPES = ("float32", "bfloat16", "int8")
VERSION_PACKAGES = (
    "keras",
    "keras-hub",
    "transformers",
    "jax",
    "tensorflow",
    "torch",
)
MARK_START = "<!-- generate-benchmark:start -->"
MARK_END = "<!-- generate-benchmark:end -->"
MIB = 2**20


# --- worker ----------------------------------------------------------------


def _prompts(spec):
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    shape = (spec["batch"], spec["prompt"])
    vocabulary = spec["model"]["vocabulary_size"]
    token_ids = rng.integers(4, vocabulary, shape).astype("int32")
    token_ids[:, 0] = 2  # <bos>
    return token_ids


def _itemsize(dtype):
    """Bytes per element of a dtype name (bfloat16 through ml_dtypes)."""
    import numpy as np

    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype)).itemsize


def _tensor_bytes(tensor):
    import numpy as np

    if hasattr(tensor, "element_size") and hasattr(tensor, "numel"):
        return int(tensor.element_size() * tensor.numel())  # torch
    import keras

    size = int(np.prod([int(d) for d in keras.ops.shape(tensor)]))
    return size * _itemsize(keras.backend.standardize_dtype(tensor.dtype))


def _keras_weights(backbone):
    """Bytes held by `backbone.weights`, in all and by dtype."""
    by_dtype = {}
    for variable in backbone.weights:
        dtype = str(variable.dtype).removeprefix("torch.")
        by_dtype[dtype] = by_dtype.get(dtype, 0) + _tensor_bytes(variable)
    return {
        "held_dtype": backbone.dtype_policy.name,
        "weight_bytes": sum(by_dtype.values()),
        "weight_bytes_by_dtype": by_dtype,
    }


def _keras_dtype(spec):
    """The `dtype` to build a Keras backbone with (int8: bfloat16 first)."""
    return {"float32": None, "bfloat16": "bfloat16", "int8": "bfloat16"}[
        spec["dtype"]
    ]


def _quantize(lm, spec):
    """`lm.quantize("int8")` for an int8 spec; fails if nothing was."""
    if spec["dtype"] != "int8":
        return
    lm.quantize("int8")
    quantized = sum(
        1
        for layer in lm.backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None) == "int8"
    )
    if not quantized:
        raise RuntimeError('quantize("int8") left no layer quantized')


def _build_ours(spec, token_ids):
    import keras
    import numpy as np

    import keras_gemma2
    from keras_gemma2 import generation

    dtype = _keras_dtype(spec)
    backbone = keras_gemma2.Gemma2Backbone(
        **spec["model"], **({} if dtype is None else {"dtype": dtype})
    )
    lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor=None)
    params = lm.count_params()
    _quantize(lm, spec)
    jit = spec.get("jit_compile")
    lm.compile(
        sampler="greedy", **({} if jit is None else {"jit_compile": jit})
    )
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}

    def generate(new):
        out = lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)
        return out["token_ids"], out["padding_mask"]

    def kv_cache():
        total = spec["prompt"] + spec["new"]
        bucket = getattr(generation, "bucket_length", lambda n: n)(total)
        caches = {}
        for name, length in (("", bucket), ("_exact", total)):
            cache = lm.backbone.init_cache(spec["batch"], length)
            caches["kv_cache_bytes" + name] = sum(
                _tensor_bytes(t) for layer in cache for t in layer
            )
            del cache
        note = f"init_cache(batch, {bucket})"
        if bucket != total:
            note += f": generate's bucket for {total} positions"
        return {**caches, "kv_cache_note": note}

    return {
        "generate": generate,
        "kv_cache": kv_cache,
        "params": params,
        "jit_compile": getattr(lm, "jit_compile", None),
        "keras_backend": keras.config.backend(),
        **_keras_weights(lm.backbone),
    }


def _build_keras_hub(spec, token_ids):
    import keras
    import keras_hub
    import numpy as np

    model = spec["model"]
    dtype = _keras_dtype(spec)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=model["vocabulary_size"],
        num_layers=model["num_layers"],
        num_query_heads=model["num_query_heads"],
        num_key_value_heads=model["num_key_value_heads"],
        hidden_dim=model["hidden_dim"],
        intermediate_dim=2 * model["intermediate_dim"],  # theirs is 2x
        head_dim=model["head_dim"],
        # Scales queries by 1/sqrt(head_dim) = 1/sqrt(query_pre_attn_scalar).
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=model["final_logit_soft_cap"],
        attention_logit_soft_cap=model["attention_logit_soft_cap"],
        use_sliding_window_attention=True,
        sliding_window_size=model["sliding_window_size"],
        **({} if dtype is None else {"dtype": dtype}),
    )
    lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    params = lm.count_params()
    _quantize(lm, spec)
    jit = spec.get("jit_compile")
    lm.compile(
        sampler="greedy", **({} if jit is None else {"jit_compile": jit})
    )
    batch, prompt = token_ids.shape

    def generate(new):
        # Without a preprocessor KerasHub ignores `max_length`: the total
        # length is that of the right-padded `token_ids`.
        inputs = {
            "token_ids": np.pad(token_ids, [(0, 0), (0, new)]),
            "padding_mask": np.pad(np.ones_like(token_ids), [(0, 0), (0, new)]),
        }
        out = lm.generate(inputs, stop_token_ids=None)
        return out["token_ids"], out["padding_mask"]

    def kv_cache():
        # The shape GemmaCausalLM._build_cache allocates.
        shape = (
            batch,
            model["num_layers"],
            2,
            prompt + spec["new"],
            model["num_key_value_heads"],
            model["head_dim"],
        )
        size = int(np.prod(shape)) * _itemsize(lm.compute_dtype)
        return {
            "kv_cache_bytes": size,
            "kv_cache_note": f"formula of _build_cache: {list(shape)}",
        }

    return {
        "generate": generate,
        "kv_cache": kv_cache,
        "params": params,
        "jit_compile": getattr(lm, "jit_compile", None),
        "keras_backend": keras.config.backend(),
        **_keras_weights(lm.backbone),
    }


def _cache_tensors(cache):
    """The key/value tensors of a transformers cache, whatever its API."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: Cache.layers[i].keys
        return [
            t
            for layer in layers
            for t in (getattr(layer, "keys", None), layer.values)
            if t is not None and not callable(t)
        ]
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return list(cache.key_cache) + list(cache.value_cache)
    if isinstance(cache, (tuple, list)):  # legacy tuples of tuples
        return [t for layer in cache for t in layer if t is not None]
    raise TypeError(f"Unknown cache type {type(cache).__name__}")


def _build_transformers(spec, token_ids):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    model = spec["model"]
    config = transformers.Gemma2Config(
        vocab_size=model["vocabulary_size"],
        hidden_size=model["hidden_dim"],
        intermediate_size=model["intermediate_dim"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_query_heads"],
        num_key_value_heads=model["num_key_value_heads"],
        head_dim=model["head_dim"],
        query_pre_attn_scalar=model["query_pre_attn_scalar"],
        sliding_window=model["sliding_window_size"],
        attn_logit_softcapping=model["attention_logit_soft_cap"],
        final_logit_softcapping=model["final_logit_soft_cap"],
        max_position_embeddings=max(8192, spec["prompt"] + spec["new"]),
    )
    config._attn_implementation = "eager"  # SDPA would drop the soft cap
    lm = transformers.Gemma2ForCausalLM(config).eval()
    if spec["dtype"] == "bfloat16":
        lm = lm.to(torch.bfloat16)
    elif spec["dtype"] != "float32":
        raise ValueError(f"transformers: no CPU {spec['dtype']} here")
    # Never stop early: no end token, and at least `new` tokens anyway.
    lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = 0
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(new, **kwargs):
        with torch.no_grad():
            return lm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                **kwargs,
            )

    def generate(new):
        out = run(new).numpy()
        return out, None

    def kv_cache():
        out = run(spec["new"], return_dict_in_generate=True)
        cache = getattr(out, "past_key_values", None)
        if cache is None:
            cache = getattr(out, "cache", None)  # renamed in transformers 5
        tensors = _cache_tensors(cache)
        return {
            "kv_cache_bytes": sum(_tensor_bytes(t) for t in tensors),
            "kv_cache_note": f"{type(cache).__name__} after generate",
        }

    by_dtype = {}
    for p in lm.parameters():  # shared (tied) parameters once
        dtype = str(p.dtype).removeprefix("torch.")
        by_dtype[dtype] = by_dtype.get(dtype, 0) + _tensor_bytes(p)
    return {
        "generate": generate,
        "kv_cache": kv_cache,
        "params": sum(p.numel() for p in lm.parameters()),
        "jit_compile": None,
        "keras_backend": None,
        "held_dtype": str(lm.dtype).removeprefix("torch."),
        "weight_bytes": sum(by_dtype.values()),
        "weight_bytes_by_dtype": by_dtype,
    }


BUILDERS = {
    "ours": _build_ours,
    "keras_hub": _build_keras_hub,
    "transformers": _build_transformers,
}


def _check(spec, new, token_ids, padding_mask):
    """Every row must hold prompt + `new` tokens: nothing stopped early."""
    expected = (spec["batch"], spec["prompt"] + new)
    if tuple(token_ids.shape) != expected:
        raise RuntimeError(
            f"generate returned shape {tuple(token_ids.shape)}, expected "
            f"{expected}"
        )
    if padding_mask is not None and not padding_mask.all():
        raise RuntimeError("generate stopped early (padding_mask has zeros)")


def run_worker(spec):
    """Measures one library on one config; returns the result dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if spec["library"] == "transformers" or spec["backend"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(spec["seed"])
    if spec["library"] != "transformers":
        import keras

        keras.utils.set_random_seed(spec["seed"])
    token_ids = _prompts(spec)
    # Import the library first: RSS after building minus this is the model.
    __import__(
        {"ours": "keras_gemma2", "keras_hub": "keras_hub"}.get(
            spec["library"], spec["library"]
        )
    )
    rss_start = _rss_now_mib()
    model = BUILDERS[spec["library"]](spec, token_ids)
    rss_built = _rss_now_mib()
    generate, new = model["generate"], spec["new"]

    first_call_s, (ids, mask) = _timed(generate, new)
    _check(spec, new, ids, mask)
    result = {
        "params": int(model["params"]),
        "jit_compile": model["jit_compile"],
        "keras_backend": model["keras_backend"],
        "held_dtype": model["held_dtype"],
        "weight_bytes": int(model["weight_bytes"]),
        "weight_bytes_by_dtype": model["weight_bytes_by_dtype"],
        "rss_start_mib": rss_start,
        "rss_built_mib": rss_built,
        "first_call_s": first_call_s,
    }
    if new > 1:
        result["first_call_1_token_s"], (ids, mask) = _timed(generate, 1)
        _check(spec, 1, ids, mask)
    t1 = min(_timed(generate, 1)[0] for _ in range(spec["repeats"]))
    result["ttft_s"] = t1
    result["prefill_tok_s"] = spec["batch"] * spec["prompt"] / t1
    if new > 1:
        tn = min(_timed(generate, new)[0] for _ in range(spec["repeats"]))
        result["generate_s"] = tn
        result["decode_tok_s"] = (
            spec["batch"] * (new - 1) / (tn - t1) if tn > t1 else None
        )
    result.update(model["kv_cache"]())
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def _best_time(fn, repeats=5):
    fn()  # warm up (and compile)
    return min(_timed(fn)[0] for _ in range(repeats))


def _numpy_sum_times(array):
    import concurrent.futures

    import numpy as np

    times = {"numpy": _best_time(lambda: float(array.sum()))}
    threads = os.cpu_count() or 1
    if threads > 1:
        parts = np.array_split(array, threads)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            times[f"numpy x{threads} threads"] = _best_time(
                lambda: sum(pool.map(np.sum, parts))
            )
    return times


def _jax_sum_time(array):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    device_array = jnp.asarray(array)
    total = jax.jit(jnp.sum)
    return {"jax": _best_time(lambda: total(device_array).block_until_ready())}


def measure_bandwidth():
    """Bytes/s read when summing a 1 GiB float32 array (best of methods)."""
    import numpy as np

    array = np.ones(2**28, "float32")
    times = _numpy_sum_times(array)
    times.update(_jax_sum_time(array))
    rates = {name: array.nbytes / t for name, t in times.items()}
    name = max(rates, key=rates.get)
    return {"bytes_per_s": rates[name], "method": name, "all": rates}


# --- parent ----------------------------------------------------------------


def _plan(args):
    """(config, batch, dtype, label, library, backend, jit_compile) runs."""
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    runs = []
    for name in args.configs:
        prompt, new, batches, prefill_only = configs[name]
        for batch in batches or args.batches:
            for dtype in args.dtypes:
                run = (name, batch, dtype)
                for backend in args.backends:
                    for library in ("ours", "keras_hub"):
                        if library not in args.libraries:
                            continue
                        jit = True if backend == "tensorflow" else None
                        runs.append(run + (library, library, backend, jit))
                        if backend == "tensorflow" and library == "keras_hub":
                            label = "keras_hub (no XLA)"
                            runs.append(run + (label, library, backend, False))
                    if backend == "torch" and "ours-compiled" in args.libraries:
                        runs.append(run + (COMPILED, "ours", backend, True))
                # transformers: no CPU int8 without extra libraries.
                hf = "transformers"
                if hf not in args.libraries or prefill_only:
                    continue
                if dtype != "int8":
                    runs.append(run + (hf, hf, "torch", None))
    return configs, runs


def run_all(args):
    configs, runs = _plan(args)
    model = QUICK_MODEL if args.quick else MODEL
    print(f"measuring memory bandwidth ({os.cpu_count()} cores) ...")
    bandwidth = _common.spawn_worker(
        __file__, {"bandwidth": True}, None, args.timeout
    )
    if "error" in bandwidth:
        print(f"  bandwidth failed: {bandwidth['error']}")
    else:
        rate = bandwidth["bytes_per_s"] / 1e9
        print(f"  {rate:.1f} GB/s ({bandwidth['method']})")
    results = []
    for name, batch, dtype, label, library, backend, jit in runs:
        prompt, new, _, _ = configs[name]
        spec = {
            "library": library,
            "backend": backend,
            "dtype": dtype,
            "jit_compile": jit,
            "model": model,
            "batch": batch,
            "prompt": prompt,
            "new": new,
            "repeats": args.repeats,
            "threads": args.threads,
            "seed": 0,
        }
        print(f"{name} b{batch} {dtype} {label} {backend} ...", flush=True)
        started = time.perf_counter()
        keras_backend = None if library == "transformers" else backend
        row = _common.spawn_worker(__file__, spec, keras_backend, args.timeout)
        row.update(
            config=name,
            batch=batch,
            dtype=dtype,
            library=label,
            backend=backend,
            prompt=prompt,
            new_tokens=new,
            wall_s=time.perf_counter() - started,
        )
        if row.get("weight_bytes") and "error" not in bandwidth:
            # The bytes of what the worker's model really held.
            limit = batch * bandwidth["bytes_per_s"] / row["weight_bytes"]
            row["bandwidth_limit_tok_s"] = limit
            if row.get("decode_tok_s"):
                row["bandwidth_fraction"] = row["decode_tok_s"] / limit
        if "error" in row:
            print(f"  error: {row['error']}")
        results.append(row)
    return {
        "command": _common.command(__file__),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "bandwidth": bandwidth,
        },
        "versions": _common.versions(VERSION_PACKAGES),
        "model": model,
        "configs": {n: configs[n] for n in args.configs},
        "dtypes": args.dtypes,
        "libraries": args.libraries,
        "repeats": args.repeats,
        "results": results,
    }


COLUMNS = (
    ("config", "config"),
    ("batch", "batch"),
    ("dtype", "dtype"),
    ("library", "library"),
    ("backend", "backend"),
    ("prompt+new", "tokens"),
    ("held", "held"),
    ("weights MiB", "weight_bytes"),
    ("first call s", "first_call_s"),
    ("TTFT s", "ttft_s"),
    ("prefill tok/s", "prefill_tok_s"),
    ("decode tok/s", "decode_tok_s"),
    ("of bw limit", "bandwidth_fraction"),
    ("KV cache MiB", "kv_cache_bytes"),
    ("peak RSS MiB", "peak_rss_mib"),
)


# The columns that name a row; measurements follow.
ID_COLUMNS = 6


def _cell(row, key):
    if key == "tokens":
        return f"{row['prompt']}+{row['new_tokens']}"
    if key == "held":
        # The dtypes of the variables, most bytes first ("int8+float32").
        by_dtype = row.get("weight_bytes_by_dtype") or {}
        held = sorted(by_dtype, key=by_dtype.get, reverse=True)
        return "+".join(held) or row.get("held_dtype") or "-"
    value = row.get(key)
    if value is None:
        return "-"
    if key in ("kv_cache_bytes", "weight_bytes"):
        return f"{value / MIB:.2f}"
    if key == "bandwidth_fraction":
        return f"{value:.1%}"
    if key in ("first_call_s", "ttft_s"):
        return f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"
    if key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return str(value)


def _rows(report):
    for row in report["results"]:
        cells = [_cell(row, key) for _, key in COLUMNS]
        if "error" in row:
            cells[ID_COLUMNS] = "error: " + row["error"]
            cells[ID_COLUMNS + 1 :] = [""] * (len(cells) - ID_COLUMNS - 1)
        yield cells


def text_table(report):
    header = [title for title, _ in COLUMNS]
    rows = list(_rows(report))
    widths = [
        max(len(header[i]), *(len(r[i]) for r in rows if len(r[i]) < 40))
        if rows
        else len(header[i])
        for i in range(len(header))
    ]
    lines = []
    for cells in [header] + rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        )
    return "\n".join(lines)


def markdown_table(report):
    header = [title for title, _ in COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for cells in _rows(report):
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def _dtype_order(dtype):
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)


def ratio_lines(report):
    """Human-readable ratios between the rows of `report`."""
    results = report["results"]
    lines = []

    def add(text, value, unit="x"):
        if value is not None:
            lines.append(f"{text}: {value:.2f}{unit}")

    keys = sorted(
        {(r["config"], r["batch"], r.get("dtype", "float32")) for r in results},
        key=lambda k: (list(CONFIGS).index(k[0]), k[1], _dtype_order(k[2])),
    )
    backends = []
    for row in results:
        if row["library"] != "transformers" and row["backend"] not in backends:
            backends.append(row["backend"])
    hf = "transformers"
    # Runs that did not hold the dtype asked for (ours on XLA:CPU).
    noted = set()
    for row in results:
        dtype, held = row.get("dtype"), row.get("held_dtype")
        key = (row["library"], row["backend"], dtype, held)
        if dtype in ("float32", "bfloat16") and held and held != dtype:
            if key not in noted:
                noted.add(key)
                lines.append(
                    f"{row['library']} {row['backend']} {dtype}: held as "
                    f"{held} (its dtype policy)"
                )
    if "int8" in report.get("dtypes", ()) and hf in report.get("libraries", ()):
        lines.append(
            f"{hf} int8: skipped (no CPU int8 without extra libraries)"
        )
    for config, batch, dtype in keys:
        where = {"config": config, "batch": batch, "dtype": dtype}
        if config == "prefill-8k":
            continue
        name = f"{config} b{batch} {dtype}"
        compiled = _find(results, library=COMPILED, **where)
        theirs = _find(results, library=hf, **where)
        for what, key in (
            ("decode", "decode_tok_s"),
            ("prefill", "prefill_tok_s"),
            ("first call", "first_call_s"),
        ):
            add(
                f"{name} torch: {what} {COMPILED} / {hf}",
                _ratio(compiled, theirs, key),
            )
        for backend in backends:
            ours = _find(results, library="ours", backend=backend, **where)
            for peer in ("keras_hub", "keras_hub (no XLA)"):
                theirs = _find(results, library=peer, backend=backend, **where)
                add(
                    f"{name} {backend}: decode ours / {peer}",
                    _ratio(ours, theirs, "decode_tok_s"),
                )
            theirs = _find(results, library=hf, **where)
            add(
                f"{name} {backend}: decode ours / {hf} (torch)",
                _ratio(ours, theirs, "decode_tok_s"),
            )
            theirs = _find(
                results, library="keras_hub", backend=backend, **where
            )
            add(
                f"{name} {backend}: first call ours / keras_hub",
                _ratio(ours, theirs, "first_call_s"),
            )
    libraries = []
    for row in results:
        if (row["library"], row["backend"]) not in libraries:
            libraries.append((row["library"], row["backend"]))
    dtypes = sorted(
        {r.get("dtype", "float32") for r in results}, key=_dtype_order
    )
    for library, backend in libraries:
        for dtype in dtypes:
            where = {"library": library, "backend": backend, "dtype": dtype}
            small = _find(results, config="small", batch=1, **where)
            long = _find(results, config="long", batch=1, **where)
            four = _find(results, config="small", batch=4, **where)
            if library in ("ours", "keras_hub"):
                add(
                    f"{library} {backend} {dtype}: decode long / small "
                    "(batch 1)",
                    _ratio(long, small, "decode_tok_s"),
                )
            add(
                f"{library} {backend} {dtype}: decode small batch 4 / batch 1",
                _ratio(four, small, "decode_tok_s"),
            )
    # Speed-ups from the dtype: the same library, backend, config and batch.
    shapes = sorted(
        {(c, b) for c, b, _ in keys if c != "prefill-8k"},
        key=lambda k: (list(CONFIGS).index(k[0]), k[1]),
    )
    for library, backend in libraries:
        for config, batch in shapes:
            where = {
                "library": library,
                "backend": backend,
                "config": config,
                "batch": batch,
            }
            base = _find(results, dtype="float32", **where)
            for dtype in ("bfloat16", "int8"):
                row = _find(results, dtype=dtype, **where)
                ratio = _ratio(row, base, "decode_tok_s")
                if ratio is None:
                    continue
                held = row.get("held_dtype")
                note = ""
                if dtype == "bfloat16" and held and held != dtype:
                    note = f" (held as {held})"
                add(
                    f"{library} {backend} {config} b{batch}: decode {dtype} "
                    f"/ float32{note}",
                    ratio,
                )
    for backend in backends:
        for dtype in dtypes:
            where = {
                "config": "prefill-8k",
                "backend": backend,
                "dtype": dtype,
            }
            ours = _find(results, library="ours", **where)
            theirs = _find(results, library="keras_hub", **where)
            name = f"prefill-8k {backend} {dtype}"
            if ours and theirs:
                rss, peer_rss = ours["peak_rss_mib"], theirs["peak_rss_mib"]
                lines.append(
                    f"{name}: peak RSS ours {rss:.0f} MiB vs keras_hub "
                    f"{peer_rss:.0f} MiB ({rss / peer_rss:.2f}x); time to "
                    f"first token ours {ours['ttft_s']:.2f} s vs "
                    f"{theirs['ttft_s']:.2f} s"
                )
            for library, row in (("ours", ours), ("keras_hub", theirs)):
                failed = _failed(results, library=library, **where)
                if row is None and failed:
                    lines.append(f"{name}: {library} failed: {failed['error']}")
    return lines


def _failed(results, **where):
    for row in results:
        if "error" in row and all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def readme_block(report):
    machine = report["machine"]
    bandwidth = machine["bandwidth"]
    if "bytes_per_s" in bandwidth:
        measured = (
            f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s memory-read "
            f"bandwidth ({bandwidth['method']})"
        )
    else:
        measured = "bandwidth not measured"
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [
        MARK_START,
        markdown_table(report),
        "",
        *[f"- {line}" for line in ratio_lines(report)],
        "",
        f"`{report['command']}` on {report['date_utc']}, "
        f"{machine['cpu_count']} CPU cores, {measured}; {versions}.",
        MARK_END,
    ]
    return "\n".join(lines)


def write_readme(path, report):
    """Replaces (or appends) the marked block in `path`, atomically."""
    _common.replace_marked_block(
        path, MARK_START, MARK_END, readme_block(report), "## Performance"
    )


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        if spec.get("bandwidth"):
            result = measure_bandwidth()
        else:
            result = run_worker(spec)
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        type=lambda s: _names(s, BACKENDS),
        default=list(BACKENDS),
    )
    parser.add_argument(
        "--configs",
        type=lambda s: _names(s, tuple(CONFIGS)),
        default=list(CONFIGS),
    )
    parser.add_argument(
        "--batches",
        type=lambda s: [int(b) for b in s.split(",")],
        default=[1, 4],
    )
    parser.add_argument(
        "--libraries",
        type=lambda s: _names(s, LIBRARIES),
        default=["ours", "keras_hub", "transformers"],
        help="comma list of ours, ours-compiled (PyTorch only: "
        "compile(jit_compile=True)), keras_hub, transformers",
    )
    parser.add_argument(
        "--dtypes",
        type=lambda s: _names(s, DTYPES),
        default=["float32"],
        help="comma list of float32, bfloat16, int8 (default: float32)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    _common.add_run_options(parser, timeout=3600.0)
    args = parser.parse_args()

    report = run_all(args)
    print()
    print(text_table(report))
    print()
    for line in ratio_lines(report):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
    if args.write_readme:
        write_readme(args.write_readme, report)


if __name__ == "__main__":
    main()
