"""Reference twins: tiny random HF `Gemma2ForCausalLM`s with our weights.

The weight move here is the test's own (HF layout -> our layout); the public
converters are another issue. Everything compares float32 numerics.
"""

import numpy as np

import keras_gemma2

# Tiny, with every Gemma 2 feature visible: GQA (4 query / 2 kv heads),
# head_dim 8 != hidden_dim / num_query_heads = 6 != query_pre_attn_scalar 5,
# a window of 4 shorter than the test sequences, both soft caps small enough
# to bite on random weights.
TINY_KWARGS = {
    "vocabulary_size": 97,  # 256000
    "num_layers": 3,  # 26 / 42 / 46
    "num_query_heads": 4,  # 8 / 16 / 32
    "num_key_value_heads": 2,  # 4 / 8 / 16
    "hidden_dim": 24,  # 2304 / 3584 / 4608
    "intermediate_dim": 40,  # 9216 / 14336 / 36864 per gate
    "head_dim": 8,  # 256 / 256 / 128
    "query_pre_attn_scalar": 5,  # 256 / 256 / 144
    "sliding_window_size": 4,  # 4096
    "attention_logit_soft_cap": 2.0,  # 50
    "final_logit_soft_cap": 3.0,  # 30
}


def random_token_ids(batch=2, length=11, seed=0):
    """`[batch, length]` ids of the tiny vocabulary, `<bos>` first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, TINY_KWARGS["vocabulary_size"], (batch, length))
    ids[:, 0] = 2  # <bos>
    return ids.astype("int32")


def hf_config(**kwargs):
    """A transformers `Gemma2Config` matching our backbone kwargs."""
    import transformers

    k = {**TINY_KWARGS, **kwargs}
    return transformers.Gemma2Config(
        vocab_size=k["vocabulary_size"],
        hidden_size=k["hidden_dim"],
        intermediate_size=k["intermediate_dim"],
        num_hidden_layers=k["num_layers"],
        num_attention_heads=k["num_query_heads"],
        num_key_value_heads=k["num_key_value_heads"],
        head_dim=k["head_dim"],
        query_pre_attn_scalar=k["query_pre_attn_scalar"],
        sliding_window=k["sliding_window_size"],
        attn_logit_softcapping=k["attention_logit_soft_cap"],
        final_logit_softcapping=k["final_logit_soft_cap"],
        max_position_embeddings=128,
        hidden_activation="gelu_pytorch_tanh",
    )


def hf_model(seed=0, **kwargs):
    """A random float32 HF Gemma 2 on the eager path (keeps the soft cap)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(**kwargs)
    config._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(config).eval()
    # HF initialises norms at zero and embeddings with std 0.02; widen both
    # so every weight matters to the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "norm" in name else 0.3)
    return model


def our_twin(hf, **kwargs):
    """Our `Gemma2Backbone` with the HF model's weights."""
    backbone = keras_gemma2.Gemma2Backbone(
        **{**TINY_KWARGS, **kwargs}, dtype="float32"
    )
    load_hf_weights(backbone, hf)
    return backbone


def load_hf_weights(backbone, hf):
    """Copies HF `Gemma2ForCausalLM` weights into our backbone."""
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    n, k, h = (
        backbone.num_query_heads,
        backbone.num_key_value_heads,
        backbone.head_dim,
    )
    d = backbone.hidden_dim
    backbone.token_embedding.embeddings.assign(
        state["model.embed_tokens.weight"]
    )
    backbone.final_normalization.scale.assign(state["model.norm.weight"])
    for i, block in enumerate(backbone.transformer_layers):
        p = f"model.layers.{i}."
        attention = block.attention
        # HF q_proj: [n * h, d] -> ours [n, d, h].
        attention.query.kernel.assign(
            state[p + "self_attn.q_proj.weight"]
            .reshape(n, h, d)
            .transpose(0, 2, 1)
        )
        attention.key.kernel.assign(
            state[p + "self_attn.k_proj.weight"]
            .reshape(k, h, d)
            .transpose(0, 2, 1)
        )
        attention.value.kernel.assign(
            state[p + "self_attn.v_proj.weight"]
            .reshape(k, h, d)
            .transpose(0, 2, 1)
        )
        # HF o_proj: [d, n * h] -> ours [n, h, d].
        attention.attention_output.kernel.assign(
            state[p + "self_attn.o_proj.weight"].T.reshape(n, h, d)
        )
        block.ffw_gating.kernel.assign(state[p + "mlp.gate_proj.weight"].T)
        block.ffw_gating_2.kernel.assign(state[p + "mlp.up_proj.weight"].T)
        block.ffw_linear.kernel.assign(state[p + "mlp.down_proj.weight"].T)
        norms = {
            "pre_attention_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "pre_ffw_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
        for ours, theirs in norms.items():
            getattr(block, ours).scale.assign(state[p + theirs + ".weight"])


def hf_logits(hf, token_ids, padding_mask=None):
    """HF float32 logits as numpy."""
    import torch

    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    mask = None
    if padding_mask is not None:
        mask = torch.as_tensor(np.asarray(padding_mask), dtype=torch.long)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.numpy()


def hf_greedy(hf, token_ids, num_tokens):
    """The reference greedy continuation: argmax of full forward passes."""
    ids = np.asarray(token_ids)
    for _ in range(num_tokens):
        next_ids = hf_logits(hf, ids)[:, -1].argmax(-1)
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
    return ids
