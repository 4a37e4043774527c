"""Two LoRA fine-tunes of gemma2_tiny_en on two tasks, merged: what is kept.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/merge_tasks.py
        [--pairs first-digit:last-digit,successor:predecessor]
        [--epochs 30] [--rank 32] [--targets attention|all|LIST]
        [--seed 0] [--replay N] [--json OUT.json]

For each pair of tasks, two copies of the bundled tiny preset are
fine-tuned from the same initialisation with LoRA (rank 32, alpha 64, on
the attention projections by default, Adam 1e-3 with clipnorm 1, batches
of 16, chat format, seed 0), one per task, and merged with
`keras_gemma2.merging`:

- `slerp t=0.5`: `merging.slerp(init, [a, b], t=0.5)` (WARP's SLERP);
- `lerp t=0.5`: the plain weight average, `merging.liti(a, b, eta=0.5)`;
- `warp eta=0.5`: `merging.warp(init, [a, b], t=0.5, eta=0.5)`;
- `a scaled`, `b scaled`: one fine-tune's task vector times sin(pi/4) /
  sin(pi/2) = 0.707, the weight SLERP gives each of two orthogonal task
  vectors at t=0.5, with the other task vector left out;
- `a + noise`: `a`'s task vector times 0.707 plus, per tensor, a random
  Gaussian tensor of the norm of `b`'s task vector times 0.707: SLERP's
  result for a task vector that carries no function.

The last two rows separate SLERP's shrinking of each task vector from the
interference between them.

Each model is scored on each task's held-out questions in two ways:
multiple choice (the summed log-probability of the right answer against 9
other answers of the same task, as task-arithmetic papers score merged
models) and greedy exact match. The tasks:

- `successor`, `predecessor`, `first-digit`, `middle-digit`,
  `last-digit`: "What number comes after / before N?", "What is the
  first / middle / last digit of N?"; three phrasings of 100 numbers
  train, a fourth phrasing of 60 other numbers tests, so a fine-tune must
  learn the rule, not the answers;
- `glossary`: the bundled glossary (`keras_gemma2.datasets`: 60 invented
  words, 5 phrasings each for training, held-out phrasings for testing);
- `legs`: "How many legs does a <invented animal> have?" for 40 invented
  animals, answered with a number word; three phrasings train, a fourth
  tests;
- `glossary-a`, `glossary-b`: the glossary's words split in two halves.

The glossary and legs are facts the preset cannot know; the number tasks
are rules it can learn from its training text's digits. `--replay N` adds
N generic questions answered by the initial model to each task's training
set (`replay_set`).
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_gemma2
from keras_gemma2 import data
from keras_gemma2 import datasets
from keras_gemma2 import lora
from keras_gemma2 import merging

NUMBERS = (
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "twelve",
)
SYLLABLES = ("ka", "lo", "mi", "ve", "tor", "zan", "dru", "qua", "nek", "ul")


def _glossary(words=None):
    splits = []
    for split in ("train", "test"):
        pairs = data.load_instructions(datasets.instructions_path(split))
        keep = [words is None or r in words for r in pairs["responses"]]
        splits.append(
            {k: [v for v, y in zip(pairs[k], keep) if y] for k in pairs}
        )
    return splits


def _legs():
    rng = np.random.default_rng(7)
    names = set()
    while len(names) < 40:
        names.add("".join(rng.choice(SYLLABLES, 2)))
    phrasings = (
        "How many legs does a {} have?",
        "A {} walks on how many legs?",
        "Count the legs of a {}.",
        "What is the number of legs of a {}?",
    )
    train = {"prompts": [], "responses": []}
    test = {"prompts": [], "responses": []}
    for i, name in enumerate(sorted(names)):
        answer = NUMBERS[i % len(NUMBERS)]
        for phrasing in phrasings[:3]:
            train["prompts"].append(phrasing.format(name))
            train["responses"].append(answer)
        test["prompts"].append(phrasings[3].format(name))
        test["responses"].append(answer)
    return train, test


def _numbers(seed, answer, phrasings, test_phrasing, low=10):
    """Three phrasings of 100 numbers train; 60 other numbers test."""
    numbers = np.random.default_rng(seed).permutation(np.arange(low, 999))
    train_numbers, test_numbers = numbers[:100], numbers[100:160]
    train = {
        "prompts": [p.format(n) for n in train_numbers for p in phrasings],
        "responses": [answer(n) for n in train_numbers for _ in phrasings],
    }
    test = {
        "prompts": [test_phrasing.format(n) for n in test_numbers],
        "responses": [answer(n) for n in test_numbers],
    }
    return train, test


def tasks():
    words = sorted(set(_glossary()[0]["responses"]))
    return {
        "glossary": _glossary(),
        "legs": _legs(),
        "glossary-a": _glossary(set(words[::2])),
        "glossary-b": _glossary(set(words[1::2])),
        "successor": _numbers(
            12,
            lambda n: str(n + 1),
            (
                "What number comes after {}?",
                "Which number follows {}?",
                "Add one to {}.",
            ),
            "What is the next number after {}?",
        ),
        "predecessor": _numbers(
            13,
            lambda n: str(n - 1),
            (
                "What number comes before {}?",
                "Which number precedes {}?",
                "Subtract one from {}.",
            ),
            "What is the number just before {}?",
        ),
        "last-digit": _numbers(
            14,
            lambda n: str(n % 10),
            (
                "What is the last digit of {}?",
                "Which digit does {} end with?",
                "Name the final digit of {}.",
            ),
            "Tell me the last digit of {}.",
        ),
        "first-digit": _numbers(
            15,
            lambda n: str(n // 100),
            (
                "What is the first digit of {}?",
                "Which digit does {} start with?",
                "Name the leading digit of {}.",
            ),
            "Tell me the first digit of {}.",
            low=100,
        ),
        "middle-digit": _numbers(
            16,
            lambda n: str(n // 10 % 10),
            (
                "What is the middle digit of {}?",
                "Which digit is in the middle of {}?",
                "Name the tens digit of {}.",
            ),
            "Tell me the middle digit of {}.",
            low=100,
        ),
    }


def replay_set(init, size):
    """`size` generic questions answered by `init`'s own greedy replies.

    Random words of the vocabulary and random numbers in generic templates,
    none from a task. Trained on beside a task, they teach the fine-tune to
    leave the model as it was wherever its task does not ask for a change,
    as WARP's KL term to the anchor does on the policy's prompts.
    """
    tokenizer = init.preprocessor.tokenizer
    rng = np.random.default_rng(123)
    vocabulary = [
        tokenizer.id_to_token(i) for i in range(tokenizer.vocabulary_size())
    ]
    words = [
        v[1:]
        for v in vocabulary
        if v.startswith("\u2581") and v[1:].isalpha() and len(v) > 3
    ]
    templates = (
        "What is {}?",
        "Tell me about {}.",
        "Define {}.",
        "How many {} are there?",
        "Which {} is it?",
        "Explain {} briefly.",
        "Name the {}.",
        "What does {} mean?",
    )
    with_numbers = (
        "What is the {} of {}?",
        "Tell me the {} of {}.",
        "Which {} does {} have?",
        "Is {} {}?",
    )
    prompts = []
    for i in range(size):
        word = " ".join(rng.choice(words, rng.integers(1, 3)))
        number = int(rng.integers(10, 999))
        if i % 2:
            prompts.append(templates[i % len(templates)].format(word))
        elif i % 4:
            prompts.append(rng.choice(with_numbers).format(word, number))
        else:
            prompts.append(templates[i % len(templates)].format(number))
    chat = [
        keras_gemma2.format_chat([{"role": "user", "content": p}])
        for p in prompts
    ]
    replies = init.generate(chat, max_new_tokens=4, strip_prompt=True)
    return {
        "prompts": prompts,
        "responses": [r.strip() or "." for r in replies],
    }


SEED = 0  # of the LoRA initialisation and the shuffling; --seed


def _load(preset="gemma2_tiny_en"):
    keras.utils.set_random_seed(SEED)
    lm = keras_gemma2.Gemma2CausalLM.from_preset(preset)
    lm.preprocessor.sequence_length = 40
    lm.compile(sampler="greedy")
    return lm


def fine_tune(train, epochs, rank, targets):
    lm = _load()
    lora.enable(lm.backbone, rank=rank, alpha=2 * rank, targets=targets)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0), sampler="greedy"
    )
    lm.fit(data.as_chat(train), batch_size=16, epochs=epochs, verbose=0)
    return lm


def multiple_choice(lm, pairs, options=10):
    """Share of questions whose answer outscores 9 others of the task.

    Fewer when the task has fewer answers: a first digit has 9.
    """
    answers = sorted(set(pairs["responses"]))
    options = min(options, len(answers))
    rng = np.random.default_rng(0)
    prompts, responses = [], []
    for prompt, answer in zip(pairs["prompts"], pairs["responses"]):
        others = [a for a in answers if a != answer]
        choices = [answer] + list(rng.choice(others, options - 1, False))
        prompts += [prompt] * options
        responses += [str(c) for c in choices]
    chat = data.as_chat({"prompts": prompts, "responses": responses})
    scores = []
    for i in range(0, len(prompts), 200):
        batch = {k: v[i : i + 200] for k, v in chat.items()}
        x, _, response = lm.preprocessor(batch)
        # `score`'s token t is the label at t - 1: sum the response's.
        log_probs = lm.score(x["token_ids"], x["padding_mask"])
        response = keras.ops.convert_to_numpy(response)
        scores.append((log_probs[:, 1:] * response[:, :-1]).sum(-1))
    scores = np.concatenate(scores).reshape(-1, options)
    return float(np.mean(scores.argmax(-1) == 0))


def exact_match(lm, pairs):
    prompts = [
        keras_gemma2.format_chat([{"role": "user", "content": p}])
        for p in pairs["prompts"]
    ]
    answers = lm.generate(prompts, max_new_tokens=4, strip_prompt=True)
    return float(
        np.mean([a.strip() == r for a, r in zip(answers, pairs["responses"])])
    )


def _with_noise(init, a, b):
    """`init + 0.707 (d_a + r)`, r random with |r| = |d_b| per tensor."""
    rng = np.random.default_rng(0)
    # Plain copies with the effective (base + LoRA) kernels, no adapters.
    a, b = merging.liti(init, a, eta=1.0), merging.liti(init, b, eta=1.0)
    arrays = []
    for w0, wa, wb in zip(init.weights, a.weights, b.weights):
        w0, wa, wb = (keras.ops.convert_to_numpy(w) for w in (w0, wa, wb))
        noise = rng.standard_normal(w0.shape)
        noise *= np.linalg.norm(wb - w0) / max(np.linalg.norm(noise), 1e-12)
        arrays.append(w0 + np.sin(np.pi / 4) * (wa - w0 + noise))
    model = _load()
    for variable, value in zip(model.weights, arrays):
        variable.assign(value.astype(variable.dtype))
    return model


def run_pair(name_a, name_b, all_tasks, epochs, rank, targets, replay):
    (train_a, test_a), (train_b, test_b) = all_tasks[name_a], all_tasks[name_b]
    init = _load()
    if replay:
        extra = replay_set(init, replay)
        train_a, train_b = (
            {k: list(t[k]) + extra[k] for k in extra}
            for t in (train_a, train_b)
        )
    start = time.time()
    a = fine_tune(train_a, epochs, rank, targets)
    b = fine_tune(train_b, epochs, rank, targets)
    print(f"fine-tuned both in {time.time() - start:.0f} s", flush=True)
    scale = float(np.sin(np.pi / 4))
    models = {
        "base": init,
        "a": a,
        "b": b,
        "slerp t=0.5": merging.slerp(init, [a, b], t=0.5),
        "lerp t=0.5": merging.liti(a, b, eta=0.5),
        "warp eta=0.5": merging.warp(init, [a, b], t=0.5, eta=0.5),
        "a scaled": merging.liti(init, a, eta=scale),
        "b scaled": merging.liti(init, b, eta=scale),
        "a + noise": _with_noise(init, a, b),
    }
    rows = {}
    for label, model in models.items():
        model.compile(sampler="greedy")
        rows[label] = {
            task: {
                "choice": multiple_choice(model, test),
                "exact": exact_match(model, test),
            }
            for task, test in ((name_a, test_a), (name_b, test_b))
        }
        print(label, json.dumps(rows[label]), flush=True)
    return rows


def print_table(pair, rows):
    name_a, name_b = pair
    print(f"\n{name_a} (a) + {name_b} (b): held-out multiple choice / exact")
    print(f"| model | {name_a} | kept | {name_b} | kept |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        cells = []
        for task, own in ((name_a, "a"), (name_b, "b")):
            score = row[task]
            kept = score["choice"] / rows[own][task]["choice"]
            cells.append(f"{score['choice']:.3f} / {score['exact']:.3f}")
            cells.append(f"{kept:.0%}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", default="first-digit:last-digit,successor:predecessor"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--targets",
        default="attention",
        help="`attention` (query, key, value, output), `all` (the seven "
        "projections) or a comma-separated list of `lora.enable` targets",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replay",
        type=int,
        default=0,
        help="train each fine-tune also on this many generic questions "
        "answered by the initial model (`replay_set`)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    global SEED
    SEED = args.seed
    all_tasks = tasks()
    targets = {"attention": lora.ATTENTION_TARGETS, "all": "all"}.get(
        args.targets, tuple(args.targets.split(","))
    )
    results = {
        "backend": keras.config.backend(),
        "epochs": args.epochs,
        "rank": args.rank,
        "targets": args.targets,
        "seed": args.seed,
        "replay": args.replay,
    }
    for pair in args.pairs.split(","):
        names = tuple(pair.split(":"))
        results[pair] = run_pair(
            *names, all_tasks, args.epochs, args.rank, targets, args.replay
        )
    for pair in args.pairs.split(","):
        print_table(tuple(pair.split(":")), results[pair])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
