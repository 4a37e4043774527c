"""Decode-step matrix products on PyTorch: oneDNN's `F.linear` against the
compiled GEMV of `keras_gemma2.layers.direct`, per Gemma matrix shape.

    KERAS_BACKEND=torch .venv/bin/python benchmarks/gemv.py [--repeats 50]

One row (a batch-1 decode step) times each `[out, in]` matrix of the
benchmark's small config and of the 2B, in float32 and bfloat16, and prints
GB/s of weights read and the ratio compiled / linear. `direct._GEMV_ROWS`
and `direct._GEMV_MIN_WEIGHTS` are set from these figures. Run it on a quiet
machine: a second process on a 2-core machine halves oneDNN's figures.
Not a test.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402

from keras_gemma2.layers import direct  # noqa: E402

SHAPES = (
    (384, 768),
    (768, 768),
    (3072, 768),
    (768, 3072),
    (1024, 2304),
    (2048, 2304),
    (9216, 2304),
    (2304, 9216),
)


def _seconds(fn, args, repeats):
    for _ in range(5):
        fn(*args)
    started = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    compiled = direct._compiled_gemv()
    print("dtype     out x in      linear GB/s  compiled GB/s  ratio")
    for dtype in (torch.float32, torch.bfloat16):
        for out_size, in_size in SHAPES:
            weight = torch.randn(out_size, in_size, dtype=dtype)
            x = torch.randn(1, in_size, dtype=dtype)
            gigabytes = weight.numel() * weight.element_size() / 1e9
            linear = _seconds(
                torch.nn.functional.linear, (x, weight), args.repeats
            )
            gemv = _seconds(compiled, (x, weight), args.repeats)
            print(
                f"{str(dtype)[6:]:9} {out_size:5} x {in_size:<5}  "
                f"{gigabytes / linear:11.1f}  {gigabytes / gemv:13.1f}  "
                f"{linear / gemv:5.2f}x"
            )


if __name__ == "__main__":
    main()
