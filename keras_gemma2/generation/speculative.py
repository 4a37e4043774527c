"""Speculative decoding: drafts verified in one forward pass, exactly.

A step drafts up to `k` tokens per sequence, feeds each sequence's last
token and its drafts at the sequence's own position through one cached
forward pass (`call_with_cache(..., extend=True)`), and keeps the drafts
the model agrees with plus one token of its own: between 1 and `k + 1`
tokens for one pass over the weights, which on a CPU or a small batch costs
about what a single token does.

Drafts come from prompt lookup (`prompt_lookup`): the tokens that followed
the latest earlier occurrence of the sequence's last n-gram, in its prompt
or its output. Answers that quote their context (retrieval, summaries,
code edits) copy long spans, and these drafts are free.

Exactness:

- greedy: a draft is kept while it is the argmax, so the output is plain
  greedy's, token for token;
- sampling: the rejection rule of Leviathan et al. (2023), "Fast Inference
  from Transformers via Speculative Decoding", with the draft distribution
  `q` one-hot on the drafted token (prompt lookup proposes one token, not a
  distribution): a draft `d` is kept with probability `min(1, p(d) /
  q(d)) = p(d)`; on a rejection the token is drawn from the residual
  `max(p - q, 0)`, which is `p` without `d`, renormalised. Each kept token
  is then distributed as `p`, the row's processed distribution
  (temperature, top-k, top-p, min-p, logit bias).

Repetition, presence and frequency penalties change `p` with every token,
so a row that uses them does not draft (it takes one token per step);
neither does a row with a grammar or a custom sampler.

The caches have `k` more slots (`Gemma2Backbone.cache_capacities(...,
draft_tokens=k)`): a rejected draft is written past the last accepted
position, and in a local layer's ring of `window + k` slots that overwrites
only positions already out of the window, so nothing needs undoing; the
next step writes over it.
"""

import numpy as np
from keras import ops

from keras_gemma2 import sampling

# The methods `speculative=` accepts.
METHODS = ("prompt_lookup",)
# The most drafts a step verifies: past 8 a prompt-lookup draft is rarely
# kept whole, and each one costs a column of logits.
MAX_DRAFT_TOKENS = 16


def check_options(speculative, num_draft_tokens):
    """Validates `generate`'s speculative options; returns the number of
    draft tokens (0 without `speculative`)."""
    if speculative is None:
        return 0
    if not isinstance(speculative, str) or speculative not in METHODS:
        raise ValueError(
            f"`speculative` must be one of {METHODS} or None, not "
            f"{speculative!r}."
        )
    if (
        isinstance(num_draft_tokens, bool)
        or not isinstance(num_draft_tokens, (int, np.integer))
        or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise ValueError(
            "`num_draft_tokens` must be an integer from 1 to "
            f"{MAX_DRAFT_TOKENS}, not {num_draft_tokens!r}."
        )
    return int(num_draft_tokens)


def prompt_lookup(ids, num_draft_tokens, max_ngram=3, min_ngram=2):
    """Drafts the tokens that followed the last n-gram of `ids` before.

    Tries n-grams of `max_ngram` down to `min_ngram` tokens; the latest
    earlier occurrence of the longest one that recurs gives up to
    `num_draft_tokens` drafts (fewer when it sits near the end).

    Args:
        ids: the sequence so far (prompt and output), a list of ints.
        num_draft_tokens: int. The most drafts.

    Returns:
        A list of at most `num_draft_tokens` ids; empty if nothing recurs.

    Example:
    >>> prompt_lookup([5, 6, 7, 8, 9, 1, 6, 7], 3)
    [8, 9, 1]
    """
    ids = np.asarray(ids)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        # Windows that start before the tail and have a token after them.
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        matches = np.flatnonzero((windows == tail).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n
            return ids[start : start + num_draft_tokens].tolist()
    return []


def verify(
    model,
    token_ids,
    positions,
    cache,
    arrays,
    num_drafts,
    features=(),
    top_logprobs=0,
):
    """One compiled verification of every row's drafts.

    Args:
        model: the `Gemma2CausalLM`.
        token_ids: `[batch, k + 1]` int32: each row's last token, then its
            drafts (padded past `num_drafts`).
        positions: `[batch]` int32: the position of each row's last token.
        cache: the engine's caches, with `k` draft slots.
        arrays: the rows' sampling arrays (`sampling.stack`, with `seen`
            and `counts` for the penalties) and `uniform`, `[batch,
            2 * (k + 1)]`: one draw per column to accept its draft, then one
            per column to sample its own token.
        num_drafts: `[batch]` int32: the drafts each row really has.

    Returns:
        `(accepted, tokens, draft_logprobs, logprobs, top_values, top_ids,
        cache)`, each `[batch, k + 1, ...]`: column `j` tells whether the
        draft after it (`token_ids[:, j + 1]`) is kept, the row's own token
        there in case it is not (drawn from the residual), and the model's
        log-probabilities of both; the top ones `None` without
        `top_logprobs`.
    """
    logits, _, cache = model.call_with_cache(
        token_ids, cache, positions, extend=True
    )
    batch, columns = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
    vocabulary = ops.shape(logits)[-1]
    logits = ops.reshape(ops.cast(logits, "float32"), (-1, vocabulary))
    # Each row's settings, once per column: [batch * columns, ...].
    rows = {
        name: ops.repeat(value, columns, axis=0)
        for name, value in arrays.items()
        if name != "uniform"
    }
    processed = sampling.process_logits(
        logits, rows, rows.get("seen"), rows.get("counts"), features
    )
    # The draft each column checks: the next column's token, if drafted.
    drafts = ops.concatenate(
        [token_ids[:, 1:], ops.zeros((batch, 1), "int32")], axis=1
    )
    drafted = ops.expand_dims(
        ops.arange(columns, dtype="int32"), 0
    ) < ops.expand_dims(num_drafts, 1)
    drafts = ops.reshape(ops.where(drafted, drafts, -1), (-1,))
    # Where a column has no draft, index 0 stands in (its `accepted` is
    # False and its draft log-probability unused).
    draft_index = ops.expand_dims(ops.maximum(drafts, 0), 1)
    greedy = ops.cast(ops.argmax(processed, axis=-1), "int32")
    if "sample" in features:
        uniform = ops.reshape(arrays["uniform"], (batch, 2, columns))
        accept_draw = ops.reshape(uniform[:, 0], (-1,))
        sample_draw = ops.reshape(uniform[:, 1], (-1,))
        temperature = rows["temperature"]
        probs = ops.softmax(processed, axis=-1)
        draft_prob = ops.take_along_axis(probs, draft_index, axis=-1)[:, 0]
        is_draft = ops.expand_dims(drafts, 1) == ops.expand_dims(
            ops.arange(vocabulary, dtype="int32"), 0
        )
        accepted = ops.where(
            temperature > 0, accept_draw < draft_prob, greedy == drafts
        )
        # The residual max(p - onehot(draft), 0): p without the draft.
        tokens = sampling.select_tokens(
            ops.where(is_draft, -np.inf, processed), temperature, sample_draw
        )
        # A greedy row keeps its argmax (the residual's, if it rejected).
        tokens = ops.where(temperature > 0, tokens, greedy)
    else:
        accepted = greedy == drafts
        tokens = greedy
    accepted = ops.logical_and(accepted, drafts >= 0)
    log_softmax = ops.log_softmax(logits, axis=-1)
    draft_logprobs = ops.take_along_axis(log_softmax, draft_index, axis=-1)[
        :, 0
    ]
    logprobs = ops.take_along_axis(
        log_softmax, ops.expand_dims(tokens, 1), axis=-1
    )[:, 0]
    top_values = top_ids = None
    if top_logprobs:
        top_values, top_ids = ops.top_k(log_softmax, top_logprobs)
        top_values = ops.reshape(top_values, (batch, columns, top_logprobs))
        top_ids = ops.reshape(
            ops.cast(top_ids, "int32"), (batch, columns, top_logprobs)
        )

    def per_row(x):
        return ops.reshape(x, (batch, columns))

    return (
        per_row(accepted),
        per_row(tokens),
        per_row(draft_logprobs),
        per_row(logprobs),
        top_values,
        top_ids,
        cache,
    )
