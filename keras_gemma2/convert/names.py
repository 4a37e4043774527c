"""The one table of weight names and layouts across Gemma 2 formats.

Ours (Keras variable paths), Hugging Face (`Gemma2ForCausalLM` state-dict
keys) and KerasHub (`GemmaBackbone` paths inside `model.weights.h5`), with the
reshapes between our layout and HF's, and the config-key mappings. Nothing
else in the package knows the other formats' names.

Layout legend: d hidden_dim, n query heads, k key/value heads, h head_dim,
f FFN width of one gate.
"""

import numpy as np

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


def dims_of(kwargs):
    """The layout legend's sizes for `Gemma2Backbone` kwargs."""
    return {
        "v": kwargs["vocabulary_size"],
        "d": kwargs["hidden_dim"],
        "n": kwargs["num_query_heads"],
        "k": kwargs["num_key_value_heads"],
        "h": kwargs["head_dim"],
        "f": kwargs["intermediate_dim"],
        "nh": kwargs["num_query_heads"] * kwargs["head_dim"],
        "kh": kwargs["num_key_value_heads"] * kwargs["head_dim"],
    }


def weight_specs(kwargs):
    """Every weight of a backbone with these kwargs, in load order."""
    specs = []
    dims = dims_of(kwargs)
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
        expected = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(num_layers)
        ]
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
    return {
        "vocabulary_size": config["vocab_size"],
        "num_layers": num_layers,
        "num_query_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "hidden_dim": config["hidden_size"],
        "intermediate_dim": config["intermediate_size"],
        "head_dim": config["head_dim"],
        "query_pre_attn_scalar": config["query_pre_attn_scalar"],
        "layer_norm_epsilon": config.get("rms_norm_eps", 1e-6),
        "rope_max_wavelength": rope.get(
            "rope_theta", config.get("rope_theta", 10000.0)
        ),
        "attention_logit_soft_cap": config.get("attn_logit_softcapping"),
        "final_logit_soft_cap": config.get("final_logit_softcapping"),
        "use_sliding_window_attention": bool(sliding),
        "sliding_window_size": sliding or 4096,
    }


# Gemma's own vocabulary (shared/GEMMA2.md), and transformers' Gemma2Config
# defaults: the ids written for a model exported without a tokenizer.
GEMMA_TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
GEMMA_STOP_TOKEN_IDS = [1, 107]  # <eos>, <end_of_turn>


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
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": kwargs["vocabulary_size"],
        "hidden_size": kwargs["hidden_dim"],
        "intermediate_size": kwargs["intermediate_dim"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": kwargs["num_query_heads"],
        "num_key_value_heads": kwargs["num_key_value_heads"],
        "head_dim": kwargs["head_dim"],
        "query_pre_attn_scalar": kwargs["query_pre_attn_scalar"],
        "rms_norm_eps": kwargs.get("layer_norm_epsilon", 1e-6),
        "rope_theta": kwargs.get("rope_max_wavelength", 10000.0),
        "attn_logit_softcapping": kwargs.get("attention_logit_soft_cap"),
        "final_logit_softcapping": kwargs.get("final_logit_soft_cap"),
        "sliding_window": kwargs.get("sliding_window_size", 4096),
        "layer_types": [
            "sliding_attention" if sliding and i % 2 == 0 else "full_attention"
            for i in range(num_layers)
        ],
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
