"""Speculative decoding by prompt lookup against plain greedy decoding.

    .venv/bin/python benchmarks/speculative.py [--backends jax,tensorflow,torch]
        [--draft-tokens 4] [--new-tokens 128] [--repeats 2] [--quick]
        [--json OUT.json] [--timeout SECONDS]

On the random-weight model of `benchmarks/generate.py`'s small config
(12 layers, hidden 768, vocabulary 32000, window 256), batch 1, greedy,
each backend in a fresh process, two tasks:

- quote: an answer that quotes its context. A random model quotes nothing
  by itself, so the context is made of the model's own answer: `A`, its
  greedy continuation of a random 64-token question `Q`, and the prompt is
  `Q + A + Q` (as a retrieved chunk that holds the answer, then the
  question again). Its continuation need not repeat `A`; the acceptance
  rate says how much it did.
- none: a random 128-token prompt, as generate.py's small config: nothing
  to copy but what the output repeats of itself.

For each task: plain greedy and `speculative="prompt_lookup"` generate
`--new-tokens` tokens (the best of `--repeats` after a warm-up of both);
the row gives tokens/s (new tokens over the whole call, prefill included,
the same for both), the speed-up, the acceptance rate (kept drafts over
drafted tokens) and the tokens per forward pass, and fails if the two
outputs differ (speculative greedy is exact). Not a test: the numbers
depend on the machine.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import generate as generate_bench  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
QUESTION = 64
NONE_PROMPT = 128


def _worker(spec):
    import numpy as np

    import keras_gemma2

    backbone = keras_gemma2.Gemma2Backbone(**spec["model"])
    lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    rng = np.random.default_rng(spec["seed"])
    vocabulary = spec["model"]["vocabulary_size"]
    new = spec["new"]

    def run(prompt, **kwargs):
        ids = np.asarray([prompt], "int32")
        return lm.generate(
            {"token_ids": ids, "padding_mask": np.ones_like(ids)},
            max_new_tokens=new,
            stop_token_ids=None,
            return_details=True,
            **kwargs,
        )[0]

    question = [2] + rng.integers(4, vocabulary, spec["question"] - 1).tolist()
    answer = run(question).token_ids
    tasks = {
        "quote": question + answer + question[1:],
        "none": [2]
        + rng.integers(4, vocabulary, spec["none_prompt"] - 1).tolist(),
    }
    speculative = {
        "speculative": "prompt_lookup",
        "num_draft_tokens": spec["draft_tokens"],
    }
    rows = []
    for task, prompt in tasks.items():
        results = {}
        for name, kwargs in (("plain", {}), ("speculative", speculative)):
            run(prompt, **kwargs)  # warm-up: compiles
            best = None
            for _ in range(spec["repeats"]):
                started = time.perf_counter()
                result = run(prompt, **kwargs)
                seconds = time.perf_counter() - started
                best = seconds if best is None else min(best, seconds)
            results[name] = (best, result)
        (plain_s, plain), (fast_s, fast) = (
            results["plain"],
            results["speculative"],
        )
        # Each forward pass adds one token of the model's own.
        passes = len(fast.token_ids) - fast.accepted_tokens
        rows.append(
            {
                "task": task,
                "prompt": len(prompt),
                "new": new,
                "plain_tok_s": new / plain_s,
                "speculative_tok_s": new / fast_s,
                "speedup": plain_s / fast_s,
                "drafted": fast.draft_tokens,
                "accepted": fast.accepted_tokens,
                "acceptance": fast.accepted_tokens / max(fast.draft_tokens, 1),
                "tokens_per_pass": len(fast.token_ids) / max(passes, 1),
                "identical": plain.token_ids == fast.token_ids,
            }
        )
    return {"rows": rows}


def _table(results):
    lines = [
        "| backend | task | prompt | plain tok/s | speculative tok/s | "
        "speed-up | acceptance | tokens/pass | same output |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, result in results.items():
        if "error" in result:
            lines.append(f"| {backend} | error: {result['error']} |")
            continue
        for row in result["rows"]:
            lines.append(
                f"| {backend} | {row['task']} | {row['prompt']} | "
                f"{row['plain_tok_s']:.1f} | {row['speculative_tok_s']:.1f} "
                f"| {row['speedup']:.2f}x | {row['acceptance']:.0%} "
                f"({row['accepted']}/{row['drafted']}) | "
                f"{row['tokens_per_pass']:.2f} | "
                f"{'yes' if row['identical'] else 'NO'} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument(
        "--backends",
        type=lambda t: _common.names(t, BACKENDS),
        default=list(BACKENDS),
    )
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    quick = args.quick
    spec = {
        "model": generate_bench.QUICK_MODEL if quick else generate_bench.MODEL,
        "question": 16 if quick else QUESTION,
        "none_prompt": 32 if quick else NONE_PROMPT,
        "new": 16 if quick else args.new_tokens,
        "draft_tokens": args.draft_tokens,
        "repeats": args.repeats,
        "seed": 0,
    }
    results = {}
    for backend in args.backends:
        print(f"{backend} ...", file=sys.stderr, flush=True)
        results[backend] = _common.spawn_worker(
            __file__, spec, backend, args.timeout
        )
    print(_table(results))
    print(
        f"\n`{_common.command(__file__)}`, batch 1, greedy, "
        f"{spec['draft_tokens']} draft tokens; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"spec": spec, "results": results}, out, indent=1)
    failed = any(
        "error" in r or not all(row["identical"] for row in r["rows"])
        for r in results.values()
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
