"""The released Gemma 2 sizes as `Gemma2Backbone` kwargs (the spec sheet).

Numbers from the Gemma 2 report (arXiv 2408.00118), table 1, and HF's
`google/gemma-2-*` configs. Shared by all sizes: vocabulary 256000, sliding
window 4096 on even layers, attention soft cap 50, final soft cap 30.
"""

_SHARED = {
    "vocabulary_size": 256000,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 10000.0,
    "attention_logit_soft_cap": 50.0,
    "final_logit_soft_cap": 30.0,
    "use_sliding_window_attention": True,
    "sliding_window_size": 4096,
    "use_post_attention_norm": True,
    "use_post_ffw_norm": True,
}

GEMMA2_2B = {
    **_SHARED,
    "num_layers": 26,
    "hidden_dim": 2304,
    "intermediate_dim": 9216,  # per gate: 4 * hidden_dim
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,  # = head_dim
}

GEMMA2_9B = {
    **_SHARED,
    "num_layers": 42,
    "hidden_dim": 3584,
    "intermediate_dim": 14336,  # per gate: 4 * hidden_dim
    "num_query_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,  # = head_dim
}

GEMMA2_27B = {
    **_SHARED,
    "num_layers": 46,
    "hidden_dim": 4608,
    "intermediate_dim": 36864,  # per gate: 8 * hidden_dim
    "num_query_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
    # hidden_dim / num_query_heads = 144, not head_dim = 128: the 27B trap.
    "query_pre_attn_scalar": 144,
}

ARCHITECTURES = {"2b": GEMMA2_2B, "9b": GEMMA2_9B, "27b": GEMMA2_27B}


def axis_sizes(kwargs):
    """The sizes behind the axis letters of the layout legend, for
    `Gemma2Backbone` kwargs: `v` vocabulary, `d` hidden, `n` query heads,
    `k` key/value heads, `h` head size, `f` FFN width, and the flattened
    `nh` and `kh` of the Hugging Face projections.

    Example:
    >>> axis_sizes(GEMMA2_2B)["nh"]
    2048
    """
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
