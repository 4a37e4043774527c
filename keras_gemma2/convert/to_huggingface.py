"""Export a `Gemma2CausalLM` to a Hugging Face `transformers` folder.

The folder holds `config.json`, `generation_config.json`,
`model.safetensors` and, when the model has a preprocessor, the SentencePiece
`tokenizer.model` with `tokenizer_config.json` and
`special_tokens_map.json`; `transformers.Gemma2ForCausalLM.from_pretrained`
and `transformers.AutoTokenizer.from_pretrained` load it. Weight names and
layouts come from `names.py`, the one table of them.
"""

import json
import os

import ml_dtypes
import numpy as np
from keras import ops

from keras_gemma2 import architectures
from keras_gemma2 import atomic
from keras_gemma2 import special_tokens
from keras_gemma2.convert import names

# float16 overflows in Gemma 2's activations (shared/GEMMA2.md).
_DTYPES = ("float32", "bfloat16")


def export_to_transformers(causal_lm, path, dtype=None, overwrite=False):
    """Writes `causal_lm` as a Hugging Face Gemma 2 folder at `path`.

    Args:
        causal_lm: a `Gemma2CausalLM` (its `preprocessor` may be `None`; then
            no tokenizer files are written).
        path: the folder to create. It must not exist or be empty, unless
            `overwrite=True`.
        dtype: `"float32"` or `"bfloat16"`, the dtype of the written weights.
            Defaults to the backbone's variable dtype.
        overwrite: bool. Replace an existing non-empty folder at `path`.

    Returns:
        The absolute path of the written folder.

    The export is atomic: files are written to a temporary sibling folder
    that is renamed to `path` only once complete, so an error leaves `path`
    as it was. LoRA adapters are merged into their kernels.
    """
    backbone = causal_lm.backbone
    kwargs = backbone.get_config()
    if dtype is None:
        dtype = backbone.dtype_policy.variable_dtype
    dtype = str(dtype)
    if dtype not in _DTYPES:
        raise ValueError(
            f"`dtype` must be one of {_DTYPES}; got {dtype!r}. "
            "(float16 overflows in Gemma 2's activations.)"
        )
    # Everything that can be refused is checked before a file is written.
    tokenizer = None
    if causal_lm.preprocessor is not None:
        tokenizer = causal_lm.preprocessor.tokenizer
        if tokenizer.proto is None:
            raise ValueError(
                "The preprocessor's tokenizer has no vocabulary (`proto` is "
                "None); set one, or export with `preprocessor=None`."
            )
    token_ids, generation_config = _token_ids(tokenizer)
    config = names.hf_config_from_kwargs(kwargs, dtype, token_ids)
    path = os.path.abspath(os.fspath(path))
    check_target(path, overwrite)
    tensors = _hf_tensors(backbone, kwargs, dtype)

    with atomic.staged_folder(path, "export") as staging:
        _write_json(os.path.join(staging, "config.json"), config)
        _write_json(
            os.path.join(staging, "generation_config.json"),
            generation_config,
        )
        _write_weights(os.path.join(staging, "model.safetensors"), tensors)
        if tokenizer is not None:
            _write_tokenizer(staging, tokenizer)
    return path


def _token_ids(tokenizer):
    """The special-token ids of `config.json` and `generation_config.json`.

    The tokenizer's own, looked up by name; Gemma's vocabulary's without
    one. Generation stops where `Gemma2CausalLM.generate` does by default:
    `<eos>` and, where the vocabulary has it, `<end_of_turn>`.
    """
    if tokenizer is None:
        token_ids = dict(names.GEMMA_TOKEN_IDS)
        stop_ids = list(names.GEMMA_STOP_TOKEN_IDS)
    else:
        token_ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.end_token_id,
            "bos_token_id": tokenizer.start_token_id,
        }
        stop_ids = list(tokenizer.stop_token_ids)
    generation_config = {
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": stop_ids,
        "pad_token_id": token_ids["pad_token_id"],
    }
    return token_ids, generation_config


# --- weights -----------------------------------------------------------------


def _hf_tensors(backbone, kwargs, dtype):
    """HF state-dict key -> numpy array, LoRA merged, in `dtype`."""
    quantized = [
        layer.name
        for layer in backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None)
    ]
    if quantized:
        raise ValueError(
            "Exporting a quantized model is not supported (quantized "
            f"layers: {quantized[:4]}). Export the model before quantizing."
        )
    variables = {v.path: v for v in backbone.weights}
    merged, lora_paths = _merged_lora_kernels(backbone)
    dims = architectures.axis_sizes(kwargs)
    specs = names.weight_specs(kwargs)
    tensors = {}
    for spec in specs:
        if spec.path in merged:
            value = merged[spec.path]
        elif spec.path in variables:
            value = variables[spec.path]
        else:
            raise ValueError(
                f"The model has no variable {spec.path!r}, which the Hugging "
                f"Face export needs (for `{spec.hf_key}`)."
            )
        # bf16 -> float32 is exact; the cast to `dtype` happens in numpy.
        array = ops.convert_to_numpy(ops.cast(value, "float32"))
        if tuple(array.shape) != spec.shape:
            raise ValueError(
                f"{spec.path} has shape {tuple(array.shape)}; expected "
                f"{spec.shape} for {spec.hf_key}."
            )
        tensors[spec.hf_key] = _cast(spec.to_hf(array, dims), dtype)
    exported = {spec.path for spec in specs}
    left_out = sorted(set(variables) - exported - lora_paths)
    if left_out:
        raise ValueError(
            "These variables have no Hugging Face counterpart and would be "
            f"dropped by the export: {left_out[:8]}."
        )
    # The output projection is the tied embedding: no `lm_head.weight`.
    return tensors


def _merged_lora_kernels(backbone):
    """LoRA layers' merged kernels by base-variable path, and LoRA paths.

    Keras 3.15's `EinsumDense.kernel` (and `Embedding.embeddings`) returns
    `base + (lora_alpha / lora_rank) * lora_a @ lora_b`, cast to the compute
    dtype, when LoRA is enabled: the exact kernel the forward pass uses. The
    base variable alone (`_kernel`, whose path the spec names) would drop
    the fine-tuning.
    """
    merged, lora_paths = {}, set()
    for layer in backbone._flatten_layers():
        if not getattr(layer, "lora_enabled", False):
            continue
        if hasattr(layer, "lora_kernel_a"):
            base, value = layer._kernel, layer.kernel
            adapters = (layer.lora_kernel_a, layer.lora_kernel_b)
        elif hasattr(layer, "lora_embeddings_a"):
            base, value = layer._embeddings, layer.embeddings
            adapters = (layer.lora_embeddings_a, layer.lora_embeddings_b)
        else:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has LoRA "
                "enabled but no known adapter variables to merge."
            )
        merged[base.path] = value
        lora_paths.update(a.path for a in adapters)
    return merged, lora_paths


def _cast(array, dtype):
    if dtype == "bfloat16":
        return array.astype(ml_dtypes.bfloat16)
    return array.astype(np.float32)


def _write_weights(filename, tensors):
    # bf16 weights stay bf16 on disk without torch. One file; no
    # `lm_head.weight` (tied embeddings).
    atomic.save_safetensors(tensors, filename, metadata={"format": "pt"})


# --- tokenizer and json ------------------------------------------------------


def _write_tokenizer(folder, tokenizer):
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(bytes(tokenizer.proto))
    # Only tokens the vocabulary has: transformers appends a named token it
    # does not find as a new id, past the embedding (its GemmaTokenizer
    # names `<mask>` unless told not to).
    vocabulary = set(tokenizer.get_vocabulary())
    markers = (tokenizer.start_of_turn_token, tokenizer.end_of_turn_token)
    chat_tokens = [token for token in markers if token in vocabulary]
    mask_token = (
        special_tokens.MASK if special_tokens.MASK in vocabulary else None
    )
    _write_json(
        os.path.join(folder, "tokenizer_config.json"),
        {
            "tokenizer_class": "GemmaTokenizer",
            **special_tokens.HF_NAMES,
            "mask_token": mask_token,
            "additional_special_tokens": chat_tokens,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
        },
    )
    _write_json(
        os.path.join(folder, "special_tokens_map.json"),
        {**special_tokens.HF_NAMES, "additional_special_tokens": chat_tokens},
    )


def _write_json(filename, data):
    with open(filename, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --- the atomic move ---------------------------------------------------------


def check_target(path, overwrite):
    """Refuses an export over a file, or over a non-empty folder unless
    `overwrite`."""
    atomic.check_target(
        path,
        fix="pass `overwrite=True` to replace it, or choose a new folder",
        replaceable=overwrite,
    )
