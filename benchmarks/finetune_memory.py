"""Fine-tuning memory savers: LoRA on float32, int8, bfloat16; ours vs KerasHub.

    .venv/bin/python benchmarks/finetune_memory.py [--backends jax,torch]
        [--configs float32,int8,int8-float-embedding,mixed_bfloat16,bfloat16,
        keras_hub-float32,keras_hub-int8] [--steps 5] [--quick]
        [--json OUT.json] [--threads N] [--timeout SECONDS]

Builds one random-weight Gemma 2 architecture (8 layers, hidden 1024, 8
query / 4 key-value heads of 128, FFN 4096 per gate, vocabulary 32000,
sliding window 64, soft caps 50/30: 159M parameters, 608 MiB in float32, a
fifth of them in the tied embedding) and LoRA fine-tunes it (rank 8 on the
query and value projections, Adam at 1e-3, sparse cross-entropy on the
logits) on one fixed random batch of 2 x 128 token ids: one warm-up step
(compilation included), then `--steps` timed steps, each
`train_on_batch(x={"token_ids", "padding_mask"}, y, sample_weight)`.
Configurations:

- float32: ours, `keras_gemma2.Gemma2Backbone` in float32, LoRA through
  `keras_gemma2.lora.enable`;
- int8: ours, `lm.quantize("int8")` and then LoRA (QLoRA-style: int8 base
  weights, float32 adapters). The worker also runs the batch through the
  model before and after quantizing, and reports the largest |logit|
  difference;
- int8-float-embedding: the same with the tied embedding left in float32
  (`quantize(..., filters=...)`). Keras' int8 `ReversibleEmbedding` rounds
  the hidden states to int8 in the logits projection with no
  straight-through gradient, so with an int8 embedding almost no gradient
  reaches the adapters (the loss does not fall); this row shows what int8
  costs and saves when training works;
- mixed_bfloat16: ours, `dtype="mixed_bfloat16"` (float32 weights,
  bfloat16 compute);
- bfloat16: ours, `dtype="bfloat16"` (bfloat16 weights and compute; Keras
  keeps LoRA adapters, and so Adam's state, in float32);
- keras_hub-float32: `keras_hub.models.GemmaBackbone` with the Gemma 2 flags
  (its `intermediate_dim` is twice ours), `backbone.enable_lora(8)`, in
  `GemmaCausalLM(backbone, preprocessor=None)`;
- keras_hub-int8: the same, `quantize("int8")` on the CausalLM before
  `enable_lora`.

A failure (of building, quantizing, LoRA or training) is kept in the results
as the row's error message. Every configuration runs in a fresh subprocess
(this script re-invoked with `--worker SPEC` and `KERAS_BACKEND` set), so
each one's memory is its own. Per configuration:

- weight MiB: the sum of the sizes of the model's variables (each counted
  once) after quantizing and enabling LoRA; LoRA MiB: the trainable
  variables (the adapters); Adam MiB: the optimizer's variables;
- import RSS: resident memory after importing Keras, the backend and the
  library (KerasHub brings TensorFlow), before building: a floor no model
  setting changes;
- built RSS: after building, quantizing, enabling LoRA and compiling, once
  garbage is collected and glibc's `malloc_trim` has handed freed heap back
  (without it the float32 weights an int8 model was quantized from stay
  resident and count towards every later peak);
- peak RSS: the run's high-water mark, building included (an int8 model is
  built in float32 first, so its build-time peak holds float32 weights);
- warm-up peak: the high-water mark of the warm-up step (Linux `VmHWM`
  after resetting it through `/proc/self/clear_refs`), compilation included;
- step peak: the same over the timed steps alone (reset again after the
  warm-up and another trim): the steady-state memory of training. step
  peak - import is what the model and its training hold;
- first step s, s/step (mean of the timed steps), and the loss at the first
  and the last step (the same batch every step, so it should fall).

Then ratios: each of ours against ours float32, and ours against KerasHub in
the same mode, plus any row whose loss fell by under a tenth of ours
float32's. `--quick` runs a tiny model (2 layers, hidden 64, vocabulary
512, 16 tokens) as a smoke test. `--threads` sets `torch.set_num_threads`
for the PyTorch runs (default: all cores); `--timeout` abandons a worker.
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
from _common import proc_status_mib as _proc_status_mib  # noqa: E402
from _common import rss_now_mib as _rss_now_mib  # noqa: E402
from _common import timed as _timed  # noqa: E402

MODEL = {
    "vocabulary_size": 32000,
    "num_layers": 8,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "hidden_dim": 1024,
    "intermediate_dim": 4096,
    "head_dim": 128,
    "query_pre_attn_scalar": 128,
    "sliding_window_size": 64,
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
# name: (library, dtype, quantization mode, quantize the embedding too)
CONFIGS = {
    "float32": ("ours", "float32", None, False),
    "int8": ("ours", "float32", "int8", True),
    "int8-float-embedding": ("ours", "float32", "int8", False),
    "mixed_bfloat16": ("ours", "mixed_bfloat16", None, False),
    "bfloat16": ("ours", "bfloat16", None, False),
    "keras_hub-float32": ("keras_hub", "float32", None, False),
    "keras_hub-int8": ("keras_hub", "float32", "int8", True),
}
BATCH = 2
LENGTH = 128
QUICK_LENGTH = 16
RANK = 8
LEARNING_RATE = 1e-3
BACKENDS = ("jax", "torch", "tensorflow")
VERSION_PACKAGES = ("keras", "keras-hub", "jax", "tensorflow", "torch")
MIB = 2**20


# --- worker ----------------------------------------------------------------


def _reset_peak_rss():
    """Resets Linux's `VmHWM` to the current RSS; False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _trim():
    """Collects garbage and hands freed heap back to the OS; returns RSS.

    Without it, memory freed after building (the float32 weights an int8
    model was quantized from, initializer temporaries) stays resident in
    glibc's heap and would count towards every later peak.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_now_mib()


def _variable_bytes(variables):
    import keras
    import numpy as np

    total, seen = 0, set()
    for variable in variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        size = int(np.prod([int(d) for d in variable.shape]))
        dtype = keras.backend.standardize_dtype(variable.dtype)
        total += size * np.dtype(dtype).itemsize
    return total


def _batch(spec):
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    vocabulary = spec["model"]["vocabulary_size"]
    ids = rng.integers(4, vocabulary, (BATCH, spec["length"] + 1))
    ids = ids.astype("int32")
    ids[:, 0] = 2  # <bos>
    x = {
        "token_ids": ids[:, :-1],
        "padding_mask": np.ones_like(ids[:, :-1]),
    }
    return x, ids[:, 1:], np.ones(ids[:, 1:].shape, "float32")


def _build_ours(spec, x):
    import numpy as np

    import keras_gemma2

    backbone = keras_gemma2.Gemma2Backbone(**spec["model"], dtype=spec["dtype"])
    lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor=None)
    extra = {}
    if spec["quantize"]:
        before = np.asarray(lm.predict_on_batch(x), "float32")
        if spec["quantize_embedding"]:
            lm.quantize(spec["quantize"])
        else:
            lm.quantize(
                spec["quantize"],
                filters=lambda layer: layer is not backbone.token_embedding,
            )
        after = np.asarray(lm.predict_on_batch(x), "float32")
        extra = {
            "logit_max_abs_diff": float(np.max(np.abs(after - before))),
            "logit_mean_abs_diff": float(np.mean(np.abs(after - before))),
            "logit_max_abs": float(np.max(np.abs(before))),
            "argmax_agreement": float(
                np.mean(after.argmax(-1) == before.argmax(-1))
            ),
        }
    keras_gemma2.lora.enable(backbone, rank=RANK)
    return lm, extra


def _build_keras_hub(spec, x):
    import keras_hub

    model = spec["model"]
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
        dtype=spec["dtype"],
    )
    lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    if spec["quantize"]:
        lm.quantize(spec["quantize"])
    backbone.enable_lora(RANK)
    return lm, {}


BUILDERS = {"ours": _build_ours, "keras_hub": _build_keras_hub}


def _loss(logs):
    if isinstance(logs, (list, tuple)):
        logs = logs[0]
    if isinstance(logs, dict):
        logs = logs["loss"]
    return float(logs)


def run_worker(spec):
    """Fine-tunes one configuration; returns the result dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if spec["backend"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
    import keras

    __import__({"ours": "keras_gemma2"}.get(spec["library"], "keras_hub"))
    keras.utils.set_random_seed(spec["seed"])
    x, y, sample_weight = _batch(spec)
    rss_import = _rss_now_mib()

    build_s, (lm, result) = _timed(BUILDERS[spec["library"]], spec, x)
    lm.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    trainable = lm.trainable_variables
    if not trainable:
        raise RuntimeError("no trainable variables after enabling LoRA")
    result.update(
        weight_bytes=_variable_bytes(lm.weights),
        trainable_bytes=_variable_bytes(trainable),
        weight_dtypes=sorted(
            {keras.backend.standardize_dtype(v.dtype) for v in lm.weights}
        ),
        params=int(lm.count_params()),
        rss_import_mib=rss_import,
        peak_rss_build_mib=_peak_rss_mib(),
        build_s=build_s,
        keras_backend=keras.config.backend(),
        jit_compile=getattr(lm, "jit_compile", None),
    )
    result["rss_built_mib"] = _rss_now_mib()
    result["rss_trimmed_mib"] = _trim()

    def step():
        return _loss(lm.train_on_batch(x, y, sample_weight=sample_weight))

    reset = _reset_peak_rss()
    first_step_s, first_loss = _timed(step)
    result["warmup_peak_rss_mib"] = _proc_status_mib("VmHWM") if reset else None
    _trim()
    reset = _reset_peak_rss()
    times, losses = [], [first_loss]
    for _ in range(spec["steps"]):
        seconds, loss = _timed(step)
        times.append(seconds)
        losses.append(loss)
    result.update(
        first_step_s=first_step_s,
        step_s=sum(times) / len(times),
        step_times_s=times,
        losses=losses,
        optimizer_bytes=_variable_bytes(lm.optimizer.variables),
        step_peak_rss_mib=_proc_status_mib("VmHWM") if reset else None,
    )
    # Resetting VmHWM resets `ru_maxrss` too: the run's peak is the largest
    # of the three phases'.
    result["peak_rss_mib"] = max(
        result["peak_rss_build_mib"],
        result["warmup_peak_rss_mib"] or 0,
        _peak_rss_mib(),
    )
    return result


# --- parent ----------------------------------------------------------------


def run_all(args):
    model = QUICK_MODEL if args.quick else MODEL
    length = QUICK_LENGTH if args.quick else LENGTH
    results = []
    for backend in args.backends:
        for name in args.configs:
            library, dtype, quantize, quantize_embedding = CONFIGS[name]
            spec = {
                "library": library,
                "backend": backend,
                "dtype": dtype,
                "quantize": quantize,
                "quantize_embedding": quantize_embedding,
                "model": model,
                "length": length,
                "steps": args.steps,
                "threads": args.threads,
                "seed": 0,
            }
            print(f"{name} {backend} ...", flush=True)
            started = time.perf_counter()
            row = _common.spawn_worker(__file__, spec, backend, args.timeout)
            row.update(
                config=name,
                library=library,
                backend=backend,
                wall_s=time.perf_counter() - started,
            )
            if "error" in row:
                print(f"  error: {row['error']}")
            else:
                print(
                    f"  {row['wall_s']:.0f} s, loss {row['losses'][0]:.3f}"
                    f" -> {row['losses'][-1]:.3f}",
                    flush=True,
                )
            results.append(row)
    return {
        "command": _common.command(__file__),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "versions": _common.versions(VERSION_PACKAGES),
        "model": model,
        "batch": BATCH,
        "length": length,
        "lora_rank": RANK,
        "learning_rate": LEARNING_RATE,
        "steps": args.steps,
        "results": results,
    }


COLUMNS = (
    ("config", "config"),
    ("backend", "backend"),
    ("weight MiB", "weight_bytes"),
    ("LoRA MiB", "trainable_bytes"),
    ("Adam MiB", "optimizer_bytes"),
    ("import RSS", "rss_import_mib"),
    ("built RSS", "rss_trimmed_mib"),
    ("peak RSS", "peak_rss_mib"),
    ("warm-up peak", "warmup_peak_rss_mib"),
    ("step peak", "step_peak_rss_mib"),
    ("step peak-import", "step_above_import_mib"),
    ("first step s", "first_step_s"),
    ("s/step", "step_s"),
    ("loss first->last", "loss"),
)


def _step_above_import(row):
    if row.get("step_peak_rss_mib") is None:
        return None
    return row["step_peak_rss_mib"] - row["rss_import_mib"]


def _cell(row, key):
    if key == "loss":
        return f"{row['losses'][0]:.3f}->{row['losses'][-1]:.3f}"
    if key == "step_above_import_mib":
        value = _step_above_import(row)
    else:
        value = row.get(key)
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        value /= MIB
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if key.endswith("_mib"):
        return f"{value:.0f}"
    if key.endswith("_s"):
        return f"{value:.2f}"
    return str(value)


def text_table(report):
    header = [title for title, _ in COLUMNS]
    rows = []
    for row in report["results"]:
        if "error" in row:
            cells = [row["config"], row["backend"], "error: " + row["error"]]
        else:
            cells = [_cell(row, key) for _, key in COLUMNS]
        rows.append(cells)
    widths = [
        max(
            [len(header[i])]
            + [len(r[i]) for r in rows if len(r) == len(header)]
        )
        for i in range(len(header))
    ]
    lines = []
    for cells in [header] + rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        )
    return "\n".join(lines)


RATIO_KEYS = (
    ("weights", lambda r: r["weight_bytes"]),
    ("peak RSS", lambda r: r["peak_rss_mib"]),
    ("warm-up peak", lambda r: r.get("warmup_peak_rss_mib")),
    ("step peak-import", _step_above_import),
    ("s/step", lambda r: r["step_s"]),
)


def _ratios(a, b):
    parts = []
    for name, value in RATIO_KEYS:
        x, y = value(a), value(b)
        if x is not None and y:
            parts.append(f"{name} {x / y:.2f}x")
    return ", ".join(parts)


def ratio_lines(report):
    """Human-readable ratios between the rows of `report`."""
    results = report["results"]
    lines = []
    backends = []
    for row in results:
        if row["backend"] not in backends:
            backends.append(row["backend"])
    for backend in backends:
        base = _find(results, config="float32", backend=backend)
        for row in results:
            if row["backend"] != backend or row["library"] != "ours":
                continue
            if base is not None and row is not base and "error" not in row:
                lines.append(
                    f"{backend}: ours {row['config']} / ours float32: "
                    + _ratios(row, base)
                )
        for mode in ("float32", "int8"):
            ours = _find(results, config=mode, backend=backend)
            theirs = _find(results, config=f"keras_hub-{mode}", backend=backend)
            if ours and theirs:
                lines.append(
                    f"{backend}: ours {mode} / keras_hub {mode}: "
                    + _ratios(ours, theirs)
                )
            failed = [
                r
                for r in results
                if r["backend"] == backend
                and r["config"] == f"keras_hub-{mode}"
                and "error" in r
            ]
            for row in failed:
                lines.append(
                    f"{backend}: keras_hub {mode} failed: {row['error']}"
                )
        for name in ("int8", "int8-float-embedding"):
            row = _find(results, config=name, backend=backend)
            if row and "logit_max_abs_diff" in row:
                lines.append(
                    f"{backend}: ours {name} vs float32 logits on the batch: "
                    f"max |diff| {row['logit_max_abs_diff']:.4f} (mean "
                    f"{row['logit_mean_abs_diff']:.4f}; max |logit| "
                    f"{row['logit_max_abs']:.2f}; argmax agrees on "
                    f"{row['argmax_agreement']:.1%} of positions)"
                )
        # Flags rows whose loss fell by under a tenth of ours float32's.
        drop = 0.0
        if base is not None:
            drop = base["losses"][0] - base["losses"][-1]
        for row in results:
            if row["backend"] == backend and "losses" in row:
                first, last = row["losses"][0], row["losses"][-1]
                if first - last <= 0.1 * drop:
                    lines.append(
                        f"{backend}: {row['config']} does not train: loss "
                        f"{first:.4f} -> {last:.4f} over "
                        f"{len(row['losses'])} steps"
                    )
    return lines


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            result = run_worker(json.loads(sys.argv[2]))
        except Exception as error:  # reported as the row's result
            import traceback

            traceback.print_exc()
            message = f"{type(error).__name__}: {error}".strip()
            result = {"error": " ".join(message.split())[:500]}
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        type=lambda s: _names(s, BACKENDS),
        default=["jax"],
    )
    parser.add_argument(
        "--configs",
        type=lambda s: _names(s, tuple(CONFIGS)),
        default=list(CONFIGS),
    )
    parser.add_argument("--steps", type=int, default=5)
    _common.add_run_options(parser, timeout=600.0, write_readme=False)
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


if __name__ == "__main__":
    main()
