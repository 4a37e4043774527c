"""The one table of weight names and layouts across Gemma 2 formats.

Ours (Keras variable paths), Hugging Face (`Gemma2ForCausalLM` state-dict
keys) and KerasHub (`GemmaBackbone` paths inside `model.weights.h5`), with the
reshapes between our layout and HF's, and the config-key mappings. Nothing
else in the package knows the other formats' names.

Layout legend: d hidden_dim, n query heads, k key/value heads, h head_dim,
f FFN width of one gate.
"""

import numpy as np

from keras_gemma2 import architectures
from keras_gemma2 import special_tokens
from keras_gemma2.layers.attention_masks import attention_layer_types

# --- tensor layouts: ours <-> HF --------------------------------------------


def _identity(x, dims):
    return x


def _heads_from_hf(heads):
    # HF [heads * h, d] -> ours [heads, d, h]
    def convert(x, dims):
        return x.reshape(dims[heads], dims["h"], dims["d"]).transpose(0, 2, 1)

    return convert


def _heads_to_hf(heads):
    # ours [heads, d, h] -> HF [heads * h, d]
    def convert(x, dims):
        return x.transpose(0, 2, 1).reshape(dims[heads] * dims["h"], dims["d"])

    return convert


def _output_from_hf(x, dims):
    # HF o_proj [d, n * h] -> ours [n, h, d]
    return x.T.reshape(dims["n"], dims["h"], dims["d"])


def _output_to_hf(x, dims):
    # ours [n, h, d] -> HF [d, n * h]
    return x.reshape(dims["n"] * dims["h"], dims["d"]).T


def _transpose(x, dims):
    # HF Linear [out, in] <-> ours EinsumDense [in, out]
    return x.T


# (our path, HF key, HF -> ours, ours -> HF, our shape, HF shape); shapes in
# the legend's letters, `nh` = n * h, `kh` = k * h.
# `{i}` is the block index. KerasHub's inner names equal ours.
# fmt: off
_BLOCK = (
    ("pre_attention_norm/scale", "input_layernorm.weight",
     _identity, _identity, ("d",), ("d",)),
    ("attention/query/kernel", "self_attn.q_proj.weight",
     _heads_from_hf("n"), _heads_to_hf("n"), ("n", "d", "h"), ("nh", "d")),
    ("attention/key/kernel", "self_attn.k_proj.weight",
     _heads_from_hf("k"), _heads_to_hf("k"), ("k", "d", "h"), ("kh", "d")),
    ("attention/value/kernel", "self_attn.v_proj.weight",
     _heads_from_hf("k"), _heads_to_hf("k"), ("k", "d", "h"), ("kh", "d")),
    ("attention/attention_output/kernel", "self_attn.o_proj.weight",
     _output_from_hf, _output_to_hf, ("n", "h", "d"), ("d", "nh")),
    ("post_attention_norm/scale", "post_attention_layernorm.weight",
     _identity, _identity, ("d",), ("d",)),
    ("pre_ffw_norm/scale", "pre_feedforward_layernorm.weight",
     _identity, _identity, ("d",), ("d",)),
    ("ffw_gating/kernel", "mlp.gate_proj.weight",
     _transpose, _transpose, ("d", "f"), ("f", "d")),
    ("ffw_gating_2/kernel", "mlp.up_proj.weight",
     _transpose, _transpose, ("d", "f"), ("f", "d")),
    ("ffw_linear/kernel", "mlp.down_proj.weight",
     _transpose, _transpose, ("f", "d"), ("d", "f")),
    ("post_ffw_norm/scale", "post_feedforward_layernorm.weight",
     _identity, _identity, ("d",), ("d",)),
)
_TOP = (
    ("token_embedding/embeddings", "model.embed_tokens.weight",
     _identity, _identity, ("v", "d"), ("v", "d")),
    ("final_normalization/scale", "model.norm.weight",
     _identity, _identity, ("d",), ("d",)),
)
# fmt: on
# KerasHub's h5 groups of the top-level layers (Keras names them by class).
_KERAS_HUB_TOP = {
    "token_embedding": "layers/reversible_embedding",
    "final_normalization": "layers/rms_normalization",
}
# KerasHub's attribute names inside a block, where they differ from ours
# (its layers are *named* like ours, but the h5 groups follow attributes).
_KERAS_HUB_BLOCK = {
    "attention/query": "attention/query_dense",
    "attention/key": "attention/key_dense",
    "attention/value": "attention/value_dense",
    "attention/attention_output": "attention/output_dense",
    "ffw_gating": "gating_ffw",
    "ffw_gating_2": "gating_ffw_2",
}
# An EinsumDense or RMSNorm keeps its one variable at `vars/0`.
_KERAS_HUB_VARIABLE = "vars/0"


class WeightSpec:
    """One weight across formats: our path, HF key, KerasHub h5 path."""

    def __init__(
        self, path, hf_key, keras_hub_key, from_hf, to_hf, shape, hf_shape
    ):
        self.path = path
        self.hf_key = hf_key
        self.keras_hub_key = keras_hub_key
        self._from_hf = from_hf
        self._to_hf = to_hf
        self.shape = shape
        self.hf_shape = hf_shape

    def from_hf(self, array, dims):
        return self._from_hf(np.asarray(array), dims)

    def to_hf(self, array, dims):
        return np.ascontiguousarray(self._to_hf(np.asarray(array), dims))


def weight_specs(kwargs):
    """Every weight of a backbone with these kwargs, in load order."""
    specs = []
    dims = architectures.axis_sizes(kwargs)
    for path, hf_key, from_hf, to_hf, shape, hf_shape in _TOP:
        layer = path.split("/")[0]
        specs.append(
            WeightSpec(
                path,
                hf_key,
                f"{_KERAS_HUB_TOP[layer]}/{_KERAS_HUB_VARIABLE}",
                from_hf,
                to_hf,
                tuple(dims[a] for a in shape),
                tuple(dims[a] for a in hf_shape),
            )
        )
    skip = set()
    if not kwargs.get("use_post_attention_norm", True):
        skip.add("post_attention_norm/scale")
    if not kwargs.get("use_post_ffw_norm", True):
        skip.add("post_ffw_norm/scale")
    for i in range(kwargs["num_layers"]):
        group = "gemma_decoder_block" + (f"_{i}" if i else "")
        for path, hf_key, from_hf, to_hf, shape, hf_shape in _BLOCK:
            if path in skip:
                continue
            layer = path.rsplit("/", 1)[0]
            layer = _KERAS_HUB_BLOCK.get(layer, layer)
            specs.append(
                WeightSpec(
                    f"decoder_block_{i}/{path}",
                    f"model.layers.{i}.{hf_key}",
                    f"layers/{group}/{layer}/{_KERAS_HUB_VARIABLE}",
                    from_hf,
                    to_hf,
                    tuple(dims[a] for a in shape),
                    tuple(dims[a] for a in hf_shape),
                )
            )
    return specs


# --- configs -----------------------------------------------------------------


def _hf_layer_types(num_layers, use_sliding_window_attention):
    """HF's `layer_types` for `attention_layer_types`'s alternation."""
    hf_names = {"local": "sliding_attention", "global": "full_attention"}
    return [
        hf_names[kind]
        for kind in attention_layer_types(
            num_layers, use_sliding_window_attention
        )
    ]


# `Gemma2Backbone` kwarg -> (HF `config.json` key, default when absent): the
# fields that map one to one, read one way by `kwargs_from_hf_config` and
# the other by `hf_config_from_kwargs`. A default of `_REQUIRED` must be
# present. The rest (rope, sliding window, layer types) is written out there.
_REQUIRED = object()
_HF_CONFIG_FIELDS = {
    "vocabulary_size": ("vocab_size", _REQUIRED),
    "num_layers": ("num_hidden_layers", _REQUIRED),
    "num_query_heads": ("num_attention_heads", _REQUIRED),
    "num_key_value_heads": ("num_key_value_heads", _REQUIRED),
    "hidden_dim": ("hidden_size", _REQUIRED),
    "intermediate_dim": ("intermediate_size", _REQUIRED),
    "head_dim": ("head_dim", _REQUIRED),
    "query_pre_attn_scalar": ("query_pre_attn_scalar", _REQUIRED),
    "layer_norm_epsilon": ("rms_norm_eps", 1e-6),
    "attention_logit_soft_cap": ("attn_logit_softcapping", None),
    "final_logit_soft_cap": ("final_logit_softcapping", None),
}


def kwargs_from_hf_config(config):
    """`Gemma2Backbone` kwargs from an HF `config.json` dict."""
    if config.get("model_type") != "gemma2":
        raise ValueError(
            f"config.json has model_type={config.get('model_type')!r}; "
            "this loader reads Gemma 2 checkpoints (model_type 'gemma2')."
        )
    rope = config.get("rope_parameters") or {}
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    sliding = config.get("sliding_window")
    if layer_types is not None:
        expected = _hf_layer_types(num_layers, True)
        if sliding and list(layer_types) != expected:
            raise ValueError(
                "config.json `layer_types` is not Gemma 2's alternation "
                f"(local first): {layer_types}."
            )
    activation = config.get("hidden_activation") or config.get(
        "hidden_act", "gelu_pytorch_tanh"
    )
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(
            f"config.json `hidden_activation` is {activation!r}; Gemma 2 "
            "uses the tanh GeLU ('gelu_pytorch_tanh')."
        )
    kwargs = {
        ours: config[key] if default is _REQUIRED else config.get(key, default)
        for ours, (key, default) in _HF_CONFIG_FIELDS.items()
    }
    return {
        **kwargs,
        "rope_max_wavelength": rope.get(
            "rope_theta", config.get("rope_theta", 10000.0)
        ),
        "use_sliding_window_attention": bool(sliding),
        "sliding_window_size": sliding or 4096,
    }


# Gemma's own vocabulary (shared/GEMMA2.md), and transformers' Gemma2Config
# defaults: the ids written for a model exported without a tokenizer.
GEMMA_TOKEN_IDS = {
    f"{name}_id": special_tokens.GEMMA_IDS[token]
    for name, token in special_tokens.HF_NAMES.items()
    if name != "unk_token"
}
GEMMA_STOP_TOKEN_IDS = [
    special_tokens.GEMMA_IDS[token] for token in special_tokens.STOP_TOKENS
]


def hf_config_from_kwargs(kwargs, dtype="float32", token_ids=None):
    """An HF `config.json` dict for a `Gemma2Backbone`'s kwargs.

    `token_ids` holds `pad_token_id`, `eos_token_id` and `bos_token_id`,
    the tokenizer's; defaults to `GEMMA_TOKEN_IDS`.
    """
    for flag in ("use_post_attention_norm", "use_post_ffw_norm"):
        if not kwargs.get(flag, True):
            raise ValueError(
                f"Hugging Face's Gemma 2 always has both post norms; this "
                f"model has {flag}=False and cannot be exported."
            )
    sliding = kwargs.get("use_sliding_window_attention", True)
    num_layers = kwargs["num_layers"]
    fields = {
        key: kwargs[ours] if default is _REQUIRED else kwargs.get(ours, default)
        for ours, (key, default) in _HF_CONFIG_FIELDS.items()
    }
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        **fields,
        "rope_theta": kwargs.get("rope_max_wavelength", 10000.0),
        "sliding_window": kwargs.get("sliding_window_size", 4096),
        "layer_types": _hf_layer_types(num_layers, sliding),
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        **(token_ids or GEMMA_TOKEN_IDS),
        "torch_dtype": dtype,
    }


def kwargs_from_keras_hub_config(config):
    """`Gemma2Backbone` kwargs from a KerasHub `GemmaBackbone` config.

    KerasHub's `intermediate_dim` is twice the width of one gate, and its
    boolean `query_head_dim_normalize` means `head_dim` when true and
    `hidden_dim / num_query_heads` (144 for the 27B) when false. KerasHub
    0.32's decoder block ignores that flag, so its own 27B scales by head_dim;
    loaded here, the 27B gets the reference's 1/sqrt(144).
    """
    if not config.get("use_post_ffw_norm") or not config.get(
        "use_post_attention_norm"
    ):
        raise ValueError(
            "This KerasHub preset is a Gemma 1 model (no post norms); "
            "keras_gemma2 loads Gemma 2 presets only."
        )
    hidden_dim = config["hidden_dim"]
    num_query_heads = config["num_query_heads"]
    normalize = config.get("query_head_dim_normalize", True)
    return {
        "vocabulary_size": config["vocabulary_size"],
        "num_layers": config["num_layers"],
        "num_query_heads": num_query_heads,
        "num_key_value_heads": config["num_key_value_heads"],
        "hidden_dim": hidden_dim,
        "intermediate_dim": config["intermediate_dim"] // 2,
        "head_dim": config["head_dim"],
        "query_pre_attn_scalar": (
            config["head_dim"] if normalize else hidden_dim // num_query_heads
        ),
        "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
        "attention_logit_soft_cap": config.get("attention_logit_soft_cap"),
        "final_logit_soft_cap": config.get("final_logit_soft_cap"),
        "use_sliding_window_attention": config.get(
            "use_sliding_window_attention", False
        ),
        "sliding_window_size": config.get("sliding_window_size", 4096),
        "use_post_attention_norm": True,
        "use_post_ffw_norm": True,
        "dropout": config.get("dropout", 0.0),
    }
