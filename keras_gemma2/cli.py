"""The `keras-gemma2` command line (also `python -m keras_gemma2`)."""

import argparse
import os
import sys

SAMPLERS = ("greedy", "top_k", "top_p")
BACKENDS = ("jax", "tensorflow", "torch")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-gemma2",
        description="Run Gemma 2 models with Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", help="Continue a prompt with a Gemma 2 preset."
    )
    generate.add_argument("prompt", help="The text to continue.")
    generate.add_argument(
        "--preset",
        default="gemma2_tiny_en",
        help="A registered preset name or a preset folder "
        "(default: the bundled gemma2_tiny_en).",
    )
    generate.add_argument(
        "--max-length",
        type=int,
        default=64,
        help="Total length in tokens, prompt included (default: 64).",
    )
    generate.add_argument(
        "--sampler", choices=SAMPLERS, default="greedy", help="default: greedy"
    )
    generate.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else jax).",
    )
    generate.add_argument(
        "--seed", type=int, default=None, help="Seed for the sampler."
    )
    return parser


def _select_backend(backend):
    """Makes Keras use `backend`, re-running this command if needed.

    Keras reads KERAS_BACKEND once, when it is first imported, and importing
    `keras_gemma2` imports Keras: so a different backend needs a new process.
    """
    backend = backend or os.environ.get("KERAS_BACKEND") or "jax"
    os.environ["KERAS_BACKEND"] = backend
    keras = sys.modules.get("keras")
    if keras is not None and keras.config.backend() != backend:
        argv = [sys.executable, "-m", "keras_gemma2", *sys.argv[1:]]
        os.execv(sys.executable, argv)


def _generate(args):
    import keras

    import keras_gemma2

    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    lm = keras_gemma2.Gemma2CausalLM.from_preset(args.preset)
    lm.compile(sampler=args.sampler)
    print(lm.generate(args.prompt, max_length=args.max_length))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "generate" and args.max_length < 2:
        raise SystemExit("keras-gemma2: --max-length must be at least 2.")
    _select_backend(getattr(args, "backend", None))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        _generate(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SystemExit(f"keras-gemma2: {error}")


if __name__ == "__main__":
    main()
