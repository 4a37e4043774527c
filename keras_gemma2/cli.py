"""The `keras-gemma2` command line (also `python -m keras_gemma2`)."""

import argparse
import os
import sys
import warnings

# Standard library only at import time, so that `--help` imports no backend.
from keras_gemma2 import log_filter

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
    length = generate.add_mutually_exclusive_group()
    length.add_argument(
        "--max-length",
        type=int,
        help="Total length in tokens, prompt included (default: 64).",
    )
    length.add_argument(
        "--max-new-tokens",
        type=int,
        help="Tokens to generate after the prompt.",
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
    chat = commands.add_parser(
        "chat",
        help="Chat with an instruction-tuned preset; replies stream as they "
        "are generated. /reset forgets the conversation, /exit ends it.",
    )
    chat.add_argument(
        "--preset",
        default="gemma2_tiny_en",
        help="A registered preset name or folder, e.g. gemma2_instruct_2b_en "
        "(default: the bundled gemma2_tiny_en, which is not instruction-"
        "tuned).",
    )
    chat.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="The longest reply, in tokens (default: 256).",
    )
    chat.add_argument(
        "--system", help="Text prepended to the first user message."
    )
    chat.add_argument(
        "--sampler", choices=SAMPLERS, default="greedy", help="default: greedy"
    )
    chat.add_argument("--backend", choices=BACKENDS, help="Keras backend.")
    chat.add_argument("--seed", type=int, default=None, help="Sampler seed.")
    finetune = commands.add_parser(
        "finetune",
        help="Fine-tune a preset with LoRA on prompt/response pairs (JSONL "
        "or CSV); writes a preset folder that from_preset and generate load.",
    )
    finetune.add_argument(
        "--preset", default="gemma2_tiny_en", help="The base preset."
    )
    finetune.add_argument(
        "--data", required=True, help="A .jsonl or .csv file of pairs."
    )
    finetune.add_argument("--prompt-key", default="prompt")
    finetune.add_argument("--response-key", default="response")
    finetune.add_argument(
        "--output", required=True, help="The preset folder to write."
    )
    finetune.add_argument(
        "--adapter",
        help="Also write the LoRA adapters alone to this .safetensors file.",
    )
    finetune.add_argument(
        "--lora-rank",
        type=int,
        default=4,
        help="LoRA rank (default: 4); 0 fine-tunes every weight.",
    )
    finetune.add_argument(
        "--lora-alpha", type=float, help="LoRA alpha (default: the rank)."
    )
    finetune.add_argument(
        "--lora-targets",
        default="query,value",
        help="Comma-separated among query, key, value, attention_output, "
        "ffw_gating, ffw_gating_2, ffw_linear; or all (default: "
        "query,value).",
    )
    finetune.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        help="Dropout on the adapters' input in training (default: 0).",
    )
    finetune.add_argument(
        "--peft",
        help="Also write the adapters as a Hugging Face PEFT folder here.",
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
    finetune.add_argument(
        "--gradient-accumulation",
        type=int,
        default=1,
        help="Apply the gradients of this many batches at once (default: 1).",
    )
    finetune.add_argument(
        "--backup-dir",
        help="Back up training state here each epoch and resume from it "
        "when the same command is run again after an interruption.",
    )
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--learning-rate", type=float, default=1e-3)
    finetune.add_argument(
        "--sequence-length",
        type=int,
        default=256,
        help="Tokens per example; longer responses are cut (default: 256).",
    )
    finetune.add_argument(
        "--no-chat",
        action="store_true",
        help="Train on the raw prompt and response, not Gemma chat turns.",
    )
    finetune.add_argument("--backend", choices=BACKENDS, help="Keras backend.")
    finetune.add_argument("--seed", type=int, default=None, help="Seed.")
    convert = commands.add_parser(
        "convert",
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
    convert.add_argument("--backend", choices=BACKENDS, help="Keras backend.")
    for command in (generate, chat, finetune, convert):
        _add_verbose(command)
    _add_rag_commands(commands)
    return parser


def _add_verbose(parser):
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Show every message of the backends, start-up INFO lines "
        "included (by default they are dropped; warnings and errors show).",
    )


def _add_rag_commands(commands):
    rag = commands.add_parser(
        "rag",
        help="Answer questions from your documents: index them into a local "
        "Chroma database, then ask.",
    )
    rag_commands = rag.add_subparsers(dest="rag_command", required=True)
    index = rag_commands.add_parser(
        "index",
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
    ask = rag_commands.add_parser(
        "ask",
        help="Answer a question from the nearest chunks of a database, and "
        "print the sources.",
    )
    ask.add_argument("question")
    ask.add_argument("--db", required=True, help="A database from rag index.")
    ask.add_argument(
        "--k", type=int, default=3, help="Chunks to retrieve (default: 3)."
    )
    ask.add_argument(
        "--preset",
        default="gemma2_tiny_en",
        help="A preset name or folder (default: the bundled gemma2_tiny_en, "
        "a toy whose answers are not meaningful).",
    )
    ask.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="The longest answer, in tokens (default: 256).",
    )
    ask.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="Ask in a Gemma chat turn (default: if the preset's name says "
        "instruct or -it).",
    )
    ask.add_argument(
        "--embedding", help="The database's embedding model (default: it)."
    )
    ask.add_argument("--backend", choices=BACKENDS, help="Keras backend.")
    for command in (index, ask):
        _add_verbose(command)


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
    # Imported once _select_backend has set KERAS_BACKEND (see main).
    import keras

    import keras_gemma2

    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    lm = keras_gemma2.Gemma2CausalLM.from_preset(args.preset)
    lm.compile(sampler=args.sampler)
    if args.max_length is None and args.max_new_tokens is None:
        args.max_length = 64
    pieces = lm.generate(
        args.prompt,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        stream=True,
    )
    # The prompt, then each piece as it is sampled.
    print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def _chat(args):
    # Imported once _select_backend has set KERAS_BACKEND (see main).
    import keras

    import keras_gemma2
    from keras_gemma2.chat import chat

    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    lm = keras_gemma2.Gemma2CausalLM.from_preset(args.preset)
    lm.compile(sampler=args.sampler)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.preset}. /reset forgets, /exit ends.")

    def read():
        return input("> " if interactive else "")

    chat(
        lm,
        input_fn=read,
        max_new_tokens=args.max_new_tokens,
        system=args.system,
    )


def _finetune(args):
    # Imported once _select_backend has set KERAS_BACKEND (see main).
    import keras

    import keras_gemma2
    from keras_gemma2 import data
    from keras_gemma2 import lora

    if os.path.exists(args.output) and os.listdir(args.output):
        raise ValueError(
            f"{args.output} exists and is not empty; choose a new folder so "
            "that nothing already there is overwritten."
        )
    pairs = data.load_instructions(
        args.data, prompt_key=args.prompt_key, response_key=args.response_key
    )
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    if args.quantize and not args.lora_rank:
        raise ValueError(
            "--quantize trains LoRA adapters on an int8 base; int8 weights "
            "cannot be fine-tuned themselves. Pass --lora-rank > 0."
        )
    for flag, value in (("--peft", args.peft), ("--adapter", args.adapter)):
        if value and not args.lora_rank:
            raise ValueError(f"{flag} needs LoRA: pass --lora-rank > 0.")
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    lm = keras_gemma2.Gemma2CausalLM.from_preset(args.preset, **kwargs)
    if not args.no_chat:
        # Refuses a vocabulary without turn markers (then pass --no-chat).
        pairs = data.as_chat(pairs, tokenizer=lm.preprocessor.tokenizer)
    lm.preprocessor.sequence_length = args.sequence_length
    if args.quantize:
        lm.quantize(args.quantize)
    if args.lora_rank:
        targets = args.lora_targets
        lora.enable(
            lm.backbone,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            targets=targets if targets == "all" else targets.split(","),
            dropout=args.lora_dropout,
            seed=args.seed,
        )
    lm.compile(
        optimizer=keras.optimizers.Adam(
            args.learning_rate,
            clipnorm=1.0,
            gradient_accumulation_steps=(
                args.gradient_accumulation
                if args.gradient_accumulation > 1
                else None
            ),
        )
    )
    callbacks = []
    if args.backup_dir:
        from keras_gemma2.callbacks import BackupAndRestore

        callbacks.append(BackupAndRestore(args.backup_dir))
    lm.fit(
        pairs,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=1,
    )
    lm.save_to_preset(args.output)
    print(f"wrote {args.output}")
    if args.adapter:
        lora.save_adapters(lm.backbone, args.adapter)
        print(f"wrote {args.adapter}")
    if args.peft:
        lora.export_peft(lm.backbone, args.peft)
        print(f"wrote {args.peft}")


def _convert(args):
    # Imported once _select_backend has set KERAS_BACKEND (see main).
    import keras

    import keras_gemma2
    from keras_gemma2.convert import loader

    if os.path.exists(args.destination) and os.listdir(args.destination):
        raise ValueError(
            f"{args.destination} exists and is not empty; choose a new folder "
            "so that nothing already there is overwritten."
        )
    bar = {}

    def progress(done, total):
        if "bar" not in bar:
            bar["bar"] = keras.utils.Progbar(total, unit_name="tensor")
        bar["bar"].update(done)

    cls = keras_gemma2.Gemma2CausalLM
    preset, kwargs = keras_gemma2.presets.resolve(
        args.source, {"dtype": args.dtype} if args.dtype else {}
    )
    if not loader.has_tokenizer(preset):
        print(f"{args.source} has no tokenizer: converting the model alone.")
        kwargs["preprocessor"] = None
    lm = loader.load_foreign(cls, preset, kwargs, progress=progress)
    if lm is None:
        lm = cls.from_preset(preset, **kwargs)
    if args.to == "transformers":
        lm.export_to_transformers(args.destination)
    else:
        lm.save_to_preset(args.destination)
    print(f"wrote {args.destination}")


def _rag_index(args):
    # Not at the top: `--help` imports the standard library only.
    from keras_gemma2 import rag

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = rag.index(
                args.docs_dir,
                args.db,
                glob=args.glob or rag.store.DEFAULT_GLOBS,
                chunk_size=args.chunk_size,
                chunk_overlap=args.chunk_overlap,
                embedding=args.embedding,
            )
        finally:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
    counts = ", ".join(
        f"{len(getattr(report, f'{kind}_files'))} {kind}"
        for kind in ("added", "updated", "removed", "unchanged", "skipped")
    )
    if report.written:
        print(
            f"indexed {args.docs_dir} into {args.db}: {counts} files; "
            f"{report.chunks_added} chunks added, {report.chunks_removed} "
            "removed"
        )
    else:
        print(f"{args.db} is up to date ({counts} files); nothing written")


def _rag_ask(args):
    # Not at the top: `--help` imports the standard library only.
    from keras_gemma2 import rag

    answer = rag.ask(
        args.question,
        args.db,
        k=args.k,
        lm=args.preset,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        embedding=args.embedding,
    )
    print(answer.text)
    print("\nSources:")
    for number, hit in enumerate(answer.sources, 1):
        print(
            f"  [{number}] {hit.source}, chunk {hit.chunk} "
            f"(distance {hit.distance:.3f})"
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "generate" and (
        (args.max_length is not None and args.max_length < 2)
        or (args.max_new_tokens is not None and args.max_new_tokens < 1)
    ):
        raise SystemExit(
            "keras-gemma2: --max-length must be at least 2, and "
            "--max-new-tokens at least 1."
        )
    if args.command == "chat" and args.max_new_tokens < 1:
        raise SystemExit("keras-gemma2: --max-new-tokens must be at least 1.")
    if (
        args.command == "rag"
        and args.rag_command == "ask"
        and (args.k < 1 or args.max_new_tokens < 1)
    ):
        raise SystemExit(
            "keras-gemma2: --k and --max-new-tokens must be at least 1."
        )
    if args.command == "finetune" and (
        args.lora_rank < 0
        or args.epochs < 1
        or args.batch_size < 1
        or args.gradient_accumulation < 1
        or not 0 <= args.lora_dropout < 1
    ):
        raise SystemExit(
            "keras-gemma2: --lora-rank must be >= 0, --epochs, "
            "--batch-size and --gradient-accumulation >= 1, and "
            "--lora-dropout in [0, 1)."
        )
    _select_backend(getattr(args, "backend", None))
    if args.verbose:
        _run(args)
    else:
        # Set before the first import of a backend, which is in `_run`.
        with log_filter.StartupNoiseFilter():
            _run(args)


def _run(args):
    try:
        if args.command == "convert":
            _convert(args)
        elif args.command == "chat":
            _chat(args)
        elif args.command == "finetune":
            _finetune(args)
        elif args.command == "rag" and args.rag_command == "index":
            _rag_index(args)
        elif args.command == "rag":
            _rag_ask(args)
        else:
            _generate(args)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        ConnectionError,
        PermissionError,
    ) as error:
        raise SystemExit(f"keras-gemma2: {error}")


if __name__ == "__main__":
    main()
