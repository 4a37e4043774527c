"""Export LoRA adapters as a Hugging Face PEFT adapter folder.

The folder holds `adapter_config.json` and `adapter_model.safetensors`;
`peft.PeftModel.from_pretrained(base, path)` loads it onto the Hugging Face
Gemma 2 the backbone was fine-tuned from (the original checkpoint, or our
`export_to_transformers` of the model *before* LoRA was enabled: that
export merges enabled adapters into the kernels).

Keras' LoRA factors a kernel as `base + (alpha / rank) * a @ b` with
`a: kernel.shape[:-1] + (rank,)` and `b: (rank, kernel.shape[-1])`; PEFT's
`nn.Linear` LoRA adds `(lora_alpha / r) * lora_B @ lora_A` to the
`[out, in]` weight. Per layout (legend of `names.py`; H is n for the query,
k for key and value):

- `ffw_*`, kernel `[in, out]`: `lora_A = a.T`, `lora_B = b.T`; rank r.
- `attention_output`, kernel `[n, h, d]` (HF `[d, n * h]`): `lora_A` is
  `a` reshaped to `[n * h, r]` and transposed, `lora_B = b.T`; rank r.
- `query`/`key`/`value`, kernel `[H, d, h]` (HF `[H * h, d]`): `a` is one
  `[d, r]` matrix per head and `b` is shared, so the HF delta has rank
  `H * r`: `lora_A` `[H * r, d]` stacks the heads' `a.T`, and `lora_B`
  `[H * h, H * r]` is block-diagonal with `b.T` in each block. Its
  `lora_alpha` is `alpha * H`, so that PEFT's `lora_alpha / r` equals
  Keras' `alpha / rank`; `rank_pattern` and `alpha_pattern` record these.

HF module names come from `names.py`, the one table of them.
"""

import json
import os

import numpy as np
from keras import ops

from keras_gemma2 import architectures
from keras_gemma2 import atomic
from keras_gemma2.convert import names
from keras_gemma2.convert.to_huggingface import check_target

_HEADS = {"query": "n", "key": "k", "value": "k"}
_OUTPUT = ("attention_output",)
_DENSE = ("ffw_gating", "ffw_gating_2", "ffw_linear")


def export_peft(backbone, path, overwrite=False, base_model_name_or_path=None):
    """Writes the backbone's LoRA adapters as a Hugging Face PEFT folder.

    `peft.PeftModel.from_pretrained(model, path)` loads the folder onto the
    un-merged Hugging Face Gemma 2 the adapters were trained on and
    reproduces our LoRA model's logits. The factors are written in
    float32. The write is atomic: on any error, `path` is left as it was.

    Args:
        backbone: a `Gemma2Backbone` with LoRA enabled
            (`keras_gemma2.lora.enable`) and not merged, or a
            `Gemma2CausalLM` holding one.
        path: the folder to write. It must not exist or be empty unless
            `overwrite=True`.
        overwrite: bool. Replace a non-empty folder at `path`. Defaults to
            `False`.
        base_model_name_or_path: optional str recorded in
            `adapter_config.json` (the Hub id or folder of the base model).

    Returns:
        The absolute path of the written folder.

    Example:
    ```python
    import os, tempfile
    from keras_gemma2.lora import export_peft
    backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.enable(backbone, rank=2, alpha=4, targets="all")
    # ... fine-tune ...
    path = export_peft(backbone, os.path.join(tempfile.mkdtemp(), "adapter"))
    # peft.PeftModel.from_pretrained(hf_gemma2, path) loads it.
    ```
    """
    backbone = getattr(backbone, "backbone", backbone)
    layers = _lora_layers(backbone)
    path = os.path.abspath(os.fspath(path))
    check_target(path, overwrite)
    dims = architectures.axis_sizes(backbone.get_config())
    hf_modules = {
        spec.path: spec for spec in names.weight_specs(backbone.get_config())
    }
    tensors = {}
    modules = {}  # HF module -> (short name, r, alpha, dropout)
    for layer in layers:
        spec = hf_modules.get(f"{layer.path}/kernel")
        target = layer.path.split("/")[-1]
        if spec is None or target not in (*_HEADS, *_OUTPUT, *_DENSE):
            raise ValueError(
                f"Layer {layer.path!r} has LoRA but no PEFT counterpart; only "
                "the decoder blocks' attention and FFN projections export."
            )
        module = spec.hf_key.removesuffix(".weight")
        prefix = f"base_model.model.{module}"
        lora_a, lora_b, factor = _layer_factors(layer, spec, target, dims)
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
        modules[module] = (
            module.rsplit(".", 1)[-1],
            layer.lora_rank * factor,
            layer.lora_alpha * factor,
            float(getattr(layer, "lora_dropout", 0.0) or 0.0),
        )
    config = _adapter_config(backbone, layers, modules, base_model_name_or_path)
    with atomic.staged_folder(path, "peft") as staging:
        config_file = os.path.join(staging, "adapter_config.json")
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        atomic.save_safetensors(
            tensors,
            os.path.join(staging, "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
    return path


def _layer_factors(layer, spec, target, dims):
    """One LoRA layer's PEFT `(lora_A, lora_B, rank factor)`, checked
    against the shape of its HF weight."""
    a = ops.convert_to_numpy(ops.cast(layer.lora_kernel_a, "float32"))
    b = ops.convert_to_numpy(ops.cast(layer.lora_kernel_b, "float32"))
    lora_a, lora_b, factor = _peft_factors(target, a, b, dims)
    expected = spec.hf_shape
    if (lora_b.shape[0], lora_a.shape[1]) != expected:
        raise ValueError(
            f"{layer.path}: adapters give a {lora_b.shape[0]} x "
            f"{lora_a.shape[1]} update; {spec.hf_key} is {expected}."
        )
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b), factor


def _lora_layers(backbone):
    """The backbone's enabled LoRA layers; refuses none and merged ones."""
    layers = list(getattr(backbone, "_lora_enabled_layers", None) or [])
    layers += [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False) and layer not in layers
    ]
    if not layers:
        raise ValueError(
            "This backbone has no LoRA adapters to export: call "
            "`keras_gemma2.lora.enable(backbone, rank)` and train first."
        )
    merged = [layer.path for layer in layers if _merged(layer)]
    if merged:
        raise ValueError(
            "The LoRA adapters are merged into their kernels (e.g. "
            f"{merged[0]!r}); call `keras_gemma2.lora.unmerge(backbone)` "
            "before exporting them for PEFT."
        )
    return layers


def _merged(layer):
    return getattr(layer, "_lora_merged", False)


def _peft_factors(target, a, b, dims):
    """(lora_A `[r', in]`, lora_B `[out, r']`, r' / rank) of one layer."""
    if target in _DENSE:
        # kernel [in, out] = HF weight.T; delta.T = b.T @ a.T.
        return a.T, b.T, 1
    if target in _OUTPUT:
        # kernel [n, h, d] -> HF [d, n * h]; a [n, h, r] -> [n * h, r].
        return a.reshape(-1, a.shape[-1]).T, b.T, 1
    # kernel [H, d, h] -> HF [H * h, d]; a [H, d, r] per head, b [r, h].
    heads, hidden, rank = a.shape
    if heads != dims[_HEADS[target]] or hidden != dims["d"]:
        raise ValueError(
            f"{target} adapters have shape {a.shape}; expected "
            f"({dims[_HEADS[target]]}, {dims['d']}, rank)."
        )
    # Row (head i, j) of lora_A is a[i, :, j].
    lora_a = a.transpose(0, 2, 1).reshape(heads * rank, hidden)
    # Block i of lora_B (rows of head i, columns of head i's ranks) is b.T.
    lora_b = np.zeros((heads * b.shape[1], heads * rank), np.float32)
    for i in range(heads):
        lora_b[
            i * b.shape[1] : (i + 1) * b.shape[1], i * rank : (i + 1) * rank
        ] = b.T
    return lora_a, lora_b, heads


def _adapter_config(backbone, layers, modules, base_model_name_or_path):
    """PEFT's `LoraConfig` fields: a default r and alpha, per-module ones
    by module name (`q_proj`, ...) where they differ."""
    by_name = {}
    for name, r, alpha, dropout in modules.values():
        if by_name.setdefault(name, (r, alpha, dropout)) != (r, alpha, dropout):
            raise ValueError(
                f"The {name} adapters differ in rank, alpha or dropout "
                "across layers; PEFT's config records one per module name."
            )
    dropouts = {dropout for _, _, dropout in by_name.values()}
    if len(dropouts) > 1:
        raise ValueError(
            f"The adapters use several dropout rates {sorted(dropouts)}; "
            "PEFT's config records one."
        )
    rank = layers[0].lora_rank
    alpha = layers[0].lora_alpha
    rank_pattern = {n: r for n, (r, _, _) in by_name.items() if r != rank}
    alpha_pattern = {n: a for n, (_, a, _) in by_name.items() if a != alpha}
    # Every block must carry the same targets: `target_modules` names them
    # by module name, and PEFT would add fresh adapters to missing ones.
    expected = {
        module
        for module in _all_modules(backbone)
        if module.rsplit(".", 1)[-1] in by_name
    }
    if expected != set(modules):
        missing = sorted(expected - set(modules))
        raise ValueError(
            f"LoRA is enabled on only some blocks (none on {missing[:3]}); "
            "PEFT's `target_modules` needs the same targets in every block."
        )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "target_modules": sorted(by_name),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _all_modules(backbone):
    return {
        spec.hf_key.removesuffix(".weight")
        for spec in names.weight_specs(backbone.get_config())
    }
