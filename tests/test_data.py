"""Instruction data: prompt/response packing with a response-only loss,
JSONL/CSV loading, the bundled TFDS dataset."""

import csv
import json
import os
import warnings

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import data as data_lib
from keras_gemma2 import datasets as datasets_lib


@pytest.fixture
def preprocessor():
    # Made after the autouse seed: `keras.utils.set_random_seed` resets
    # TensorFlow's context, which frees an already-made tokenizer's
    # SentencePiece resource for later tf.data graphs.
    return keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_en", sequence_length=24
    )


def _ids(preprocessor, text):
    return [int(i) for i in np.asarray(preprocessor.tokenizer(text))]


def _np(value):
    return keras.ops.convert_to_numpy(value)


def test_loss_is_masked_to_the_response_and_its_eos(preprocessor):
    prompt, response = "Define blicket.", "A small tool."
    x, y, weights = preprocessor({"prompts": [prompt], "responses": [response]})
    p, r = _ids(preprocessor, prompt), _ids(preprocessor, response)
    # <bos> prompt response <eos>, padded: inputs drop the last position,
    # labels the first.
    full = [2] + p + r + [1]
    full += [0] * (25 - len(full))
    np.testing.assert_array_equal(_np(x["token_ids"])[0], full[:-1])
    np.testing.assert_array_equal(_np(y)[0], full[1:])
    expected = np.zeros(24)
    # Label t predicts token t + 1: the response starts at 1 + len(p).
    expected[len(p) : len(p) + len(r) + 1] = 1
    np.testing.assert_array_equal(_np(weights)[0], expected)
    np.testing.assert_array_equal(
        _np(x["padding_mask"])[0],
        np.arange(24) < len(full[: 2 + len(p) + len(r)]),
    )


def test_a_single_pair_is_unbatched(preprocessor):
    x, y, weights = preprocessor({"prompts": "Hi.", "responses": "Hello."})
    assert _np(x["token_ids"]).shape == (24,)
    assert _np(weights).sum() == len(_ids(preprocessor, "Hello.")) + 1


def test_tf_data_pipeline_packs_the_same(preprocessor):
    import tensorflow as tf

    pairs = {
        "prompts": ["Define blicket.", "Hi."],
        "responses": ["A tool.", "Yo"],
    }
    eager = preprocessor(pairs)
    dataset = tf.data.Dataset.from_tensor_slices(pairs).batch(2)
    graph = next(iter(dataset.map(preprocessor)))
    for a, b in zip(keras.tree.flatten(eager), keras.tree.flatten(graph)):
        np.testing.assert_array_equal(_np(a), np.asarray(b))


def test_a_cut_response_warns_and_loses_its_eos(preprocessor):
    long = " ".join(["tokenizer"] * 40)
    with pytest.warns(UserWarning, match="1 of 1 responses do not fit"):
        _, y, weights = preprocessor(
            {"prompts": ["Say it."], "responses": [long]}
        )
    assert 1 not in _np(y)[0].tolist()  # no <eos> label
    assert _np(weights)[0, -1] == 1  # the labels run to the end
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocessor({"prompts": ["Say it."], "responses": ["ok"]})


def test_a_prompt_that_leaves_no_room_is_an_error(preprocessor):
    long = " ".join(["tokenizer"] * 40)
    with pytest.raises(ValueError, match="Example 1: the prompt has"):
        preprocessor({"prompts": ["ok", long], "responses": ["a", "b"]})


@pytest.mark.parametrize(
    "pairs, match",
    [
        ({"prompts": ["a"]}, "missing \\['responses'\\]"),
        ({"prompts": ["a", "b"], "responses": ["c"]}, "2 prompts but 1"),
    ],
)
def test_bad_pairs_are_clear_errors(preprocessor, pairs, match):
    with pytest.raises(ValueError, match=match):
        preprocessor(pairs)


# --- files ------------------------------------------------------------------


def test_jsonl_and_csv_load_the_same_pairs(tmp_path):
    rows = [
        {"question": "Define blicket.", "answer": "A tool.", "id": 1},
        {"question": 'Say "hi", twice.', "answer": "hi, hi", "id": 2},
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    table = tmp_path / "train.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "id"])
        writer.writeheader()
        writer.writerows(rows)
    expected = {
        "prompts": ["Define blicket.", 'Say "hi", twice.'],
        "responses": ["A tool.", "hi, hi"],
    }
    for path in (jsonl, table):
        loaded = data_lib.load_instructions(
            str(path), prompt_key="question", response_key="answer"
        )
        assert loaded == expected
    assert data_lib.load_instructions(
        str(jsonl), "question", "answer", limit=1
    ) == {"prompts": expected["prompts"][:1], "responses": ["A tool."]}


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("a.jsonl", '{"prompt": "x"}\n', "a.jsonl:1: no 'response' field"),
        ("a.jsonl", '{"prompt": "x", "response": "y"}\nnot json\n', ":2: not"),
        ("a.jsonl", "\n", "holds no examples"),
        ("a.jsonl", '{"prompt": "x", "response": " "}\n', "response is empty"),
        ("a.csv", "prompt,answer\nx,y\n", "a.csv:2: no 'response' field"),
        ("a.txt", "x", ".jsonl .* or .csv"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        data_lib.load_instructions(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No instruction file"):
        data_lib.load_instructions(str(tmp_path / "nope.jsonl"))


def test_as_chat_writes_gemma_turns():
    chat = data_lib.as_chat({"prompts": ["Hi?"], "responses": [" Yo \n"]})
    assert chat == {
        "prompts": [
            "<start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"
        ],
        "responses": ["Yo<end_of_turn>"],
    }


def test_bundled_dataset_loads_through_tfds_offline(tmp_path):
    import tensorflow_datasets as tfds

    import keras_gemma2.datasets  # noqa: F401  (registers the builder)

    for split, size in (("train", 300), ("test", 120)):
        dataset = tfds.load(
            "keras_gemma2_instructions",
            split=split,
            data_dir=str(tmp_path),
            download=True,
        )
        rows = [
            {k: v.decode() for k, v in row.items()}
            for row in tfds.as_numpy(dataset)
        ]
        expected = data_lib.load_instructions(
            datasets_lib.instructions_path(split)
        )
        assert len(rows) == size
        assert sorted(r["prompt"] for r in rows) == sorted(expected["prompts"])
    # Test prompts are phrased in ways training never shows.
    train = data_lib.load_instructions(datasets_lib.instructions_path("train"))
    test = data_lib.load_instructions(datasets_lib.instructions_path("test"))
    assert not set(train["prompts"]) & set(test["prompts"])
    assert os.path.isfile(
        os.path.join(datasets_lib.INSTRUCTIONS_DIR, "LICENSE.md")
    )


def test_batches_reshuffle_every_epoch_or_keep_the_order():
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    texts = [f"example {i}" for i in range(12)]
    shuffled = data_lib.batches({"prompts": texts}, batch_size=5)
    epochs = [
        [t.decode() for b in shuffled for t in b["prompts"].numpy()]
        for _ in range(2)
    ]
    for epoch in epochs:
        assert sorted(epoch) == sorted(texts)  # each a permutation
    assert epochs[0] != epochs[1] and epochs[0] != texts
    ordered = data_lib.batches(texts, batch_size=5, shuffle=False)
    assert [t.decode() for b in ordered for t in b.numpy()] == texts
    assert isinstance(ordered, tf.data.Dataset)


# --- the loss: the mean over target tokens -----------------------------------

# Responses of 1 to ~12 tokens, so the mean over tokens and the mean of the
# per-example means differ, in 48 positions that are mostly padding.
PAIRS = {
    "prompts": [
        "Define blicket.",
        "Say hi.",
        "What does the tokenizer do, in one sentence?",
        "Name a colour.",
        "What is a list?",
    ],
    "responses": [
        "A small tool that people use to test toy detectors at home.",
        "Hi!",
        "It splits text into the pieces of its vocabulary.",
        "Blue",
        "A mutable sequence.",
    ],
}


def _lm(learning_rate=1e-3):
    """The tiny preset without its training dropout (0.1), compiled."""
    backbone = keras_gemma2.Gemma2Backbone.from_preset(
        "gemma2_tiny_en", dropout=0.0
    )
    preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_en", sequence_length=48
    )
    lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor)
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return lm


def _response_nll(lm, pairs):
    """`-score()` summed over each response and its `<eos>`, and counts.

    Independent of Keras' loss code and of the preprocessor's packing: the
    rows are built from the tokenizer's ids and scored in one batch, right
    padded (padding never reaches a real token through the causal mask).
    """
    tokenizer = lm.preprocessor.tokenizer
    rows, starts = [], []
    for prompt, response in zip(pairs["prompts"], pairs["responses"]):
        p, r = _ids(lm.preprocessor, prompt), _ids(lm.preprocessor, response)
        rows.append(
            [tokenizer.start_token_id] + p + r + [tokenizer.end_token_id]
        )
        starts.append(1 + len(p))  # the first response token
    width = max(len(row) for row in rows)
    ids = np.zeros((len(rows), width), "int32")
    mask = np.zeros((len(rows), width), "int32")
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    log_probs = lm.score(ids, padding_mask=mask).astype("float64")
    sums, counts = [], []
    for i, (start, row) in enumerate(zip(starts, rows)):
        sums.append(-log_probs[i, start : len(row)].sum())
        counts.append(len(row) - start)  # the response and its <eos>
    return np.array(sums), np.array(counts, "float64")


def test_evaluate_and_fit_report_the_mean_over_response_tokens():
    # One batch (batch_size = number of examples): Keras reports one batch
    # loss as is; across batches see the test below.
    lm = _lm()
    n = len(PAIRS["prompts"])
    sums, counts = _response_nll(lm, PAIRS)
    before = sums.sum() / counts.sum()
    # The check can fail: a mean of example means, or a mean over all
    # 48 positions (KerasHub's), is another number.
    assert abs(before - np.mean(sums / counts)) > 1e-2
    assert counts.sum() < 0.25 * n * 48

    logs = lm.evaluate(PAIRS, batch_size=n, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], before, atol=1e-4)
    np.testing.assert_allclose(np.log(logs["perplexity"]), before, atol=1e-4)

    # `fit` reports the loss of its one step's forward pass, before the
    # update; `evaluate` after it scores the trained weights.
    history = lm.fit(PAIRS, batch_size=n, epochs=1, verbose=0).history
    np.testing.assert_allclose(history["loss"][0], before, atol=1e-4)
    np.testing.assert_allclose(
        np.log(history["perplexity"][0]), before, atol=1e-4
    )
    sums, counts = _response_nll(lm, PAIRS)
    after = sums.sum() / counts.sum()
    assert before - after > 1e-2  # it trained
    logs = lm.evaluate(PAIRS, batch_size=n, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], after, atol=1e-4)
    np.testing.assert_allclose(np.log(logs["perplexity"]), after, atol=1e-4)


def test_perplexity_is_exact_across_batches_and_the_loss_is_not():
    # Batches of 2, 2 and 1 examples. Keras averages the batch losses
    # (each the mean over its batch's response tokens) weighted by the
    # examples in each batch, as transformers' Trainer averages its
    # `eval_loss`; the perplexity adds up every token's cross-entropy.
    lm = _lm()
    sums, counts = _response_nll(lm, PAIRS)
    logs = lm.evaluate(PAIRS, batch_size=2, verbose=0, return_dict=True)
    mean = sums.sum() / counts.sum()
    np.testing.assert_allclose(np.log(logs["perplexity"]), mean, atol=1e-4)
    batches = [slice(0, 2), slice(2, 4), slice(4, 5)]
    per_batch = [sums[b].sum() / counts[b].sum() for b in batches]
    sizes = [2, 2, 1]
    np.testing.assert_allclose(
        logs["loss"], np.average(per_batch, weights=sizes), atol=1e-4
    )
    assert abs(logs["loss"] - mean) > 1e-3


def test_a_saved_model_keeps_its_compile_arguments(tmp_path):
    # Keras skips `compile_from_config` for an overridden `compile`; ours
    # restores the loss, metrics and optimizer (with its state).
    lm = _lm(learning_rate=3e-3)
    n = len(PAIRS["prompts"])
    lm.fit(PAIRS, batch_size=n, epochs=1, verbose=0)
    expected = lm.evaluate(PAIRS, batch_size=n, verbose=0, return_dict=True)
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*compile.*")
        loaded = keras.saving.load_model(path)
    assert loaded.loss.reduction == "mean_with_sample_weight"
    assert np.isclose(float(loaded.optimizer.learning_rate), 3e-3)
    assert int(loaded.optimizer.iterations) == 1
    for a, b in zip(lm.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(_np(a), _np(b))
    got = loaded.evaluate(PAIRS, batch_size=n, verbose=0, return_dict=True)
    assert sorted(got) == ["loss", "perplexity", "sparse_categorical_accuracy"]
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5)
