"""Gemma2CausalLM: logits, cached decoding, generate and score."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.models import GemmaCausalLM

from keras_gemma2 import presets as presets_lib
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.causal_lm_preprocessor import Gemma2CausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLM(presets_lib.RegisteredPresetsMixin, CausalLM):
    """Gemma 2 for causal language modeling: `generate`, `score` and `fit`.

    `generate()` takes a string, a list of strings (any prompt lengths) or a
    dict of `token_ids`/`padding_mask`, and samples with the KerasHub sampler
    set by `compile(sampler=...)` (`"greedy"` by default; `"top_k"`,
    `"top_p"`, `"beam"`, `"random"`, `"contrastive"` or a
    `keras_hub.samplers.Sampler`). It stops at `<eos>` and at `<end_of_turn>`
    by default, so instruction-tuned presets end with their turn.
    `fit()` trains on strings through the preprocessor; after
    `backbone.enable_lora(rank)` only the LoRA weights train.

    Args:
        backbone: a `Gemma2Backbone`.
        preprocessor: a `Gemma2CausalLMPreprocessor`, or `None` to feed token
            ids directly.

    Example:
    ```python
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    lm.generate("The tokenizer", max_length=24)
    lm.generate(["A list", "of prompts"], max_new_tokens=8)
    lm.compile(sampler="top_k")
    lm.generate("The tokenizer", max_new_tokens=8)
    log_probs = lm.score(["The tokenizer reads a stream of characters."])
    lm.backbone.enable_lora(rank=4)
    lm.fit(["some text", "more text"], epochs=1, batch_size=2)
    ```
    """

    backbone_cls = Gemma2Backbone
    preprocessor_cls = Gemma2CausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.logits(hidden_states)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """Like `CausalLM.compile`, with greedy sampling by default."""
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )

    # --- cached decoding: KerasHub's sampler contract ---------------------

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """One decoding pass over `token_ids` with per-layer KV caches.

        Args:
            token_ids: `[batch, length]` int tensor at positions
                `cache_update_index ...`.
            cache: a tuple with one `[batch, 2, max_length,
                num_key_value_heads, head_dim]` tensor per layer.
            cache_update_index: int or int tensor.

        Returns:
            `(logits, hidden_states, cache)`.
        """
        x = self.backbone.embed(token_ids)
        hidden_states, cache = self.backbone.decode(
            x, cache, cache_update_index
        )
        logits = self.backbone.logits(hidden_states)
        return logits, hidden_states, tuple(cache)

    def _build_cache(self, token_ids):
        """Empty caches, filled by one pass over `token_ids`."""
        batch_size, max_length = (
            ops.shape(token_ids)[0],
            ops.shape(token_ids)[1],
        )
        backbone = self.backbone
        # Per layer: [batch, 2 (key, value), max_length, kv_heads, head_dim].
        shape = [
            batch_size,
            2,
            max_length,
            backbone.num_key_value_heads,
            backbone.head_dim,
        ]
        cache = tuple(
            ops.zeros(shape, dtype=self.compute_dtype)
            for _ in range(backbone.num_layers)
        )
        _, hidden_states, cache = self.call_with_cache(token_ids, cache, 0)
        return hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """Generates one batch of `token_ids`/`padding_mask` (compilable)."""
        # KerasHub's Gemma loop only calls `_build_cache`, `call_with_cache`
        # and `self.sampler`, which are ours: reuse it rather than copy it.
        return GemmaCausalLM.generate_step(self, inputs, stop_token_ids)

    # --- generate ---------------------------------------------------------

    def generate(
        self,
        inputs,
        max_length=None,
        max_new_tokens=None,
        stop_token_ids="auto",
        strip_prompt=False,
    ):
        """Generates text (or token ids) from prompts.

        Args:
            inputs: a string, a list of strings, or a dict with `token_ids`
                and `padding_mask` arrays (right-padded; returned as ids).
                A `tf.data.Dataset` of either is generated batch by batch.
            max_length: int. Total length, prompt included. Defaults to the
                preprocessor's `sequence_length`.
            max_new_tokens: int. Generate at most this many tokens after each
                prompt; exclusive with `max_length`.
            stop_token_ids: `"auto"` (`<eos>` and `<end_of_turn>`), `None`
                (never stop early) or a sequence of ids.
            strip_prompt: bool. Return only the generated continuation.

        Returns:
            A string or list of strings; for dict inputs, a dict of numpy
            `token_ids` and `padding_mask`.

        Example:
        ```python
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        lm.generate("The tokenizer", max_new_tokens=8, strip_prompt=True)
        ```
        """
        if max_length is not None and max_new_tokens is not None:
            raise ValueError(
                "Pass either `max_length` (total length, prompt included) or "
                "`max_new_tokens`, not both."
            )
        for name, value in (
            ("max_length", max_length),
            ("max_new_tokens", max_new_tokens),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"`{name}` must be a positive int; got {value!r}."
                )
        if stop_token_ids == "auto":
            if self.preprocessor is None:
                raise ValueError(
                    "`stop_token_ids='auto'` needs a preprocessor to know the "
                    "tokenizer. Pass `stop_token_ids=(1, 107)` (`<eos>`, "
                    "`<end_of_turn>`) or `None`."
                )
            stop_token_ids = self.preprocessor.tokenizer.stop_token_ids
        if stop_token_ids is not None:
            stop_token_ids = tuple(int(i) for i in stop_token_ids)

        if _is_dataset(inputs):
            if max_new_tokens is not None:
                raise ValueError(
                    "`max_new_tokens` is not supported for a tf.data.Dataset; "
                    "pass `max_length`."
                )
            return super().generate(
                inputs,
                max_length=max_length,
                stop_token_ids=stop_token_ids,
                strip_prompt=strip_prompt,
            )
        if isinstance(inputs, dict):
            batch = _check_token_dict(inputs)
            outputs = self._generate_batch(
                batch, stop_token_ids, max_new_tokens, strip_prompt
            )
            return outputs

        prompts, is_scalar = _check_prompts(inputs)
        if self.preprocessor is None:
            raise ValueError(
                "This model has no preprocessor, so it cannot tokenize "
                "strings. Pass a dict of `token_ids` and `padding_mask`, or "
                "attach a `Gemma2CausalLMPreprocessor`."
            )
        prompt_lengths = self._prompt_lengths(prompts)
        longest = max(prompt_lengths)
        if max_new_tokens is not None:
            max_length = longest + max_new_tokens
        elif max_length is None:
            max_length = self.preprocessor.sequence_length
        if longest >= max_length:
            raise ValueError(
                f"A prompt has {longest} tokens (with <bos>) but max_length is "
                f"{max_length}, which leaves no room to generate. Pass a "
                "larger `max_length`, or `max_new_tokens=N` to size it to "
                "the prompt."
            )
        batch = self.preprocessor.generate_preprocess(
            prompts, sequence_length=max_length
        )
        batch = {k: ops.convert_to_numpy(v) for k, v in batch.items()}
        outputs = self._generate_batch(
            batch, stop_token_ids, max_new_tokens, strip_prompt
        )
        texts = _to_strings(self.preprocessor.generate_postprocess(outputs))
        return texts[0] if is_scalar else texts

    def _prompt_lengths(self, prompts):
        """Token counts of the prompts, `<bos>` included."""
        token_ids = self.preprocessor.tokenizer(prompts)
        return [len(_to_list(ids)) + 1 for ids in token_ids]

    def _generate_batch(
        self, batch, stop_token_ids, max_new_tokens, strip_prompt
    ):
        """Generates one batch of numpy `token_ids`/`padding_mask`."""
        token_ids = np.asarray(batch["token_ids"], "int32")
        padding_mask = np.asarray(batch["padding_mask"], bool)
        prompt_lengths = padding_mask.sum(axis=-1)
        if max_new_tokens is not None:
            room = int(prompt_lengths.max()) + max_new_tokens
            extra = max(0, room - token_ids.shape[1])
            token_ids = np.pad(token_ids, [(0, 0), (0, extra)])
            padding_mask = np.pad(padding_mask, [(0, 0), (0, extra)])
        generate_function = self.make_generate_function()
        outputs = generate_function(
            {"token_ids": token_ids, "padding_mask": padding_mask},
            stop_token_ids=stop_token_ids,
        )
        token_ids = ops.convert_to_numpy(outputs["token_ids"])
        padding_mask = ops.convert_to_numpy(outputs["padding_mask"]).astype(
            bool
        )
        positions = np.arange(token_ids.shape[1])[None, :]
        if max_new_tokens is not None:
            limit = prompt_lengths[:, None] + max_new_tokens
            padding_mask &= positions < limit
        if strip_prompt:
            for row, length in enumerate(prompt_lengths):
                token_ids[row] = np.roll(token_ids[row], -length)
                padding_mask[row] = np.roll(padding_mask[row], -length)
                padding_mask[row, token_ids.shape[1] - length :] = False
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    # --- score ------------------------------------------------------------

    def score(self, inputs, padding_mask=None):
        """Per-token log-probabilities `log p(x_t | x_<t)`.

        Args:
            inputs: a string, a list of strings (tokenized with `<bos>`), or
                an int array of token ids `[batch, length]`.
            padding_mask: optional `[batch, length]` mask for token-id input.

        Returns:
            A float32 numpy array `[batch, length]` (`[length]` for one
            string): entry `t` is the log-probability of token `t` given the
            tokens before it; 0 at position 0 and at padding.

        Example:
        ```python
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        log_probs = lm.score("The tokenizer reads characters.")
        total = log_probs.sum()
        ```
        """
        is_scalar = False
        if isinstance(inputs, (str, list, tuple)) and (
            isinstance(inputs, str) or all(isinstance(p, str) for p in inputs)
        ):
            prompts, is_scalar = _check_prompts(inputs)
            if self.preprocessor is None:
                raise ValueError(
                    "Scoring strings needs a preprocessor; pass token ids."
                )
            length = max(self._prompt_lengths(prompts))
            batch = self.preprocessor.generate_preprocess(
                prompts, sequence_length=length
            )
            token_ids = ops.convert_to_numpy(batch["token_ids"])
            padding_mask = ops.convert_to_numpy(batch["padding_mask"])
        else:
            token_ids = np.asarray(inputs)
            if token_ids.ndim != 2 or token_ids.dtype.kind not in "iu":
                raise ValueError(
                    "`score()` takes strings or an int array of token ids of "
                    f"shape [batch, length]; got {token_ids.dtype} array of "
                    f"shape {token_ids.shape}."
                )
            if padding_mask is None:
                padding_mask = np.ones_like(token_ids)
        padding_mask = np.asarray(padding_mask).astype("int32")
        logits = self(
            {
                "token_ids": token_ids.astype("int32"),
                "padding_mask": padding_mask,
            }
        )
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        # Token t is predicted at position t - 1.
        targets = ops.expand_dims(token_ids[:, 1:].astype("int32"), -1)
        picked = ops.take_along_axis(log_probs[:, :-1, :], targets, axis=-1)
        picked = ops.convert_to_numpy(ops.squeeze(picked, -1))
        scores = np.zeros(token_ids.shape, "float32")
        scores[:, 1:] = picked * padding_mask[:, 1:]
        return scores[0] if is_scalar else scores

    # --- export -----------------------------------------------------------

    def export_to_transformers(self, path, dtype=None, overwrite=False):
        """Saves the model as a Hugging Face `transformers` Gemma 2 folder.

        Writes `config.json`, `generation_config.json` and
        `model.safetensors` (tied embeddings, no `lm_head`), plus the
        SentencePiece `tokenizer.model`, `tokenizer_config.json` and
        `special_tokens_map.json` when the model has a preprocessor. The
        folder loads with `transformers.Gemma2ForCausalLM.from_pretrained`
        and `transformers.AutoTokenizer.from_pretrained`. LoRA adapters
        (`backbone.enable_lora`) are merged into their kernels. The write is
        atomic: on any error, `path` is left as it was.

        Args:
            path: the folder to write. It must not exist or be empty unless
                `overwrite=True`.
            dtype: `"float32"` or `"bfloat16"`, the dtype of the written
                weights. Defaults to the backbone's variable dtype.
            overwrite: bool. Replace a non-empty folder at `path`. Defaults
                to `False`.

        Returns:
            The absolute path of the written folder.

        Example:
        ```python
        import os
        import tempfile

        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        path = os.path.join(tempfile.mkdtemp(), "gemma2_tiny_hf")
        lm.export_to_transformers(path)
        # transformers.Gemma2ForCausalLM.from_pretrained(path) loads it.
        lm.export_to_transformers(path, dtype="bfloat16", overwrite=True)
        ```
        """
        from keras_gemma2.convert import to_huggingface

        return to_huggingface.export_to_transformers(
            self, path, dtype=dtype, overwrite=overwrite
        )


def _is_dataset(inputs):
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return isinstance(inputs, tf.data.Dataset)


def _check_prompts(inputs):
    """Returns `(list_of_strings, is_scalar)` or raises a TypeError."""
    if isinstance(inputs, bytes):
        inputs = inputs.decode("utf-8")
    if isinstance(inputs, str):
        return [inputs], True
    if hasattr(inputs, "numpy") and not isinstance(inputs, np.ndarray):
        inputs = inputs.numpy()
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "SUO":
        if inputs.ndim == 0:
            return _check_prompts(inputs.item())
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)) and inputs:
        prompts = [
            p.decode("utf-8") if isinstance(p, bytes) else p for p in inputs
        ]
        if all(isinstance(p, str) for p in prompts):
            return prompts, False
        bad = next(p for p in prompts if not isinstance(p, str))
        raise TypeError(
            "Prompts must be strings; found an element of type "
            f"{type(bad).__name__} ({bad!r}). Pass a string, a list of "
            "strings, or a dict with `token_ids` and `padding_mask`."
        )
    raise TypeError(
        "`generate()` takes a string, a non-empty list of strings, or a dict "
        f"with `token_ids` and `padding_mask`; got {type(inputs).__name__}."
    )


def _check_token_dict(inputs):
    """Validates a `token_ids`/`padding_mask` dict; returns numpy arrays."""
    if "token_ids" not in inputs:
        raise ValueError(
            "A dict prompt needs `token_ids` (and `padding_mask`); got keys "
            f"{sorted(inputs)}."
        )
    token_ids = np.asarray(inputs["token_ids"])
    if token_ids.ndim == 1:
        token_ids = token_ids[None, :]
    padding_mask = inputs.get("padding_mask")
    padding_mask = (
        np.ones_like(token_ids)
        if padding_mask is None
        else np.asarray(padding_mask).reshape(token_ids.shape)
    )
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _to_list(ids):
    if hasattr(ids, "numpy"):
        ids = ids.numpy()
    return list(np.asarray(ids).reshape(-1))


def _to_strings(texts):
    if hasattr(texts, "numpy"):
        texts = texts.numpy()
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
