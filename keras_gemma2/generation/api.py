"""`Gemma2CausalLM.generate`: inputs checked, then a loop over the engine.

Strings, lists of strings and `token_ids`/`padding_mask` dicts become one
`Sequence` each, run together by an `Engine` whose rows hold the longest
prompt plus its budget (rounded up to a bucket, so that repeated calls and
growing chat prompts reuse compiled steps). Beam and contrastive search,
which decide tokens only at the end, keep KerasHub's sampler loop.
"""

import dataclasses

import numpy as np

from keras_gemma2 import sampling
from keras_gemma2 import structured
from keras_gemma2.generation import compiled
from keras_gemma2.generation import speculative as speculative_lib
from keras_gemma2.generation.engine import Engine
from keras_gemma2.generation.engine import Sequence
from keras_gemma2.generation.text import detokenize

# `generate`'s sampling controls; any of them makes `SamplingParams`.
SAMPLING_ARGUMENTS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "top_logprobs",
)
# Controls that only mean something when sampling: given alone on a greedy
# model, they turn sampling on at temperature 1 (as transformers' `do_sample`
# with its default temperature).
_SAMPLING_ONLY = ("top_k", "top_p", "min_p", "seed")


def generate(
    lm,
    inputs,
    max_length=None,
    max_new_tokens=None,
    stop_token_ids="auto",
    strip_prompt=False,
    stream=False,
    stop=None,
    return_details=False,
    json_schema=None,
    grammar=None,
    params=None,
    speculative=None,
    num_draft_tokens=4,
    **controls,
):
    """`Gemma2CausalLM.generate` (see its docstring)."""
    _check_lengths(max_length, max_new_tokens)
    draft_tokens = speculative_lib.check_options(speculative, num_draft_tokens)
    stop_token_ids = _stop_token_ids(lm, stop_token_ids)
    stop = check_stop(stop)
    params = resolve_params(lm, params, controls)
    engine_only = {
        "stop": stop,
        "return_details": return_details,
        "json_schema": json_schema,
        "grammar": grammar,
        "stream": stream,
        "speculative": speculative,
    }
    if params is None and not compiled.picks_one_token_per_step(lm.sampler):
        used = [name for name, value in engine_only.items() if value]
        if used or controls:
            raise ValueError(
                f"`{(used or list(controls))[0]}` needs a sampler that picks "
                f"each token as it goes; {type(lm.sampler).__name__} decides "
                "the tokens only at the end. `compile(sampler='greedy')` "
                "first, or drop the argument."
            )
        return _search_generate(
            lm, inputs, max_length, max_new_tokens, stop_token_ids, strip_prompt
        )
    constraint = _constraint(lm, json_schema, grammar)
    if stream:
        if not isinstance(inputs, (str, bytes)):
            raise ValueError(
                "`stream=True` streams the continuation of one prompt: pass "
                f"a single string, not {type(inputs).__name__}. Call "
                "`generate` without `stream` for a batch."
            )
    if _is_dataset(inputs):
        return _generate_dataset(
            lm,
            inputs,
            dict(
                max_length=max_length,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop_token_ids,
                strip_prompt=strip_prompt,
                stop=stop,
                return_details=return_details,
                json_schema=json_schema,
                grammar=grammar,
                params=params,
                speculative=speculative,
                num_draft_tokens=num_draft_tokens,
            ),
        )
    as_dict = isinstance(inputs, dict)
    prompts, is_scalar, width = _read_prompts(lm, inputs)
    if max_length is None and max_new_tokens is None:
        max_length = width
    params_list = _per_prompt(params, len(prompts))
    sequences = _sequences(
        lm,
        prompts,
        params_list,
        max_length,
        max_new_tokens,
        stop_token_ids,
        stop,
        constraint,
        stream,
    )
    longest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, sequences))
    engine = Engine(
        lm,
        max_batch=len(sequences),
        max_length=compiled.bucket_length(longest),
        num_draft_tokens=draft_tokens,
    )
    if stream:
        return _stream(engine, sequences[0])
    results = engine.run(sequences)
    if return_details:
        return results[0] if is_scalar else results
    if as_dict:
        width = max(width, longest) if max_new_tokens is not None else width
        return _as_dict(sequences, width, strip_prompt)
    texts = [
        r.text if strip_prompt else _full_text(lm, s, r)
        for s, r in zip(sequences, results)
    ]
    return texts[0] if is_scalar else texts


def resolve_params(lm, params, controls):
    """The `SamplingParams` of a call: `params` (one, or one per prompt),
    or the compiled sampler's with `controls` on top; `None` for a sampler
    the engine cannot express (beam, contrastive, custom)."""
    unknown = set(controls) - set(SAMPLING_ARGUMENTS)
    if unknown:
        raise TypeError(
            f"`generate()` got an unexpected argument `{sorted(unknown)[0]}`."
        )
    controls = {k: v for k, v in controls.items() if v is not None}
    if params is not None:
        if controls:
            raise ValueError(
                "Pass sampling controls either in `params` or as arguments "
                f"(`{sorted(controls)[0]}`), not both."
            )
        return params
    base = sampling.SamplingParams.from_sampler(lm.sampler)
    if base is None:
        if controls:
            raise ValueError(
                f"`{sorted(controls)[0]}` cannot be combined with the "
                f"compiled {type(lm.sampler).__name__}; "
                "`compile(sampler='greedy')` first."
            )
        return None
    if base.greedy and "temperature" not in controls:
        if any(name in controls for name in _SAMPLING_ONLY):
            controls["temperature"] = 1.0
    return dataclasses.replace(base, **controls) if controls else base


def check_stop(stop):
    """`stop` as a tuple of non-empty strings, or a clear error."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError(
            "`stop` must be a string or a list of strings; got "
            f"{type(stop).__name__}."
        )
    for entry in stop:
        if not isinstance(entry, str) or not entry:
            raise TypeError(
                f"`stop` entries must be non-empty strings; got {entry!r}."
            )
    return tuple(stop)


def check_prompts(inputs):
    """Returns `(list_of_strings, is_scalar)` or raises a TypeError."""
    if isinstance(inputs, bytes):
        inputs = inputs.decode("utf-8")
    if isinstance(inputs, str):
        return [inputs], True
    if hasattr(inputs, "numpy") and not isinstance(inputs, np.ndarray):
        inputs = inputs.numpy()
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "SUO":
        if inputs.ndim == 0:
            return check_prompts(inputs.item())
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


def tokenize_prompts(lm, prompts):
    """Each prompt's token ids, `<bos>` first, as the preprocessor makes."""
    if lm.preprocessor is None:
        raise ValueError(
            "This model has no preprocessor, so it cannot tokenize "
            "strings. Pass a dict of `token_ids` and `padding_mask`, or "
            "attach a `Gemma2CausalLMPreprocessor`."
        )
    token_ids = lm.preprocessor.tokenizer(prompts)
    longest = max(len(_to_list(ids)) for ids in token_ids) + 1
    batch = lm.preprocessor.generate_preprocess(
        prompts, sequence_length=longest
    )
    ids = np.asarray(batch["token_ids"])
    mask = np.asarray(batch["padding_mask"]).astype(bool)
    return [ids[row][mask[row]].tolist() for row in range(len(prompts))]


def _check_lengths(max_length, max_new_tokens):
    if max_length is not None and max_new_tokens is not None:
        raise ValueError(
            "Pass either `max_length` (total length, prompt included) or "
            "`max_new_tokens`, not both."
        )
    for name, value in (
        ("max_length", max_length),
        ("max_new_tokens", max_new_tokens),
    ):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def _stop_token_ids(lm, stop_token_ids):
    if stop_token_ids == "auto":
        if lm.preprocessor is None:
            raise ValueError(
                "`stop_token_ids='auto'` needs a preprocessor to know the "
                "tokenizer. Pass the ids of `<eos>` and `<end_of_turn>` "
                "(`stop_token_ids=(1, 107)` in Gemma's vocabulary) or "
                "`None`."
            )
        stop_token_ids = lm.preprocessor.tokenizer.stop_token_ids
    if stop_token_ids is None:
        return None
    return tuple(int(i) for i in stop_token_ids)


def _constraint(lm, json_schema, grammar):
    """A maker of the constraint each sequence's text must follow (one
    state per sequence), checked up front; `None` without one."""
    if json_schema is None and grammar is None:
        return None
    if json_schema is not None and grammar is not None:
        raise ValueError("Pass `json_schema` or `grammar`, not both.")
    if lm.preprocessor is None:
        raise ValueError(
            "Structured output needs the tokenizer: attach a preprocessor."
        )
    tokenizer = lm.preprocessor.tokenizer

    def make():
        if json_schema is not None:
            return structured.Constraint.from_json_schema(
                tokenizer, json_schema
            )
        return structured.Constraint.from_grammar(tokenizer, grammar)

    make()  # a schema the library rejects fails before any generation
    return make


def _per_prompt(params, count):
    if isinstance(params, (list, tuple)):
        if len(params) != count:
            raise ValueError(
                f"`params` has {len(params)} entries for {count} prompts; "
                "pass one `SamplingParams`, or one per prompt."
            )
        return list(params)
    return [params] * count


def _sequences(
    lm,
    prompts,
    params_list,
    max_length,
    max_new_tokens,
    stop_token_ids,
    stop,
    constraint,
    stream,
):
    tokenizer = lm.preprocessor.tokenizer if lm.preprocessor else None
    if max_new_tokens is None:
        _check_room(prompts, max_length)
    sequences = []
    for prompt, params in zip(prompts, params_list):
        budget = max_new_tokens or max_length - len(prompt)
        sequences.append(
            Sequence(
                prompt,
                max_new_tokens=max(budget, 0),
                params=params,
                stop_token_ids=stop_token_ids or (),
                stop=stop,
                constraint=None if constraint is None else constraint(),
                tokenizer=tokenizer,
                stream=stream,
                sampler=None if params is not None else lm.sampler,
            )
        )
    return sequences


def _read_prompts(lm, inputs):
    """`(prompts, is_scalar, width)`: each prompt's ids, `<bos>` first, and
    the default total length (a dict's width, else the preprocessor's
    `sequence_length`)."""
    if isinstance(inputs, dict):
        return _dict_prompts(lm, inputs)
    texts, is_scalar = check_prompts(inputs)
    prompts = tokenize_prompts(lm, texts)
    return prompts, is_scalar, lm.preprocessor.sequence_length


def _check_room(prompts, max_length):
    """Refuses a `max_length` that leaves the longest prompt no room."""
    longest = max(len(p) for p in prompts)
    if longest >= max_length:
        raise ValueError(
            f"A prompt has {longest} tokens (with <bos>) but max_length is "
            f"{max_length}, which leaves no room to generate. Pass a "
            "larger `max_length`, or `max_new_tokens=N` to size it to "
            "the prompt."
        )


def _dict_prompts(lm, inputs):
    """`(prompts, is_scalar, width)` of a `token_ids`/`padding_mask` dict."""
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
    compiled.check_token_ids(token_ids, lm.backbone.vocabulary_size)
    padding_mask = padding_mask.astype(bool)
    if padding_mask.sum(axis=-1).min() < 1:
        raise ValueError(
            "Every prompt needs at least one token (`<bos>`); a row of "
            "`padding_mask` is all zeros."
        )
    prompts = [
        token_ids[row][padding_mask[row]].astype(int).tolist()
        for row in range(len(token_ids))
    ]
    return prompts, False, token_ids.shape[1]


def _as_dict(sequences, width, strip_prompt):
    """Numpy `token_ids`/`padding_mask` of prompts and outputs."""
    token_ids = np.zeros((len(sequences), width), "int32")
    padding_mask = np.zeros((len(sequences), width), bool)
    for row, sequence in enumerate(sequences):
        ids = sequence.output_ids if strip_prompt else sequence.ids
        ids = ids[:width]
        token_ids[row, : len(ids)] = ids
        padding_mask[row, : len(ids)] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _full_text(lm, sequence, result):
    """The prompt and its continuation, detokenized together (so the
    continuation keeps its leading space), cut at a stop string."""
    stops = sequence.stop_token_ids
    ids = [i for i in sequence.ids if i not in stops]
    outputs = lm.preprocessor.generate_postprocess(
        {
            "token_ids": np.asarray([ids], "int32"),
            "padding_mask": np.ones((1, len(ids)), bool),
        }
    )
    text = _to_strings(outputs)[0]
    if sequence.stream is None or not sequence.stream.stopped:
        return text
    prompt = detokenize(lm.preprocessor.tokenizer, sequence.prompt_ids[1:])
    begin = len(prompt) if text.startswith(prompt) else 0
    found = [i for i in (text.find(s, begin) for s in sequence.stop) if i >= 0]
    return text[: min(found)] if found else text


def _stream(engine, sequence):
    engine.add([sequence])
    while not sequence.finished:
        for _, piece in engine.advance():
            if piece:
                yield piece
    engine.remove(sequence)


def _search_generate(
    lm, inputs, max_length, max_new_tokens, stop_token_ids, strip_prompt
):
    """Beam or contrastive search through KerasHub's sampler loop."""
    if _is_dataset(inputs):
        if max_new_tokens is not None:
            raise ValueError(
                "`max_new_tokens` is not supported for a tf.data.Dataset; "
                "pass `max_length`."
            )
        return lm._keras_hub_generate(
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )
    as_dict = isinstance(inputs, dict)
    prompts, is_scalar, width = _read_prompts(lm, inputs)
    longest = max(len(p) for p in prompts)
    if max_new_tokens is not None:
        width = max(width if as_dict else 0, longest + max_new_tokens)
        limits = [len(p) + max_new_tokens for p in prompts]
    else:
        width = max_length or width
        limits = [width] * len(prompts)
    _check_room(prompts, width)
    total = compiled.bucket_length(width)
    token_ids = np.zeros((len(prompts), total), "int32")
    prompt_mask = np.zeros((len(prompts), total), bool)
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
        prompt_mask[row, : len(prompt)] = True
    shortest = min(len(p) for p in prompts)
    prefill = min(compiled.bucket_length(shortest), total)
    outputs = lm.make_generate_function()(
        {
            "token_ids": token_ids,
            "padding_mask": prompt_mask,
            "prefill_ids": token_ids[:, :prefill],
            "limits": np.asarray(limits, "int32"),
        },
        stop_token_ids=stop_token_ids,
    )
    token_ids = np.asarray(outputs["token_ids"])[:, :width]
    padding_mask = np.asarray(outputs["padding_mask"])[:, :width]
    if strip_prompt:
        for row, prompt in enumerate(prompts):
            size = len(prompt)
            token_ids[row] = np.roll(token_ids[row], -size)
            padding_mask[row] = np.roll(padding_mask[row], -size)
            padding_mask[row, width - size :] = False
    batch = {"token_ids": token_ids, "padding_mask": padding_mask}
    if as_dict:
        return batch
    texts = _to_strings(lm.preprocessor.generate_postprocess(batch))
    return texts[0] if is_scalar else texts


def _generate_dataset(lm, dataset, options):
    """Generates a `tf.data.Dataset` of prompts batch by batch."""
    outputs = []
    for batch in dataset:
        if isinstance(batch, dict):
            batch = {k: np.asarray(v) for k, v in batch.items()}
        else:
            batch = check_prompts(batch)[0]
        outputs.append(generate(lm, batch, **options))
    if outputs and isinstance(outputs[0], dict):
        width = max(o["token_ids"].shape[1] for o in outputs)
        return {
            key: np.concatenate(
                [
                    np.pad(o[key], [(0, 0), (0, width - o[key].shape[1])])
                    for o in outputs
                ]
            )
            for key in ("token_ids", "padding_mask")
        }
    return [item for output in outputs for item in output]


def _is_dataset(inputs):
    # TensorFlow may be absent: then `inputs` is no tf.data.Dataset
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return isinstance(inputs, tf.data.Dataset)


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
