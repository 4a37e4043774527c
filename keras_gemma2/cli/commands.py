"""What each `keras-gemma2` command does, given its parsed arguments.

Each imports Keras and the models inside the function: `main` has set
KERAS_BACKEND by then (see `keras_gemma2.cli`).
"""

import sys
import warnings

from keras_gemma2 import atomic

# The end of the error for an output folder that is not empty.
NEW_FOLDER = "choose a new folder so that nothing already there is overwritten"


def generate(args):
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


def chat(args):
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


def finetune(args):
    # Imported once _select_backend has set KERAS_BACKEND (see main).
    import keras

    import keras_gemma2
    from keras_gemma2 import data
    from keras_gemma2 import lora

    atomic.check_target(args.output, fix=NEW_FOLDER)
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


def convert(args):
    # Imported once _select_backend has set KERAS_BACKEND (see main).
    import keras

    import keras_gemma2
    from keras_gemma2.convert import loader

    atomic.check_target(args.destination, fix=NEW_FOLDER)
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
    lm = cls.from_preset(preset, progress=progress, **kwargs)
    if args.to == "transformers":
        lm.export_to_transformers(args.destination)
    else:
        lm.save_to_preset(args.destination)
    print(f"wrote {args.destination}")


def rag_index(args):
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


def rag_ask(args):
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
