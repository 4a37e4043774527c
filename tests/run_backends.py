"""Runs the test suite once per Keras backend and sums the results.

    .venv/bin/python tests/run_backends.py [pytest args]

Keras picks its backend once per process, so each backend is its own pytest
run. Exits non-zero if any run fails or runs no test.
"""

import os
import re
import subprocess
import sys
import time

BACKENDS = ("jax", "tensorflow", "torch")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_backends = []
    for backend in os.environ.get("TEST_BACKENDS", ",".join(BACKENDS)).split(
        ","
    ):
        started = time.time()
        print(f"=== KERAS_BACKEND={backend} ===", flush=True)
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *sys.argv[1:],
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        sys.stdout.write(result.stdout[-20000:])
        if result.returncode != 0:
            sys.stdout.write(result.stderr[-5000:])
            failed_backends.append(backend)
        summary = result.stdout.strip().splitlines()[-1:] or [""]
        for count, word in re.findall(
            r"(\d+) (passed|failed|skipped|error)", summary[0]
        ):
            totals[word] += int(count)
        print(f"=== {backend}: {time.time() - started:.0f}s ===", flush=True)
    print(f"backends failing: {failed_backends or 'none'}")
    failed = totals["failed"] + totals["error"]
    print(
        f"{totals['passed']} passed, {failed} failed, "
        f"{totals['skipped']} skipped"
    )
    sys.exit(1 if failed_backends or totals["passed"] == 0 else 0)


if __name__ == "__main__":
    main()
