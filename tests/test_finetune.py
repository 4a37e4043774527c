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
