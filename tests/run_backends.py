"""Runs the test suite once per Keras backend and sums the results.

    .venv/bin/python tests/run_backends.py [pytest args]

Keras picks its backend once per process, so each backend is its own pytest
run. Exits non-zero if any run fails or runs no test.

Each run spreads its tests over `TEST_WORKERS` pytest-xdist processes
(default: one per core this process may use, at most 4; `TEST_WORKERS=1`
runs them in one process, in order). Each worker computes on one thread:
on 2 cores, test_sampling.py and test_generation.py on JAX took 98 s in one
process, 88 s on two workers of two threads each, and 77 s on two workers
of one thread each.
"""

import os
import re
import subprocess
import sys
import time

BACKENDS = ("jax", "tensorflow", "torch")
# One compute thread per process, in every library the tests load.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1",
}


def _workers():
    # The cores this process may run on (a container's cpuset), not the
    # host's.
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1
    )
    default = min(cores, 4)
    return int(os.environ.get("TEST_WORKERS", default))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_backends = []
    workers = _workers()
    parallel = (
        ["-n", str(workers), "--dist", "worksteal"] if workers > 1 else []
    )
    threads = ONE_THREAD if workers > 1 else {}
    for backend in os.environ.get("TEST_BACKENDS", ",".join(BACKENDS)).split(
        ","
    ):
        started = time.time()
        print(f"=== KERAS_BACKEND={backend} ===", flush=True)
        env = {
            **os.environ,
            **threads,
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
                *parallel,
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
