"""Reference twins: tiny random HF `Gemma2ForCausalLM`s with our weights.

The weight move here is the test's own (HF layout -> our layout); the public
converters are another issue. Everything compares float32 numerics. Small
SentencePiece vocabularies with any special-token layout come from the
`sentencepiece` trainer itself.
"""

import io
import os
import pathlib

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


# Gemma's ids (shared/GEMMA2.md) and a Llama-like layout whose turn markers
# sit right after the four basic pieces.
GEMMA_IDS = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}
OTHER_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]


def sentencepiece_vocabulary(
    vocabulary_size=400, ids=GEMMA_IDS, user_symbols=(), control_symbols=()
):
    """The bytes of a BPE SentencePiece model trained on the package's docs.

    Pieces are named `<pad>`, `<eos>`, `<bos>`, `<unk>`, at `ids`; the
    symbols follow them in order (`TURN_MARKERS` as `user_symbols` after
    four basic pieces: ids 4 and 5). An id of -1 leaves its piece out.
    """
    import sentencepiece as spm

    docs = pathlib.Path(__file__).resolve().parent.parent / "keras_gemma2"
    docs = sorted((docs / "datasets" / "rag_docs").rglob("*.md"))[:5]
    lines = [
        line
        for doc in docs
        for line in doc.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocabulary_size,
        **ids,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(user_symbols),
        control_symbols=list(control_symbols),
        byte_fallback=True,  # 256 byte pieces: 400 fit a small text
        # Gemma's text handling, as scripts/train_tiny_preset.py (and the
        # one transformers' GemmaTokenizer assumes when it converts one).
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def hf_folder(path, hf, proto=None):
    """Saves `hf` as a checkpoint folder; `proto` as its `tokenizer.model`."""
    hf.save_pretrained(path)
    if proto is not None:
        with open(os.path.join(path, "tokenizer.model"), "wb") as f:
            f.write(proto)
    return path


def hf_config(token_ids=None, **kwargs):
    """A transformers `Gemma2Config` matching our backbone kwargs.

    `token_ids`: optional `pad_token_id`/`bos_token_id`/`eos_token_id`
    (transformers' defaults are Gemma's 0/2/1).
    """
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
        **(token_ids or {}),
    )


def hf_model(seed=0, token_ids=None, **kwargs):
    """A random float32 HF Gemma 2 on the eager path (keeps the soft cap)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(token_ids, **kwargs)
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


def keras_hub_backbone(seed=0, query_head_dim_normalize=True, dtype="float32"):
    """A tiny random KerasHub `GemmaBackbone` in Gemma 2 mode."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    k = TINY_KWARGS
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=k["vocabulary_size"],
        num_layers=k["num_layers"],
        num_query_heads=k["num_query_heads"],
        num_key_value_heads=k["num_key_value_heads"],
        hidden_dim=k["hidden_dim"],
        intermediate_dim=2 * k["intermediate_dim"],  # theirs is 2x per gate
        head_dim=k["head_dim"],
        query_head_dim_normalize=query_head_dim_normalize,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=k["final_logit_soft_cap"],
        attention_logit_soft_cap=k["attention_logit_soft_cap"],
        use_sliding_window_attention=True,
        sliding_window_size=k["sliding_window_size"],
        dtype=dtype,
    )
    for w in backbone.weights:  # non-trivial norms and larger weights
        values = np.random.default_rng(len(w.path)).normal(0, 0.3, w.shape)
        w.assign(values.astype("float32"))
    return backbone
