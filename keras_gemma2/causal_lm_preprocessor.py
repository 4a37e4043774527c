"""Gemma2CausalLMPreprocessor: strings -> `<bos>` ids, padding mask, labels."""

import warnings

import keras
import numpy as np
import tensorflow as tf
from keras_hub.layers import StartEndPacker
from keras_hub.models import CausalLMPreprocessor
from keras_hub.src.utils.tensor_utils import preprocessing_function

from keras_gemma2 import generation
from keras_gemma2 import presets as presets_lib
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.tokenizer import Gemma2Tokenizer


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLMPreprocessor(
    presets_lib.RegisteredPresetsMixin, CausalLMPreprocessor
):
    """Tokenizes, adds `<bos>`/`<eos>`, pads, and shifts labels for `fit`.

    For training, `x` strings become `({"token_ids", "padding_mask"}, labels,
    sample_weight)`, where labels are the ids shifted left by one. A dict of
    `"prompts"` and `"responses"` (strings, or lists of strings) is packed
    as `<bos> prompt response <eos>` and the loss is masked to the response
    and its `<eos>`: `sample_weight` is 0 on the prompt. A response that
    does not fit is cut at `sequence_length` (with a warning when the inputs
    are Python strings); a prompt that leaves no room for any of its
    response is an error, never a silently label-free example. For
    generation, `generate_preprocess` adds `<bos>` but no `<eos>`.

    Args:
        tokenizer: a `Gemma2Tokenizer`.
        sequence_length: int. Padded length. Defaults to `1024`.
        add_start_token: bool. Prepend `<bos>`. Defaults to `True`.
        add_end_token: bool. Append `<eos>` for training. Defaults to `True`.

    Example:
    ```python
    preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_en", sequence_length=16
    )
    x, y, sample_weight = preprocessor(["The tokenizer splits text."])
    x, y, sample_weight = preprocessor(
        {"prompts": ["Say hi."], "responses": ["Hi!"]}
    )
    ```
    """

    backbone_cls = Gemma2Backbone
    tokenizer_cls = Gemma2Tokenizer
    _preset_takes_dtype = False

    def build(self, input_shape):
        super().build(input_shape)
        # Packs the response mask exactly as `packer` packs the ids: no
        # weight on <bos> (the response's <eos> is part of the response).
        self.response_packer = StartEndPacker(
            start_value=0,
            pad_value=0,
            sequence_length=self.sequence_length,
        )

    def generate_postprocess(self, x):
        """KerasHub's, after checking numpy or list token ids against the
        vocabulary (SentencePiece would fail deep in a TensorFlow op)."""
        ids = x.get("token_ids") if isinstance(x, dict) else x
        if isinstance(ids, (list, tuple, np.ndarray)):
            vocabulary_size = self.tokenizer.vocabulary_size()
            rows = _rows_if_ragged(ids)
            if rows is None:
                generation.check_token_ids(ids, vocabulary_size)
            for row, row_ids in enumerate(rows or ()):
                generation.check_token_ids(
                    row_ids, vocabulary_size, f"token_ids[{row}]"
                )
        return super().generate_postprocess(x)

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if isinstance(x, dict) and ("prompts" in x or "responses" in x):
            return self._call_prompts_responses(
                x, y, sample_weight, sequence_length
            )
        return super().call(x, y, sample_weight, sequence_length)

    def _call_prompts_responses(self, x, y, sample_weight, sequence_length):
        missing = {"prompts", "responses"} - set(x)
        if missing or y is not None or sample_weight is not None:
            raise ValueError(
                "Prompt/response training data is a dict with both "
                "'prompts' and 'responses' (and no separate y or "
                f"sample_weight); got keys {sorted(x)}"
                + (f", missing {sorted(missing)}." if missing else ".")
            )
        if not self.built:
            self.build(None)
        sequence_length = sequence_length or self.sequence_length
        if _is_python_text(x["prompts"]) and _is_python_text(x["responses"]):
            self._check_lengths(x, sequence_length)
        return self._pack_prompts_responses(x, sequence_length=sequence_length)

    def _check_lengths(self, x, sequence_length):
        """Errors for prompts that fill the sequence; warns on cut replies."""
        prompts, responses = x["prompts"], x["responses"]
        if isinstance(prompts, str):
            prompts, responses = [prompts], [responses]
        if len(prompts) != len(responses):
            raise ValueError(
                f"{len(prompts)} prompts but {len(responses)} responses: "
                "each prompt needs its response."
            )
        # <bos> and the prompt are inputs; the first label is the response's
        # first token.
        room = sequence_length + 1 - int(self.add_start_token)
        cut = 0
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            prompt_length = len(self.tokenizer.tokenize(prompt))
            response_length = len(self.tokenizer.tokenize(response))
            if prompt_length >= room:
                raise ValueError(
                    f"Example {row}: the prompt has {prompt_length} tokens, "
                    f"which leaves no room for its response in "
                    f"sequence_length={sequence_length}. Shorten the prompt "
                    "or raise `sequence_length`."
                )
            end = int(self.add_end_token)
            if prompt_length + response_length + end > room:
                cut += 1
        if cut:
            warnings.warn(
                f"{cut} of {len(prompts)} responses do not fit in "
                f"sequence_length={sequence_length} and are cut, without "
                "their <eos> (so the model does not learn to stop there). "
                "Raise `sequence_length` to train on whole responses.",
                stacklevel=4,
            )

    @preprocessing_function
    def _pack_prompts_responses(self, x, sequence_length):
        prompts = _as_tf(self.tokenizer(x["prompts"]))
        responses = _as_tf(self.tokenizer(x["responses"]))
        scalar = prompts.shape.rank == 1
        if scalar:
            prompts = tf.RaggedTensor.from_tensor(prompts[tf.newaxis])
            responses = tf.RaggedTensor.from_tensor(responses[tf.newaxis])
        if self.add_end_token:
            # <eos> joins the response before packing, so that a response
            # cut by the length limit loses it too (the packer's own end
            # token would survive the cut).
            rows = responses.nrows()
            end = tf.RaggedTensor.from_row_lengths(
                tf.fill(
                    [rows],
                    tf.cast(self.tokenizer.end_token_id, responses.dtype),
                ),
                tf.ones([rows], dtype=tf.int64),
            )
            responses = tf.concat([responses, end], axis=1)
        token_ids = tf.concat([prompts, responses], axis=1)
        is_response = tf.concat(
            [tf.zeros_like(prompts), tf.ones_like(responses)], axis=1
        )
        # One position more than the inputs: labels are shifted by one.
        token_ids, padding_mask = self.packer(
            token_ids,
            sequence_length=sequence_length + 1,
            add_start_value=self.add_start_token,
            add_end_value=False,
        )
        is_response = self.response_packer(
            is_response,
            sequence_length=sequence_length + 1,
            add_start_value=self.add_start_token,
            add_end_value=False,
        )
        features = {
            "token_ids": token_ids[..., :-1],
            "padding_mask": padding_mask[..., :-1],
        }
        labels = token_ids[..., 1:]
        weights = tf.cast(is_response[..., 1:], padding_mask.dtype)
        if scalar:
            features = {k: v[0] for k, v in features.items()}
            labels, weights = labels[0], weights[0]
        return keras.utils.pack_x_y_sample_weight(features, labels, weights)


def _is_python_text(value):
    return isinstance(value, str) or (
        isinstance(value, (list, tuple))
        and all(isinstance(v, str) for v in value)
    )


def _as_tf(ids):
    """Token ids as a tf tensor (KerasHub's Python workflow gives lists)."""
    if isinstance(ids, (tf.Tensor, tf.RaggedTensor)):
        return ids
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)) or not ids:
        return tf.ragged.constant(ids, dtype=tf.int32, ragged_rank=1)
    return tf.constant(ids, dtype=tf.int32)


def _rows_if_ragged(ids):
    """The rows of a ragged nested list, or None for a rectangular one."""
    try:
        if np.asarray(ids).dtype != object:
            return None
    except ValueError:  # numpy refuses rows of different lengths
        pass
    return list(ids)
