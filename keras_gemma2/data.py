"""Instruction data: JSONL/CSV prompt-response files for `fit`.

```python
data = keras_gemma2.data.load_instructions("train.jsonl")
lm.fit(keras_gemma2.data.as_chat(data, lm.preprocessor.tokenizer))
```
"""

import csv
import json
import os

import numpy as np

from keras_gemma2 import chat
from keras_gemma2 import special_tokens

PROMPT_KEY = "prompt"
RESPONSE_KEY = "response"


def load_instructions(
    path, prompt_key=PROMPT_KEY, response_key=RESPONSE_KEY, limit=None
):
    """Reads prompt/response pairs from a `.jsonl` or `.csv` file.

    Args:
        path: a `.jsonl` file (one JSON object a line) or a `.csv` file with
            a header row.
        prompt_key: the field (column) of the prompt. Defaults to "prompt".
        response_key: the field of the response. Defaults to "response".
        limit: optional int: read at most this many examples.

    Returns:
        `{"prompts": [...], "responses": [...]}`, the input
        `Gemma2CausalLMPreprocessor` masks the loss of (to the responses).

    Example:
    ```python
    import json, os, tempfile
    path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "Say hi.", "response": "Hi!"}) + "\\n")
    data = keras_gemma2.data.load_instructions(path)
    ```
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No instruction file at {path!r}.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        raise ValueError(
            f"{path!r}: instruction files are .jsonl (one JSON object a "
            "line) or .csv (with a header row)."
        )
    prompts, responses = [], []
    for number, row in rows:
        if limit is not None and len(prompts) >= limit:
            break
        missing = [k for k in (prompt_key, response_key) if k not in row]
        if missing:
            raise ValueError(
                f"{path}:{number}: no {' or '.join(map(repr, missing))} "
                f"field; found {sorted(row)}. Name the fields with "
                "`prompt_key=`/`response_key=` (--prompt-key/--response-key "
                "on the command line)."
            )
        prompt, response = row[prompt_key], row[response_key]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(
                f"{path}:{number}: {prompt_key!r} and {response_key!r} "
                "must be strings."
            )
        if not response.strip():
            raise ValueError(
                f"{path}:{number}: the response is empty; an example with "
                "nothing to learn would only add padding."
            )
        prompts.append(prompt)
        responses.append(response)
    if not prompts:
        raise ValueError(f"{path!r} holds no examples.")
    return {"prompts": prompts, "responses": responses}


def as_chat(data, tokenizer=None):
    """Wraps prompt/response pairs in Gemma's chat turns.

    Each prompt becomes a user turn followed by the open model turn, and
    each response ends with `<end_of_turn>`, so a model fine-tuned on them
    answers instruction-style and stops at the end of its turn.

    Args:
        data: `{"prompts": [...], "responses": [...]}`.
        tokenizer: optional `Gemma2Tokenizer` of the model to train (e.g.
            `lm.preprocessor.tokenizer`); a vocabulary without the turn
            markers is then refused, instead of training on turns that
            tokenize to ordinary pieces. Defaults to `None` (not checked).

    Example:
    ```python
    data = {"prompts": ["Say hi."], "responses": ["Hi!"]}
    keras_gemma2.data.as_chat(data)
    tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
    keras_gemma2.data.as_chat(data, tokenizer=tokenizer)
    ```
    """
    if tokenizer is not None:
        chat.check_tokenizer(tokenizer)
    prompts = [
        chat.format_chat([{"role": "user", "content": p}])
        for p in data["prompts"]
    ]
    responses = [
        r.strip() + special_tokens.END_OF_TURN for r in data["responses"]
    ]
    return {"prompts": prompts, "responses": responses}


def batches(
    x, y=None, sample_weight=None, batch_size=32, shuffle=True, seed=None
):
    """In-memory examples as a batched `tf.data` pipeline.

    `Gemma2CausalLM.fit` and `Gemma2Distiller` use it for lists, arrays and
    dicts of them. With `shuffle=True` (Keras' default) the examples are
    reshuffled every epoch: KerasHub's `fit` batches such inputs in their
    given order every epoch and ignores `shuffle`.

    Args:
        x: strings, a dict of lists (`{"prompts", "responses"}`) or arrays.
        y, sample_weight: optional, with the same number of examples.
        batch_size: int.
        shuffle: bool. Reshuffle every epoch; `False` keeps the order.
        seed: int. Defaults to TensorFlow's global seed, which
            `keras.utils.set_random_seed` sets.

    Example:
    ```python
    ds = keras_gemma2.data.batches(["a", "b", "c"], batch_size=2)
    [list(batch.numpy()) for batch in ds]
    ```
    """
    # TensorFlow only for tf.data here; the rest of the module needs none
    import tensorflow as tf

    def arrays(data):
        if isinstance(data, dict):
            return {key: arrays(value) for key, value in data.items()}
        return np.asarray(data)

    parts = [arrays(part) for part in (x, y, sample_weight) if part is not None]
    sizes = {len(a) for part in parts for a in tf.nest.flatten(part)}
    if len(sizes) != 1:
        raise ValueError(
            "Every input to `fit` must hold the same number of examples; "
            f"got {sorted(sizes)}."
        )
    size = sizes.pop()
    if size == 0:
        raise ValueError("The training data holds no examples.")
    data = parts[0] if len(parts) == 1 else tuple(parts)
    dataset = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        dataset = dataset.shuffle(
            size, seed=seed, reshuffle_each_iteration=True
        )
    return dataset.batch(batch_size)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not a JSON object ({error.msg})."
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a JSON object.")
            yield number, row


def _read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        # Line numbers count the header as line 1.
        for number, row in enumerate(csv.DictReader(f), start=2):
            yield number, row
