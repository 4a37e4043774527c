"""Trains `gemma2_tiny_en` from scratch and writes it to presets/.

    KERAS_BACKEND=jax python scripts/train_tiny_preset.py [--steps N]

1. A SentencePiece BPE vocabulary (4096 pieces, Gemma's special-token ids)
   on Python's own English documentation (`scripts/tiny_corpus.py`).
2. A 6-layer Gemma 2 (local and global layers, both soft caps, GQA, a query
   scale that differs from head_dim), trained with `model.fit`.
3. Held-out perplexity beside a unigram baseline, saved to `training.json`.
The preset is written to a temporary folder and renamed into place, so an
interrupted run never leaves a half-written preset.
"""

import argparse
import io
import json
import math
import pathlib
import sys
import time

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tiny_corpus  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCABULARY_SIZE = 4096
SEQUENCE_LENGTH = 256
ARCHITECTURE = {
    "vocabulary_size": VOCABULARY_SIZE,
    "num_layers": 6,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 192,
    "intermediate_dim": 512,
    "head_dim": 64,
    "query_pre_attn_scalar": 48,  # hidden_dim / num_query_heads, as the 27B
    "sliding_window_size": 64,  # < SEQUENCE_LENGTH: local layers matter
    "attention_logit_soft_cap": 50.0,
    "final_logit_soft_cap": 30.0,
    "dropout": 0.1,  # a small corpus: ~275k training tokens
}
# Ids 4..105 are placeholders so that the turn markers get Gemma's 106/107.
SPECIAL_PIECES = (
    ["<mask>"]
    + [f"<unused{i}>" for i in range(101)]
    + ["<start_of_turn>", "<end_of_turn>"]
)


def train_vocabulary(documents):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCABULARY_SIZE,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=SPECIAL_PIECES,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        max_sentence_length=1 << 20,
        character_coverage=1.0,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def windows(processor, documents):
    """`[n, SEQUENCE_LENGTH + 1]` ids: `<bos>` + 256 tokens of the stream."""
    stream = []
    for doc in documents:
        stream.extend(processor.encode(doc))
        stream.append(1)  # <eos> between documents
    body = SEQUENCE_LENGTH
    count = len(stream) // body
    stream = np.asarray(stream[: count * body], "int32").reshape(count, body)
    bos = np.full((count, 1), 2, "int32")
    return np.concatenate([bos, stream], axis=1)


def unigram_perplexity(train_ids, held_out_ids):
    """Add-one unigram model fitted on the training targets."""
    counts = np.bincount(train_ids[:, 1:].ravel(), minlength=VOCABULARY_SIZE)
    probs = (counts + 1) / (counts.sum() + VOCABULARY_SIZE)
    return float(np.exp(-np.log(probs[held_out_ids[:, 1:].ravel()]).mean()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--output", default=str(ROOT / "keras_gemma2/bundled_presets/gemma2_tiny_en")
    )
    args = parser.parse_args()

    import keras

    import keras_gemma2
    from keras_gemma2 import atomic

    keras.utils.set_random_seed(0)
    train_docs, held_out_docs = tiny_corpus.split()
    proto = train_vocabulary(train_docs)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    train_ids = windows(processor, train_docs)
    held_out_ids = windows(processor, held_out_docs)
    print(f"train windows {train_ids.shape}, held out {held_out_ids.shape}")

    tokenizer = keras_gemma2.Gemma2Tokenizer(proto=proto)
    preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    backbone = keras_gemma2.Gemma2Backbone(**ARCHITECTURE)
    lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor)
    # Whole epochs, so that every window is seen equally often.
    steps_per_epoch = len(train_ids) // args.batch_size
    epochs = max(1, round(args.steps / steps_per_epoch))
    args.steps = epochs * steps_per_epoch
    warmup = min(50, args.steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=args.steps - warmup,
        warmup_target=args.learning_rate,
        warmup_steps=warmup,
        alpha=0.05,
    )
    lm.compile(
        optimizer=keras.optimizers.AdamW(
            schedule, weight_decay=0.05, clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )

    started = time.time()
    # Token ids go straight to the model; the preprocessor joins afterwards.
    lm.preprocessor = None
    lm.fit(
        {
            "token_ids": train_ids[:, :-1],
            "padding_mask": np.ones_like(train_ids[:, :-1]),
        },
        train_ids[:, 1:],
        batch_size=args.batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=2,
    )
    train_seconds = time.time() - started

    held_out_x = {
        "token_ids": held_out_ids[:, :-1],
        "padding_mask": np.ones_like(held_out_ids[:, :-1]),
    }
    held_out_loss = lm.evaluate(
        held_out_x, held_out_ids[:, 1:], batch_size=8, verbose=0
    )
    held_out_loss = float(np.ravel(held_out_loss)[0])
    lm.preprocessor = preprocessor
    report = {
        "held_out_perplexity": math.exp(held_out_loss),
        "unigram_perplexity": unigram_perplexity(train_ids, held_out_ids),
        "train_tokens_seen": args.steps * args.batch_size * SEQUENCE_LENGTH,
        "train_corpus_tokens": int(train_ids.size),
        "held_out_tokens": int(held_out_ids[:, 1:].size),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds),
        "backend": keras.config.backend(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(report, indent=2))
    for prompt in ("The tokenizer", "A list is", "def"):
        print(repr(lm.generate(prompt, max_new_tokens=40)))

    output = pathlib.Path(args.output)
    # Staged beside the target and renamed into place: an interrupted run
    # never leaves a half-written preset.
    with atomic.staged_folder(output, "training") as staging:
        lm.save_to_preset(staging)
        report_path = pathlib.Path(staging) / "training.json"
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
