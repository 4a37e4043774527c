"""Gemma2CausalLM: logits, cached decoding, generate and score."""

import keras
import keras_hub
import numpy as np
from keras import ops
from keras_hub.models import CausalLM

from keras_gemma2 import data
from keras_gemma2 import generation
from keras_gemma2 import presets as presets_lib
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.causal_lm_preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.convert import to_huggingface
from keras_gemma2.generation import api as generation_api
from keras_gemma2.generation import speculative


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLM(presets_lib.RegisteredPresetsMixin, CausalLM):
    """Gemma 2 for causal language modeling: `generate`, `score` and `fit`.

    `generate()` takes a string, a list of strings (any prompt lengths) or a
    dict of `token_ids`/`padding_mask`, and samples with the KerasHub sampler
    set by `compile(sampler=...)` (`"greedy"` by default; `"top_k"`,
    `"top_p"`, `"beam"`, `"random"`, `"contrastive"` or a
    `keras_hub.samplers.Sampler`). It stops at `<eos>` and at `<end_of_turn>`
    (where the vocabulary has one) by default, so instruction-tuned presets
    end with their turn.
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
        self._compiled_generation = None

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """Like `CausalLM.compile`; the loss is the mean over target tokens.

        The default loss (`loss="auto"`) is the cross-entropy summed over
        the tokens that the preprocessor's `sample_weight` marks (the
        response and its `<eos>` for `{"prompts", "responses"}` data, every
        real token of plain text), divided by their total weight, as
        transformers' causal LM loss divides by the labels it does not
        ignore. This differs from KerasHub, whose `CausalLM` divides by
        every position of the batch, padding included: its loss shrinks as
        `sequence_length` grows past the examples. `fit` and `evaluate`
        report Keras' mean of the per-batch losses, weighted by examples
        per batch (as transformers' `Trainer` reports `eval_loss`); the
        default `perplexity` metric is `exp` of the mean over every target
        token seen. With gradient accumulation each micro-batch's mean
        counts equally. Gradients are larger than KerasHub's by the same
        factor (positions per target token): Adam's steps do not depend on
        it, but a `clipnorm` picked for KerasHub's loss clips more here.

        `generate` is XLA-compiled on JAX and TensorFlow unless
        `jit_compile=False` is passed here (Keras' `"auto"` turns XLA off
        for training on a CPU-only TensorFlow; generation keeps it, since
        its loop is many times faster compiled). On PyTorch it runs eagerly
        unless `jit_compile=True` is passed: then each decode step is one
        `torch.compile`d graph (about 2x faster on a small model, after a
        first call that compiles for 20-70 s; Keras then compiles `fit`'s
        train step with `torch.compile` too).

        Args:
            optimizer: `"auto"` (Adam at `2e-5`), an optimizer name or a
                `keras.Optimizer`.
            loss: `"auto"`, a loss name or a `keras.losses.Loss`. `"auto"`
                is `SparseCategoricalCrossentropy(from_logits=True,
                reduction="mean_with_sample_weight")`.
            weighted_metrics: `"auto"` or a list of metrics weighted by the
                `sample_weight`. `"auto"` is
                `keras.metrics.SparseCategoricalAccuracy()` and
                `keras_hub.metrics.Perplexity(from_logits=True)`.
            sampler: a sampler name or a `keras_hub.samplers.Sampler`, used
                by `generate`. Defaults to `"greedy"`.
            **kwargs: as for `keras.Model.compile`.

        Example:
        ```python
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        lm.compile(optimizer=keras.optimizers.Adam(1e-4))
        pairs = {"prompts": ["Say hi."], "responses": ["Hi!"]}
        logs = lm.evaluate(pairs, return_dict=True, verbose=0)
        # The mean cross-entropy of the response tokens, and its exp.
        logs["loss"], logs["perplexity"]
        ```
        """
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        if weighted_metrics == "auto":
            weighted_metrics = [
                keras.metrics.SparseCategoricalAccuracy(),
                keras_hub.metrics.Perplexity(from_logits=True),
            ]
        self._compiled_generation = None
        self._generate_jit_compile = kwargs.get("jit_compile") is not False
        # PyTorch compiles only when asked: see `torch_compiled_step`.
        self._generate_torch_compile = kwargs.get("jit_compile") is True
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )

    def compile_from_config(self, config):
        """Compiles with a `.keras` file's saved loss, metrics, optimizer.

        Keras' own version skips models whose `compile` is overridden (a
        warning, then the constructor's defaults), which would drop a
        custom loss or learning rate and the optimizer's saved state.
        """
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the backbone's weights (`"int8"` or `"int4"`).

        Only the backbone holds weights; Keras' `Model.quantize` would also
        visit the preprocessor's layers and fail on them. LoRA can be
        enabled afterwards (QLoRA-style: int8 base, float adapters) and
        `generate` works on all three backends.

        Example:
        ```python
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        lm.quantize("int8")
        lm.generate("The tokenizer", max_new_tokens=4)
        ```
        """
        self.backbone.quantize(mode, config=config, filters=filters, **kwargs)
        # Compiled functions closed over the float variables.
        self.train_function = None
        self.test_function = None
        self.predict_function = None
        self.generate_function = None
        self._compiled_generation = None

    # --- cached decoding: KerasHub's sampler contract ---------------------

    def call_with_cache(
        self,
        token_ids,
        cache,
        cache_update_index,
        valid_length=None,
        extend=False,
    ):
        """One decoding pass over `token_ids` with per-layer KV caches.

        One token is a decode step at position `cache_update_index` (a
        scalar, or `[batch]` positions, one per row); several tokens are a
        prefill from position 0 that keeps its first `valid_length`
        positions (a scalar or one per row) in the (new) caches, or with
        `extend=True` continue the caches from `cache_update_index`. On
        PyTorch without gradients a decode step updates the caches in place.

        Args:
            token_ids: `[batch, length]` int tensor.
            cache: a tuple with one `(keys, values)` pair per layer, from
                `backbone.init_cache`: global layers hold every position,
                local layers a ring of their window.
            cache_update_index: int or int tensor.
            valid_length: int or int tensor, for a prefill.
            extend: bool. Several tokens continue the caches.

        Returns:
            `(logits, hidden_states, cache)`.
        """
        hidden_states, cache = self._decode_cache(
            token_ids, cache, cache_update_index, valid_length, extend
        )
        logits = self.backbone.logits(hidden_states)
        return logits, hidden_states, cache

    def _decode_cache(
        self, token_ids, cache, cache_update_index, valid_length, extend
    ):
        """`call_with_cache` without the logits: `(hidden_states, cache)`.

        A prefill or extension keeps only the caches, and PyTorch runs
        eagerly, so it would pay for logits nobody reads (about a third of
        a 128-token prefill on the benchmark's small config; XLA drops
        them by itself).
        """
        x = self.backbone.embed(token_ids)
        hidden_states, cache = self.backbone.decode(
            x,
            cache,
            cache_update_index,
            valid_length=valid_length,
            extend=extend,
        )
        return hidden_states, tuple(cache)

    def _build_cache(
        self, token_ids, max_length=None, valid_length=None, draft_tokens=0
    ):
        """Caches for `max_length` tokens, filled by a prefill of `token_ids`.

        The prefill runs over `token_ids` only (a bucket around the
        shortest prompt), not over the whole generation length.
        """
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = self.backbone.init_cache(
            batch_size, max_length or length, draft_tokens=draft_tokens
        )
        return self._decode_cache(token_ids, cache, 0, valid_length, False)

    def _prefill(self, prefill_ids, valid_length, max_length, draft_tokens=0):
        return self._build_cache(
            prefill_ids, max_length, valid_length, draft_tokens
        )[1]

    def _decode_step(
        self, token_ids, positions, cache, arrays, *rest, **static
    ):
        return generation.decode_steps(
            self, token_ids, positions, cache, arrays, *rest, **static
        )

    def _verify(self, token_ids, positions, cache, *rest, **static):
        return speculative.verify(
            self, token_ids, positions, cache, *rest, **static
        )

    def _extend(self, token_ids, cache, start):
        return self._decode_cache(token_ids, cache, start, None, True)[1]

    def _engine_functions(self):
        """The engine's compiled prefill, step and extension, made once per
        `compile`: shared by every `Engine` of this model."""
        if self._compiled_generation is None:
            self._compiled_generation = {
                "prefill": generation.compile_function(
                    self,
                    self._prefill,
                    static_argnames=("max_length", "draft_tokens"),
                ),
                "step": generation.compile_function(
                    self,
                    self._decode_step,
                    static_argnames=(
                        "max_steps",
                        "features",
                        "top_logprobs",
                        "custom_sampler",
                    ),
                    # The engine replaces its caches with the step's.
                    donate_argnums=(2,),
                ),
                "extend": generation.compile_function(self, self._extend),
                "verify": generation.compile_function(
                    self,
                    self._verify,
                    static_argnames=("features", "top_logprobs"),
                    donate_argnums=(2,),
                ),
            }
        return self._compiled_generation

    def generate_step(self, inputs, stop_token_ids=None):
        """Generates one batch by KerasHub's sampler loop (compilable).

        Used for beam and contrastive search (and KerasHub's own
        `generate`); every other sampler runs on the engine.

        `inputs` may also hold `prefill_ids` (the leading tokens to prefill
        over, a bucket at least as long as the shortest prompt; defaults to
        all of `token_ids`) and `limits` (`[batch]` lengths at which each
        row stops).
        """
        token_ids = inputs["token_ids"]
        prompt_mask = ops.cast(inputs["padding_mask"], "bool")
        prefill_ids = inputs.get("prefill_ids", token_ids)
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        index = ops.min(ops.sum(ops.cast(prompt_mask, "int32"), axis=-1))
        limits = inputs.get("limits")
        if limits is None:
            limits = ops.full((batch_size,), length, dtype="int32")
        hidden_states, cache = self._build_cache(prefill_ids, length, index)
        token_ids = self._search(
            token_ids,
            prompt_mask,
            cache,
            index,
            hidden_states,
            stop_token_ids,
        )
        return {
            "token_ids": token_ids,
            "padding_mask": generation.output_mask(
                token_ids, prompt_mask, stop_token_ids, limits
            ),
        }

    def _search(
        self,
        token_ids,
        prompt_mask,
        cache,
        index,
        hidden_states,
        stop_token_ids,
    ):
        """Beam or contrastive search: KerasHub's own sampler loop."""
        length = ops.shape(token_ids)[1]

        def next(prompt, cache, index):
            return generation.next_logits(self, prompt, cache, index)

        # Contrastive search updates hidden states at every position.
        missing = length - ops.shape(hidden_states)[1]
        hidden_states = ops.pad(hidden_states, [[0, 0], [0, missing], [0, 0]])
        return self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=prompt_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )

    # --- generate ---------------------------------------------------------

    def generate(
        self,
        inputs,
        max_length=None,
        max_new_tokens=None,
        stop_token_ids="auto",
        strip_prompt=False,
        stream=False,
        *,
        stop=None,
        return_details=False,
        json_schema=None,
        grammar=None,
        params=None,
        speculative=None,
        num_draft_tokens=4,
        **controls,
    ):
        """Generates text (or token ids) from prompts.

        Every prompt is a sequence of the generation engine
        (`keras_gemma2.generation.Engine`) with its own position, settings
        and random stream: a seeded prompt gives the same text alone or in
        a batch.

        Args:
            inputs: a string, a list of strings, or a dict with `token_ids`
                and `padding_mask` arrays (right-padded; returned as ids).
                A `tf.data.Dataset` of either is generated batch by batch.
            max_length: int. Total length, prompt included. Defaults to the
                preprocessor's `sequence_length`.
            max_new_tokens: int. Generate at most this many tokens after each
                prompt; exclusive with `max_length`.
            stop_token_ids: `"auto"` (the tokenizer's `stop_token_ids`:
                `<eos>`, and `<end_of_turn>` where it exists), `None`
                (never stop early) or a sequence of ids.
            strip_prompt: bool. Return only the generated continuation.
            stream: bool. Return an iterator that yields the continuation of
                one string prompt as text pieces, while they are sampled.
                Text that may begin a stop string is held back until the
                next tokens settle it.
            stop: a string or list of strings. Generation stops when the
                text contains one (also across several tokens); it is left
                out of the text.
            return_details: bool. Return a
                `keras_gemma2.generation.GenerationResult` per prompt: the
                text, token ids, finish reason (`"stop"` or `"length"`) and
                the log-probability of each token.
            json_schema: a JSON schema (dict or string). The text follows
                it (through llguidance, `keras_gemma2.structured`); a schema
                it rejects fails before generating.
            grammar: a Lark grammar string (or `"regex:PATTERN"`), instead
                of `json_schema`.
            params: a `keras_gemma2.sampling.SamplingParams`, or a list with
                one per prompt (per-row settings in one batch).
            speculative: `"prompt_lookup"` to decode speculatively: each
                step drafts up to `num_draft_tokens` tokens from an earlier
                occurrence of the text's last few tokens (in the prompt or
                the output) and verifies them in one forward pass. Greedy
                output is unchanged, token for token; sampled output keeps
                its distribution (the rejection rule of Leviathan et al.),
                though a seed then reproduces a text only in the same
                batch. Faster where the answer copies its context; rows
                with penalties or a grammar do not draft. With
                `return_details`, each result counts its drafted and
                accepted tokens.
            num_draft_tokens: int, 1 to 16. The most drafts per step.
            **controls: sampling controls for every prompt, over the
                compiled sampler's: `temperature` (0 is greedy), `top_k`,
                `top_p`, `min_p`, `repetition_penalty` (transformers'
                form), `presence_penalty` and `frequency_penalty`
                (OpenAI's), `logit_bias` (`{token_id: bias}`), `seed` and
                `top_logprobs` (up to 20 alternatives per token, with
                `return_details`). On a greedy model, `top_k`, `top_p`,
                `min_p` or `seed` alone sample at temperature 1.

        Returns:
            A string or list of strings; for dict inputs, a dict of numpy
            `token_ids` and `padding_mask`; with `stream=True`, an iterator
            of strings; with `return_details=True`, `GenerationResult`s.

        The prompt is prefilled over its own length (rounded up to a bucket)
        and the engine's step is compiled once per batch size and bucket of
        lengths, so repeated calls, and a chat whose prompt grows each turn,
        do not recompile for every new length. Beam and contrastive search
        run KerasHub's sampler loop; they take none of the engine's options.

        Example:
        ```python
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        lm.generate("The tokenizer", max_new_tokens=8, strip_prompt=True)
        for piece in lm.generate("The tokenizer", max_new_tokens=8,
                                 stream=True):
            print(piece, end="", flush=True)
        result = lm.generate(
            "The tokenizer", max_new_tokens=8, temperature=0.8, top_p=0.9,
            seed=1, stop=["\\n"], return_details=True,
        )
        result.text, result.finish_reason, result.logprobs
        ```
        """
        options = dict(
            stop=stop,
            return_details=return_details,
            json_schema=json_schema,
            grammar=grammar,
            params=params,
            speculative=speculative,
            num_draft_tokens=num_draft_tokens,
            **controls,
        )
        return generation_api.generate(
            self,
            inputs,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
            stream=stream,
            **options,
        )

    def _keras_hub_generate(self, inputs, **kwargs):
        """KerasHub's own `generate` (for beam search over a dataset)."""
        return super().generate(inputs, **kwargs)

    # --- fit --------------------------------------------------------------

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        sample_weight=None,
        shuffle=True,
        **kwargs,
    ):
        """`Task.fit`, shuffling in-memory examples every epoch.

        KerasHub batches lists and arrays in their given order every epoch
        and ignores `shuffle`; here, with `shuffle=True` (the default),
        strings, `{"prompts", "responses"}` dicts and arrays are reshuffled
        each epoch through `keras_gemma2.data.batches`. Datasets
        (`tf.data`, grain) are passed on as given, and so are in-memory
        inputs with `validation_split` (which takes the last examples, as
        in Keras, before any shuffling).
        """
        in_memory = isinstance(x, (list, tuple, dict, np.ndarray))
        if in_memory and shuffle and not kwargs.get("validation_split"):
            x = data.batches(x, y, sample_weight, batch_size=batch_size or 32)
            y = sample_weight = batch_size = None
        # Shuffled above, or not wanted: KerasHub's own data never
        # shuffles, and Keras warns when told to.
        return super().fit(
            x,
            y,
            batch_size=batch_size,
            sample_weight=sample_weight,
            shuffle=False,
            **kwargs,
        )

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
            prompts, is_scalar = generation_api.check_prompts(inputs)
            if self.preprocessor is None:
                raise ValueError(
                    "Scoring strings needs a preprocessor; pass token ids."
                )
            length = max(
                map(len, generation_api.tokenize_prompts(self, prompts))
            )
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
            generation.check_token_ids(
                token_ids, self.backbone.vocabulary_size, "inputs"
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
        return to_huggingface.export_to_transformers(
            self, path, dtype=dtype, overwrite=overwrite
        )
