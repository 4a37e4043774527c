"""The `keras-gemma2` argument parser: one subparser per command, with its
handler in `commands` as `func`, shared options from parent parsers, and
range checks as `type=` callables."""

import argparse

from keras_gemma2.cli import commands as handlers

SAMPLERS = ("greedy", "top_k", "top_p")
BACKENDS = ("jax", "tensorflow", "torch")


def build_parser():
    """The `keras-gemma2` parser: one subparser per command, each with its
    handler as `func`, shared options from parent parsers, and range checks
    as `type=` callables (so a bad value is argparse's usage error)."""
    parser = argparse.ArgumentParser(
        prog="keras-gemma2",
        description="Run Gemma 2 models with Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verbose = _parent(_add_verbose)
    backend = _parent(_add_backend, _add_verbose)
    sampling = _parent(_add_sampling)

    generate = commands.add_parser(
        "generate",
        parents=[backend, sampling],
        help="Continue a prompt with a Gemma 2 preset.",
    )
    generate.add_argument("prompt", help="The text to continue.")
    _add_preset(generate, " (default: the bundled gemma2_tiny_en).")
    length = generate.add_mutually_exclusive_group()
    length.add_argument(
        "--max-length",
        type=_at_least(2, _GENERATE_LENGTHS),
        help="Total length in tokens, prompt included (default: 64).",
    )
    length.add_argument(
        "--max-new-tokens",
        type=_at_least(1, _GENERATE_LENGTHS),
        help="Tokens to generate after the prompt.",
    )
    generate.set_defaults(func=handlers.generate)

    chat = commands.add_parser(
        "chat",
        parents=[backend, sampling],
        help="Chat with an instruction-tuned preset; replies stream as they "
        "are generated. /reset forgets the conversation, /exit ends it.",
    )
    _add_preset(
        chat,
        ", e.g. gemma2_instruct_2b_en (default: the bundled gemma2_tiny_en, "
        "which is not instruction-tuned).",
    )
    _add_max_new_tokens(chat, "The longest reply")
    chat.add_argument(
        "--system", help="Text prepended to the first user message."
    )
    chat.set_defaults(func=handlers.chat)

    _add_finetune_command(commands, backend)

    convert = commands.add_parser(
        "convert",
        parents=[backend],
        help="Convert a Gemma 2 checkpoint (keras_gemma2, KerasHub or "
        "Hugging Face) to a keras_gemma2 preset or a transformers folder.",
    )
    convert.add_argument("source", help="A preset name, folder or handle.")
    convert.add_argument("destination", help="The folder to write.")
    convert.add_argument(
        "--to",
        choices=("keras", "transformers"),
        default="keras",
        help="Output format (default: keras, a keras_gemma2 preset).",
    )
    convert.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="Weights dtype (default: the source's).",
    )
    convert.set_defaults(func=handlers.convert)

    _add_rag_commands(commands, verbose, backend)
    return parser


# Range errors: argparse prints them after the option's name.
_GENERATE_LENGTHS = (
    "--max-length must be at least 2, and --max-new-tokens at least 1"
)


def _at_least(minimum, message):
    """A `type=` for whole numbers of at least `minimum`."""
    return _number(int, "a whole number", message, minimum)


def _fraction(message):
    """A `type=` for numbers in [0, 1)."""
    return _number(float, "a number", message, 0, below=1)


def _number(kind, noun, message, minimum, below=None):
    """A `type=`: `kind(text)` in `[minimum, below)`, else argparse's usage
    error with `message`."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}")
        if value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"{message}; got {value}")
        return value

    return parse


def _parent(*adders):
    """A parent parser holding the options that `adders` declare."""
    parent = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _add_verbose(parser):
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Show every message of the backends, start-up INFO lines "
        "included (by default they are dropped; warnings and errors show).",
    )


def _add_backend(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else jax).",
    )


def _add_sampling(parser):
    parser.add_argument(
        "--sampler", choices=SAMPLERS, default="greedy", help="default: greedy"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="Seed for the sampler."
    )


def _add_preset(parser, help_tail, default="gemma2_tiny_en"):
    parser.add_argument(
        "--preset",
        default=default,
        help=f"A registered preset name or a preset folder{help_tail}",
    )


def _add_max_new_tokens(parser, what):
    parser.add_argument(
        "--max-new-tokens",
        type=_at_least(1, "--max-new-tokens must be at least 1"),
        default=256,
        help=f"{what}, in tokens (default: 256).",
    )


def _add_finetune_command(commands, backend):
    finetune = commands.add_parser(
        "finetune",
        parents=[backend],
        help="Fine-tune a preset with LoRA on prompt/response pairs (JSONL "
        "or CSV); writes a preset folder that from_preset and generate load.",
    )
    _add_preset(finetune, " to start from (default: gemma2_tiny_en).")
    finetune.add_argument(
        "--data", required=True, help="A .jsonl or .csv file of pairs."
    )
    finetune.add_argument("--prompt-key", default="prompt")
    finetune.add_argument("--response-key", default="response")
    finetune.add_argument(
        "--output", required=True, help="The preset folder to write."
    )
    finetune.add_argument(
        "--quantize",
        choices=("int8",),
        help="Quantize the base weights before LoRA training (QLoRA-style).",
    )
    finetune.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "mixed_bfloat16"),
        help="Weights and compute dtype (default: the preset's); "
        "mixed_bfloat16 keeps float32 weights and computes in bfloat16.",
    )
    _add_lora_options(finetune.add_argument_group("LoRA"))
    _add_training_options(finetune.add_argument_group("training"))
    finetune.set_defaults(func=handlers.finetune)


def _add_lora_options(lora):
    lora.add_argument(
        "--adapter",
        help="Also write the LoRA adapters alone to this .safetensors file.",
    )
    lora.add_argument(
        "--lora-rank",
        type=_at_least(0, "--lora-rank must be >= 0"),
        default=4,
        help="LoRA rank (default: 4); 0 fine-tunes every weight.",
    )
    lora.add_argument(
        "--lora-alpha", type=float, help="LoRA alpha (default: the rank)."
    )
    lora.add_argument(
        "--lora-targets",
        default="query,value",
        help="Comma-separated among query, key, value, attention_output, "
        "ffw_gating, ffw_gating_2, ffw_linear; or all (default: "
        "query,value).",
    )
    lora.add_argument(
        "--lora-dropout",
        type=_fraction("--lora-dropout must be in [0, 1)"),
        default=0.0,
        help="Dropout on the adapters' input in training (default: 0).",
    )
    lora.add_argument(
        "--peft",
        help="Also write the adapters as a Hugging Face PEFT folder here.",
    )


def _add_training_options(training):
    training.add_argument(
        "--gradient-accumulation",
        type=_at_least(1, "--gradient-accumulation must be at least 1"),
        default=1,
        help="Apply the gradients of this many batches at once (default: 1).",
    )
    training.add_argument(
        "--backup-dir",
        help="Back up training state here each epoch and resume from it "
        "when the same command is run again after an interruption.",
    )
    training.add_argument(
        "--epochs", type=_at_least(1, "--epochs must be at least 1"), default=1
    )
    training.add_argument(
        "--batch-size",
        type=_at_least(1, "--batch-size must be at least 1"),
        default=8,
    )
    training.add_argument("--learning-rate", type=float, default=1e-3)
    training.add_argument(
        "--sequence-length",
        type=_at_least(2, "--sequence-length must be at least 2"),
        default=256,
        help="Tokens per example; longer responses are cut (default: 256).",
    )
    training.add_argument(
        "--no-chat",
        action="store_true",
        help="Train on the raw prompt and response, not Gemma chat turns.",
    )
    training.add_argument("--seed", type=int, default=None, help="Seed.")


def _add_rag_commands(commands, verbose, backend):
    rag = commands.add_parser(
        "rag",
        help="Answer questions from your documents: index them into a local "
        "Chroma database, then ask.",
    )
    rag_commands = rag.add_subparsers(dest="rag_command", required=True)
    index = rag_commands.add_parser(
        "index",
        parents=[verbose],
        help="Index text and Markdown files into a Chroma database; run it "
        "again to index only what changed.",
    )
    index.add_argument("docs_dir", help="The folder of documents.")
    index.add_argument(
        "--db", required=True, help="The database folder (created if missing)."
    )
    index.add_argument(
        "--glob",
        action="append",
        help="Files to index, relative to DOCS_DIR; repeatable (default: "
        "**/*.md and **/*.txt).",
    )
    index.add_argument("--chunk-size", type=int, default=1000)
    index.add_argument("--chunk-overlap", type=int, default=200)
    index.add_argument(
        "--embedding",
        help="An embedding model folder or cached Hugging Face id (default: "
        "the database's model, else the bundled all-MiniLM-L6-v2).",
    )
    index.set_defaults(func=handlers.rag_index)
    ask = rag_commands.add_parser(
        "ask",
        parents=[backend],
        help="Answer a question from the nearest chunks of a database, and "
        "print the sources.",
    )
    ask.add_argument("question")
    ask.add_argument("--db", required=True, help="A database from rag index.")
    ask.add_argument(
        "--k",
        type=_at_least(1, "--k must be at least 1"),
        default=3,
        help="Chunks to retrieve (default: 3).",
    )
    _add_preset(
        ask,
        " (default: the bundled gemma2_tiny_en, a toy whose answers are not "
        "meaningful).",
    )
    _add_max_new_tokens(ask, "The longest answer")
    ask.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="Ask in a Gemma chat turn (default: if the preset's name says "
        "instruct or -it).",
    )
    ask.add_argument(
        "--embedding", help="The database's embedding model (default: it)."
    )
    ask.set_defaults(func=handlers.rag_ask)
