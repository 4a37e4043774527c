"""What importing costs: ours next to KerasHub and transformers, per backend.

    .venv/bin/python benchmarks/import_cost.py [--repeats 3] [--json OUT]

Each import runs in a fresh interpreter, `--repeats` times; the table shows
the median wall time of the import statement and the process's peak RSS
after it, which backends it loaded, and ratios to KerasHub's own import.
`transformers` does not use a Keras backend: it is measured once.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

BACKENDS = ("jax", "tensorflow", "torch")
HEAVY = ("tensorflow", "jax", "torch", "keras", "keras_hub", "transformers")

# name -> the statement timed.
OURS = {
    "import keras_gemma2": "import keras_gemma2",
    "keras_gemma2.Gemma2CausalLM": "from keras_gemma2 import Gemma2CausalLM",
    "keras-gemma2 --help": (
        "from keras_gemma2.cli import build_parser; "
        "build_parser().format_help()"
    ),
}
PEERS = {
    "import keras_hub": "import keras_hub",
    "keras_hub GemmaCausalLM": "from keras_hub.models import GemmaCausalLM",
}
TRANSFORMERS = {
    "import transformers": "import transformers",
    "transformers Gemma2ForCausalLM": (
        "from transformers import Gemma2ForCausalLM"
    ),
}

_PROBE = """
import json, resource, sys, time
started = time.perf_counter()
{statement}
seconds = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"seconds": seconds, "rss": rss, "loaded": loaded}}))
"""


def measure(statement, backend, repeats):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _PROBE.format(statement=statement, heavy=HEAVY),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "rss_mb": statistics.median(r["rss"] for r in runs) / 1e6,
        "loaded": runs[-1]["loaded"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", help="Also write the rows here.")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        base = measure(PEERS["import keras_hub"], backend, args.repeats)
        for name, statement in {**OURS, **PEERS}.items():
            row = measure(statement, backend, args.repeats)
            row.update(
                backend=backend,
                name=name,
                time_ratio=row["seconds"] / base["seconds"],
                rss_ratio=row["rss_mb"] / base["rss_mb"],
            )
            rows.append(row)
    for name, statement in TRANSFORMERS.items():
        rows.append(
            {
                "backend": "-",
                "name": name,
                **measure(statement, "torch", args.repeats),
            }
        )
    print(
        f"{'backend':10} {'what':32} {'seconds':>8} {'peak RSS MB':>12} "
        f"{'x keras_hub':>12}  loads"
    )
    for row in rows:
        ratio = (
            f"{row['time_ratio']:.2f}/{row['rss_ratio']:.2f}"
            if "time_ratio" in row
            else "-"
        )
        print(
            f"{row['backend']:10} {row['name']:32} {row['seconds']:8.2f} "
            f"{row['rss_mb']:12.0f} {ratio:>12}  "
            f"{','.join(row['loaded']) or '-'}"
        )
    print("x keras_hub: time/RSS ratio to `import keras_hub` on that backend")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
