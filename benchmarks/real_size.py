"""Gemma 2 at its real size on CPU: ours vs transformers vs KerasHub.

    .venv/bin/python benchmarks/real_size.py [--size 2b|9b]
        [--checkpoint DIR] [--backends jax,tensorflow,torch]
        [--libraries ours,transformers,keras_hub] [--dtype bfloat16|float32]
        [--quantize int8|int4] [--prompt 64] [--new-tokens 16] [--repeats 1]
        [--threads N] [--timeout SECONDS] [--quick] [--json OUT.json]
        [--write-readme README.md] [--from-json REPORT.json ...]

Writes, unless `--checkpoint DIR` already holds it, a random-weight Hugging
Face Gemma 2 checkpoint of the real 2B or 9B architecture (the sizes of
`keras_gemma2.architectures`) in bfloat16: `config.json`, safetensors shards
of about 2 GB (`model-0000i-of-0000N.safetensors`) and
`model.safetensors.index.json`. Every tensor is drawn from its own seeded
generator (normal, times 0.02) and the shards are written one at a time, so
the writer never holds the whole model and the same command writes the same
bytes. The 2B is 5.2 GB, the 9B 18.5 GB.

Then each library loads that folder and generates greedily from the same
random prompt (`<bos>` then ids >= 4), in a fresh process each (this script
re-invoked with `--worker SPEC` and `KERAS_BACKEND` set):

- ours, on each of `--backends`: `Gemma2Backbone.from_preset(DIR,
  dtype=...)` (with `--quantize int8`: `dtype="bfloat16", quantize="int8"`,
  weight-only on torch, and the row fails if no layer came out quantized),
  then
  `Gemma2CausalLM(backbone, preprocessor=None)`;
- transformers (PyTorch, once): `Gemma2ForCausalLM.from_pretrained(DIR,
  dtype=..., attn_implementation="eager")` (SDPA would drop the attention
  soft cap); the reference of every comparison;
- keras_hub, on each of `--backends`: `GemmaCausalLM.from_preset(DIR,
  dtype=..., preprocessor=None)`, KerasHub's own transformers converter.

Each worker measures load_s (the `from_preset`/`from_pretrained` call), RSS
right after it (current and peak), first_call_s (the first generate of
`--new-tokens` tokens: compilation plus one run), then T1 (1 new token) and
TN (N new tokens), each the best of `--repeats` after a warm-up of both
shapes: prefill tokens/s = prompt / T1, decode tokens/s = (N - 1) /
(TN - T1), as benchmarks/generate.py measures them. Peak RSS (`ru_maxrss`)
is taken after generating; then the float32 logits of the last prompt
position (a forward pass over the prompt) go to a .npy file that the parent
compares with transformers': max |difference|, whether the argmax agrees,
the overlap of the top 5, and how many of the greedy tokens match before
the first difference. Peak RSS is also given as a multiple of the weight
bytes (the safetensors tensors, bfloat16): on JAX and TensorFlow a bfloat16
model of ours holds float32 weights on a CPU (see `Gemma2Backbone`), 2x.

`--quick` runs a tiny architecture instead (2 layers, hidden 64, 4/2 heads
of 16, FFN 128, vocabulary 512, window 8; shards of 100 kB) as a smoke
test of the whole script. `--threads` sets `torch.set_num_threads` (default:
all cores); `--timeout` abandons a worker; a worker that fails or is killed
(out of memory) becomes an error row. `--write-readme README.md` replaces
the block between `<!-- real-size-benchmark:start -->` and
`<!-- real-size-benchmark:end -->` with the table, the command, date,
machine and library versions (a file without both markers is left alone);
`--json OUT` writes the raw results. Not a test: numbers depend on the
machine, and the 9B in bfloat16 needs about 20 GB of memory per worker.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import struct
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import generate as generate_bench  # noqa: E402
import load_memory  # noqa: E402

SIZES = ("2b", "9b")
BACKENDS = ("jax", "tensorflow", "torch")
LIBRARIES = ("ours", "transformers", "keras_hub")
DTYPES = ("bfloat16", "float32")
MARK_START = "<!-- real-size-benchmark:start -->"
MARK_END = "<!-- real-size-benchmark:end -->"
SHARD_BYTES = 2 * 10**9
QUICK_SHARD_BYTES = 10**5  # a few shards even for the tiny model
WEIGHT_SCALE = 0.02
SEED = 0
GB = 1e9


def _architecture(size, quick):
    """`Gemma2Backbone` kwargs: a released size, or the tiny quick one."""
    from keras_gemma2 import architectures

    kwargs = architectures.ARCHITECTURES[size]
    if quick:
        kwargs = {**kwargs, **generate_bench.QUICK_MODEL}
    return kwargs


def hf_config(kwargs):
    """The transformers `Gemma2Config` dict of a bfloat16 checkpoint."""
    from keras_gemma2.convert import names

    return names.hf_config_from_kwargs(kwargs, dtype="bfloat16")


# --- checkpoint ------------------------------------------------------------


def _tensor_plan(config):
    """`[(name, shape)]` in file order: embedding, blocks, final norm."""
    tensors = [
        (
            "model.embed_tokens.weight",
            (config["vocab_size"], config["hidden_size"]),
        )
    ]
    for layer in range(config["num_hidden_layers"]):
        tensors += list(load_memory._tensors(config, layer).items())
    tensors.append(("model.norm.weight", (config["hidden_size"],)))
    return tensors


def _shards(tensors, shard_bytes):
    """Groups `(name, shape)` greedily into shards of <= `shard_bytes`."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * _count(shape)  # bfloat16
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _count(shape):
    count = 1
    for dim in shape:
        count *= dim
    return count


def _random_tensor(name, shape, seed):
    """A bfloat16 tensor of N(0, 1) * 0.02 from a generator of its own.

    Filled in float32 chunks, so the embedding never exists in float32.
    """
    import torch

    generator = torch.Generator().manual_seed(
        seed * 2**32 + zlib.crc32(name.encode())
    )
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    flat = tensor.view(-1)
    step = 2**24
    for start in range(0, flat.numel(), step):
        chunk = torch.randn(
            min(step, flat.numel() - start), generator=generator
        )
        flat[start : start + chunk.numel()] = (chunk * WEIGHT_SCALE).to(
            torch.bfloat16
        )
    return tensor


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _checkpoint_complete(folder, config):
    """Whether `folder` holds this config's checkpoint; raises if another."""
    found = _read_json(os.path.join(folder, "config.json"))
    if found is None:
        return False
    if found != json.loads(json.dumps(config)):
        raise SystemExit(
            f"{folder}/config.json is not the requested architecture; pass "
            "another --checkpoint folder or remove this one."
        )
    index = _read_json(os.path.join(folder, "model.safetensors.index.json"))
    if index is None:
        return False
    names = {name for name, _ in _tensor_plan(config)}
    if set(index.get("weight_map", {})) != names:
        return False
    files = set(index["weight_map"].values())
    return all(os.path.exists(os.path.join(folder, f)) for f in files)


def write_checkpoint(folder, config, shard_bytes, seed=SEED):
    """Writes the shards one at a time, then the index, then config.json.

    config.json comes last: a folder without it is rewritten next time.
    Returns the total bytes of the tensors.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, "config.json")
    if os.path.exists(stale):
        os.remove(stale)
    shards = _shards(_tensor_plan(config), shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: _random_tensor(name, shape, seed) for name, shape in shard
        }
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(
            tensors, os.path.join(folder, filename), metadata={"format": "pt"}
        )
        del tensors
        total += nbytes
        weight_map.update({name: filename for name, _ in shard})
        print(
            f"  {filename}: {nbytes:,} bytes ({len(shard)} tensors)",
            file=sys.stderr,
            flush=True,
        )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(
        os.path.join(folder, "model.safetensors.index.json"),
        "w",
        encoding="utf-8",
    ) as file:
        json.dump(index, file, indent=2)
    with open(stale, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    return total


def weight_bytes(folder):
    """Sum of the tensor bytes in the folder's shards (their headers)."""
    index = _read_json(os.path.join(folder, "model.safetensors.index.json"))
    total = 0
    for filename in sorted(set(index["weight_map"].values())):
        with open(os.path.join(folder, filename), "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                total += end - begin
    return total


def checkpoint_job(spec):
    """Writes the checkpoint unless present (progress on stderr).

    Runs in a worker, so that the parent never imports keras_gemma2 (and
    with it a Keras backend) or torch.
    """
    kwargs = _architecture(spec["size"], spec["quick"])
    config = hf_config(kwargs)
    folder = spec["folder"]
    log = sys.stderr
    if _checkpoint_complete(folder, config):
        print(f"checkpoint: {folder} (already written)", file=log)
    else:
        print(f"writing random-weight checkpoint to {folder} ...", file=log)
        started = time.perf_counter()
        total = write_checkpoint(folder, config, spec["shard_bytes"])
        print(
            f"  wrote {total:,} bytes ({total / GB:.2f} GB) in "
            f"{time.perf_counter() - started:.0f} s",
            file=log,
        )
    return {"architecture": kwargs, "weight_bytes": weight_bytes(folder)}


# --- worker ----------------------------------------------------------------


def _padded(token_ids, new):
    """The prompt right-padded with 0 to prompt + `new` positions."""
    import numpy as np

    pad = [(0, 0), (0, new)]
    return {
        "token_ids": np.pad(token_ids, pad),
        "padding_mask": np.pad(np.ones_like(token_ids), pad),
    }


def _no_grad():
    import keras

    if keras.config.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _warm_up_keras(keras_hub_converters=False):
    """Imports what a load imports and starts the backend's runtime.

    `keras_gemma2` imports KerasHub (and through it TensorFlow) lazily, in
    its first `from_preset`, and KerasHub its transformers converters:
    seconds that are import time, not load time.
    """
    import keras
    import keras_hub.models  # noqa: F401
    import safetensors.numpy  # noqa: F401

    from keras_gemma2.convert import loader  # noqa: F401

    if keras_hub_converters:
        with contextlib.suppress(ImportError):  # a private module
            import keras_hub.src.utils.transformers.preset_loader  # noqa: F401

    keras.ops.convert_to_numpy(keras.ops.ones((4, 4)) @ keras.ops.ones((4, 4)))


def _last_logits(backbone, project, token_ids):
    """float32 logits of the last prompt position: forward, then `project`."""
    import keras
    import numpy as np

    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    with _no_grad():
        hidden = backbone(inputs)
        last = project(hidden[:, -1:, :])
    return keras.ops.convert_to_numpy(keras.ops.cast(last, "float32"))


def _keras_weight_bytes(model):
    import keras
    import numpy as np

    return sum(
        _count(w.shape)
        * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
        for w in model.weights
    )


def _quantized_layers(backbone, mode):
    """How many of the backbone's layers are quantized in `mode`."""
    return sum(
        1
        for layer in backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None) == mode
    )


def _ours(spec, token_ids, loading):
    import keras

    import keras_gemma2

    _warm_up_keras()
    mode = spec.get("quantize")
    kwargs = {"dtype": spec["dtype"]}
    if mode:
        quantize = mode
        if mode == "int8" and keras.config.backend() == "torch":
            # Weight-only: what layers.direct decodes with its int8 GEMV
            # (Keras' default int8 einsum has no CPU kernel on torch).
            quantize = keras.quantizers.Int8QuantizationConfig(
                activation_quantizer=None
            )
        kwargs = {"dtype": "bfloat16", "quantize": quantize}
    with loading():
        backbone = keras_gemma2.Gemma2Backbone.from_preset(
            spec["checkpoint"], **kwargs
        )
    if mode and not _quantized_layers(backbone, mode):
        raise RuntimeError(
            f"from_preset(quantize={mode!r}) returned a model without "
            f"{mode} layers: the keyword was ignored"
        )
    lm = keras_gemma2.Gemma2CausalLM(backbone=backbone, preprocessor=None)
    jit = spec.get("jit_compile")
    lm.compile(
        sampler="greedy", **({} if jit is None else {"jit_compile": jit})
    )
    prompt = token_ids.shape[1]

    def generate(new):
        # For dict inputs the padded length is the total; max_length agrees.
        out = lm.generate(
            _padded(token_ids, new),
            max_length=prompt + new,
            stop_token_ids=None,
        )
        return out["token_ids"], out["padding_mask"]

    return {
        "generate": generate,
        "logits": lambda: _last_logits(backbone, backbone.logits, token_ids),
        "model_bytes": _keras_weight_bytes(backbone),
        "quantized_layers": _quantized_layers(backbone, mode) if mode else 0,
        "variable_dtype": backbone.dtype_policy.variable_dtype,
        "jit_compile": getattr(lm, "jit_compile", None),
    }


def _keras_hub(spec, token_ids, loading):
    import keras_hub

    _warm_up_keras(keras_hub_converters=True)
    with loading():
        lm = keras_hub.models.GemmaCausalLM.from_preset(
            spec["checkpoint"], dtype=spec["dtype"], preprocessor=None
        )
    jit = spec.get("jit_compile")
    lm.compile(
        sampler="greedy", **({} if jit is None else {"jit_compile": jit})
    )
    backbone = lm.backbone

    def generate(new):
        # Without a preprocessor KerasHub generates up to the padded length.
        out = lm.generate(_padded(token_ids, new), stop_token_ids=None)
        return out["token_ids"], out["padding_mask"]

    def project(hidden):  # KerasHub's soft cap is in the embedding
        return backbone.token_embedding(hidden, reverse=True)

    return {
        "generate": generate,
        "logits": lambda: _last_logits(backbone, project, token_ids),
        "model_bytes": _keras_weight_bytes(backbone),
        "variable_dtype": backbone.dtype_policy.variable_dtype,
        "jit_compile": getattr(lm, "jit_compile", None),
    }


def _transformers(spec, token_ids, loading):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, spec["dtype"])
    torch.ones(4, 4) @ torch.ones(4, 4)
    gemma2 = transformers.Gemma2ForCausalLM  # a lazy import, not the load
    with loading():
        model = gemma2.from_pretrained(
            spec["checkpoint"], dtype=dtype, attn_implementation="eager"
        ).eval()
    # Never stop early: no end token, and at least `new` tokens anyway.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.as_tensor(token_ids, dtype=torch.long)

    def generate(new):
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )
        return out.numpy(), None

    def logits():
        with torch.no_grad():
            out = model(input_ids=ids).logits[:, -1:, :]
        return out.float().numpy()

    return {
        "generate": generate,
        "logits": logits,
        "model_bytes": sum(
            p.numel() * p.element_size() for p in model.parameters()
        ),
        "variable_dtype": str(next(model.parameters()).dtype),
    }


LOADERS = {
    "ours": _ours,
    "keras_hub": _keras_hub,
    "transformers": _transformers,
}


def run_worker(spec):
    """Loads one library, generates, saves the logits; returns a dict."""
    import numpy as np

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    library = spec["library"]
    if library == "transformers" or spec["backend"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
    __import__({"ours": "keras_gemma2"}.get(library, library))
    token_ids = generate_bench._prompts(
        {
            "seed": spec["seed"],
            "batch": 1,
            "prompt": spec["prompt"],
            "model": {"vocabulary_size": spec["vocabulary_size"]},
        }
    )
    result = {}

    @contextlib.contextmanager
    def loading():
        """Times the load; RSS before (runtime started), after and peak."""
        result["rss_before_load_mib"] = _common.rss_now_mib()
        started = time.perf_counter()
        yield
        result["load_s"] = time.perf_counter() - started
        result["rss_after_load_mib"] = _common.rss_now_mib()
        result["peak_rss_load_mib"] = _common.peak_rss_mib()

    model = LOADERS[library](spec, token_ids, loading)
    generate, new = model.pop("generate"), spec["new"]
    logits = model.pop("logits")
    result.update(model)
    check = {"batch": 1, "prompt": spec["prompt"]}
    timed = _common.timed

    result["first_call_s"], (ids, mask) = timed(generate, new)
    generate_bench._check(check, new, ids, mask)
    result["generated"] = [int(i) for i in ids[0, spec["prompt"] :]]
    if new > 1:
        result["first_call_1_token_s"], (ids, mask) = timed(generate, 1)
        generate_bench._check(check, 1, ids, mask)
    t1 = min(timed(generate, 1)[0] for _ in range(spec["repeats"]))
    result["ttft_s"] = t1
    result["prefill_tok_s"] = spec["prompt"] / t1
    if new > 1:
        tn = min(timed(generate, new)[0] for _ in range(spec["repeats"]))
        result["generate_s"] = tn
        result["decode_tok_s"] = (new - 1) / (tn - t1) if tn > t1 else None
    result["peak_rss_mib"] = _common.peak_rss_mib()
    last = np.asarray(logits(), "float32").reshape(-1)
    np.save(spec["logits_path"], last)
    result["peak_rss_with_logits_mib"] = _common.peak_rss_mib()
    return result


# --- parent ----------------------------------------------------------------


def _plan(args):
    """`(label, library, backend)`: transformers first, the reference."""
    runs = []
    if "transformers" in args.libraries:
        runs.append(("transformers", "transformers", "torch"))
    for backend in args.backends:
        for library in ("ours", "keras_hub"):
            if library in args.libraries:
                label = library
                if library == "ours" and args.quantize:
                    label = f"ours {args.quantize}"
                runs.append((label, library, backend))
    return runs


def compare(logits, reference, top=5):
    """Agreement of two last-position logit vectors."""
    import numpy as np

    order, ref_order = np.argsort(-logits), np.argsort(-reference)
    return {
        "logits_max_abs_diff": float(np.max(np.abs(logits - reference))),
        "reference_max_abs_logit": float(np.max(np.abs(reference))),
        "argmax_agrees": bool(order[0] == ref_order[0]),
        "top5_overlap": len(set(order[:top]) & set(ref_order[:top])) / top,
    }


def _leading_matches(a, b):
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def run_all(args):
    import numpy as np

    folder = os.path.abspath(args.checkpoint)
    written = _common.spawn_worker(
        __file__,
        {
            "job": "checkpoint",
            "size": args.size,
            "quick": args.quick,
            "folder": folder,
            "shard_bytes": QUICK_SHARD_BYTES if args.quick else SHARD_BYTES,
        },
        None,
        None,
        stream=True,
    )
    if "error" in written:
        raise SystemExit(f"checkpoint: {written['error']}")
    kwargs, total = written["architecture"], written["weight_bytes"]
    print(f"  weights: {total:,} bytes ({total / GB:.2f} GB, bfloat16)")
    results = []
    with tempfile.TemporaryDirectory(prefix="real_size_logits_") as scratch:
        for i, (label, library, backend) in enumerate(_plan(args)):
            spec = {
                "library": library,
                "backend": backend,
                "checkpoint": folder,
                "dtype": args.dtype,
                "quantize": args.quantize if library == "ours" else None,
                "jit_compile": (
                    True
                    if backend == "tensorflow" and library != "transformers"
                    else None
                ),
                "vocabulary_size": kwargs["vocabulary_size"],
                "prompt": args.prompt,
                "new": args.new_tokens,
                "repeats": args.repeats,
                "threads": args.threads,
                "seed": SEED,
                "logits_path": os.path.join(scratch, f"{i}.npy"),
            }
            print(f"{label} {backend} ...", flush=True)
            started = time.perf_counter()
            keras_backend = None if library == "transformers" else backend
            row = _common.spawn_worker(
                __file__, spec, keras_backend, args.timeout
            )
            row.update(
                library=label,
                backend=backend,
                wall_s=time.perf_counter() - started,
            )
            if "error" in row:
                print(f"  error: {row['error']}")
            elif os.path.exists(spec["logits_path"]):
                row["logits"] = np.load(spec["logits_path"])
            results.append(row)
        _add_comparisons(results, total)
    return {
        "command": _common.command(__file__),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": _machine(),
        "versions": _common.versions(
            generate_bench.VERSION_PACKAGES + ("safetensors",)
        ),
        "size": "quick" if args.quick else args.size,
        "architecture": kwargs,
        "checkpoint": folder,
        "weight_bytes": total,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "results": results,
    }


def _add_comparisons(results, total):
    """Memory / weights, and agreement with transformers; drops logits."""
    reference = next(
        (
            r
            for r in results
            if r["library"] == "transformers" and "logits" in r
        ),
        None,
    )
    for row in results:
        for key in ("peak_rss_load_mib", "peak_rss_mib"):
            if key in row:
                row[key.replace("_mib", "_x_weights")] = (
                    row[key] * 2**20 / total
                )
        if reference is None or row is reference or "error" in row:
            continue
        if reference.get("decode_tok_s") and row.get("decode_tok_s"):
            row["decode_vs_transformers"] = (
                row["decode_tok_s"] / reference["decode_tok_s"]
            )
        if "logits" in row:
            row.update(compare(row["logits"], reference["logits"]))
        row["generated_matches_transformers"] = _leading_matches(
            row["generated"], reference["generated"]
        )
    for row in results:
        row.pop("logits", None)


def _machine():
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as meminfo:
            memory = int(meminfo.readline().split()[1]) * 1024
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
    }


COLUMNS = (
    ("library", "library"),
    ("backend", "backend"),
    ("load s", "load_s"),
    ("peak RSS load GB (x weights)", "peak_rss_load_mib"),
    ("peak RSS generate GB (x weights)", "peak_rss_mib"),
    ("first call s", "first_call_s"),
    ("prefill tok/s", "prefill_tok_s"),
    ("decode tok/s", "decode_tok_s"),
    ("decode vs transformers", "decode_vs_transformers"),
    ("logits max\\|diff\\| vs transformers", "logits_max_abs_diff"),
    ("argmax agrees", "argmax_agrees"),
    ("top-5 overlap", "top5_overlap"),
    ("greedy tokens = transformers", "generated_matches_transformers"),
)
ID_COLUMNS = 2


def _cell(row, key, new_tokens):
    value = row.get(key)
    if value is None:
        return "-"
    if key in ("peak_rss_load_mib", "peak_rss_mib"):
        ratio = row[key.replace("_mib", "_x_weights")]
        return f"{value * 2**20 / GB:.2f} ({ratio:.2f}x)"
    if key == "argmax_agrees":
        return "yes" if value else "no"
    if key == "top5_overlap":
        return f"{round(value * 5)}/5"
    if key == "generated_matches_transformers":
        return f"{value}/{new_tokens}"
    if key == "decode_vs_transformers":
        return f"{value:.2f}x"
    if key == "logits_max_abs_diff":
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def markdown_table(report):
    header = [title for title, _ in COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in report["results"]:
        cells = [_cell(row, k, report["new_tokens"]) for _, k in COLUMNS]
        if "error" in row:
            cells[ID_COLUMNS:] = ["error: " + row["error"]] + [""] * (
                len(cells) - ID_COLUMNS - 1
            )
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(report):
    machine = report["machine"]
    memory = machine["memory_bytes"]
    memory = f", {memory / GB:.0f} GB memory" if memory else ""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    dtype = report["dtype"]
    if report["quantize"]:
        dtype += f" (ours: {report['quantize']}, from bfloat16)"
    return (
        f"Gemma 2 {report['size']} with random weights "
        f"({report['weight_bytes'] / GB:.2f} GB of bfloat16 safetensors: "
        f"the 'x weights'), {dtype}, prompt {report['prompt']} + "
        f"{report['new_tokens']} new tokens, greedy, batch 1, best of "
        f"{report['repeats']}; logits of the last prompt position. "
        f"`{report['command']}` on {report['date_utc']}, "
        f"{machine['platform']} ({machine['processor']}), "
        f"{machine['cpu_count']} CPU cores{memory}; {versions}."
    )


def readme_block(reports):
    parts = [MARK_START]
    for report in reports:
        parts += [markdown_table(report), "", summary(report), ""]
    return "\n".join(parts[:-1] + [MARK_END])


def write_readme(path, reports):
    """Replaces the marked block in `path`; False if it has no markers."""
    return _common.replace_marked_block(
        path, MARK_START, MARK_END, readme_block(reports)
    )


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        if spec.get("job") == "checkpoint":
            result = checkpoint_job(spec)
        else:
            result = run_worker(spec)
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="2b")
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="the checkpoint folder, written if it lacks the checkpoint "
        "(default: gemma2_<size>_random in the temp folder)",
    )
    parser.add_argument(
        "--backends",
        type=lambda s: _common.names(s, BACKENDS),
        default=list(BACKENDS),
    )
    parser.add_argument(
        "--libraries",
        type=lambda s: _common.names(s, LIBRARIES),
        default=list(LIBRARIES),
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="ours only: from_preset(..., quantize=...) in bfloat16",
    )
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    _common.add_run_options(parser, timeout=1800.0)
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="REPORT.json",
        help="with --write-readme: write the tables of saved --json "
        "reports (e.g. a 2b and a 9b run) instead of measuring",
    )
    args = parser.parse_args()
    if args.from_json:
        if not args.write_readme:
            parser.error("--from-json needs --write-readme")
        reports = []
        for name in args.from_json:
            with open(name, encoding="utf-8") as file:
                reports.append(json.load(file))
        if not write_readme(args.write_readme, reports):
            parser.error(f"{args.write_readme} lacks {MARK_START}")
        return
    if args.prompt < 2 or args.new_tokens < 1 or args.repeats < 1:
        parser.error("--prompt >= 2, --new-tokens >= 1, --repeats >= 1")
    if args.checkpoint is None:
        name = f"gemma2_{'quick' if args.quick else args.size}_random"
        args.checkpoint = os.path.join(tempfile.gettempdir(), name)

    report = run_all(args)
    print()
    print(markdown_table(report))
    print()
    print(summary(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
    if args.write_readme and not write_readme(args.write_readme, [report]):
        print(
            f"{args.write_readme} lacks {MARK_START} ... {MARK_END}; "
            "not edited.",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
