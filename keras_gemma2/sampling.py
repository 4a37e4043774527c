"""Sampling controls, per sequence: what the engine does to the logits.

`SamplingParams` holds one sequence's settings; `stack` lays a batch's out
as arrays, one row per sequence, and `process_logits` / `select_tokens`
apply them with `keras.ops` inside the engine's compiled step.

Why our own and not KerasHub's samplers: those take one setting for the
whole batch, have no min-p, penalties or logit bias, and draw their own
random numbers, so a seed cannot follow a sequence from one batch to
another. Here each sequence draws its uniforms from its own generator on
the host (`SequenceRandom`), and the controls follow transformers' logits
processors (repetition penalty, temperature, top-k, top-p, min-p) and
OpenAI's published formula (presence and frequency penalties).
"""

import dataclasses
import math
import numbers

import numpy as np
from keras import ops

# The most alternatives per token that `top_logprobs` reports (OpenAI's).
MAX_TOP_LOGPROBS = 20


def _number(name, value, low, high, low_open=False, high_open=False):
    """`value` as a float inside the range, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number; got {value!r}.")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(
            f"`{name}` must be in {left}{low}, {high}{right}; got {value!r}."
        )
    return value


def _integer(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; got {value!r}.")
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an int {limit}; got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling controls.

    Args:
        temperature: float >= 0. Logits are divided by it; 0 is greedy.
        top_k: int >= 1 or None. Keep the k most likely tokens.
        top_p: float in (0, 1]. Keep the most likely tokens whose
            probabilities sum to at least `top_p` (nucleus sampling).
        min_p: float in [0, 1]. Drop tokens less likely than `min_p` times
            the most likely one.
        repetition_penalty: float > 0. transformers' form: the logits of
            tokens already in the prompt or output are divided by it
            (multiplied where negative).
        presence_penalty: float in [-2, 2]. OpenAI's form: subtracted once
            from the logits of tokens already generated.
        frequency_penalty: float in [-2, 2]. OpenAI's form: subtracted per
            time a token was generated.
        logit_bias: `{token_id: bias}` added to the logits.
        seed: int or None. The sequence's random stream: the same seed
            gives the same tokens alone or in any batch.
        top_logprobs: int in [0, 20]. How many alternatives to report per
            token.

    Example:
    ```python
    from keras_gemma2.sampling import SamplingParams
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    assert not params.greedy
    ```
    """

    temperature: float = 0.0
    top_k: int = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = None
    seed: int = None
    top_logprobs: int = 0

    def __post_init__(self):
        fix = object.__setattr__
        fix(
            self,
            "temperature",
            _number(
                "temperature", self.temperature, 0.0, math.inf, False, True
            ),
        )
        if self.top_k is not None:
            fix(self, "top_k", _integer("top_k", self.top_k, 1))
        fix(self, "top_p", _number("top_p", self.top_p, 0.0, 1.0, True))
        fix(self, "min_p", _number("min_p", self.min_p, 0.0, 1.0))
        fix(
            self,
            "repetition_penalty",
            _number(
                "repetition_penalty",
                self.repetition_penalty,
                0.0,
                math.inf,
                True,
                True,
            ),
        )
        for name in ("presence_penalty", "frequency_penalty"):
            fix(self, name, _number(name, getattr(self, name), -2.0, 2.0))
        if self.seed is not None:
            fix(self, "seed", _integer("seed", self.seed, 0))
        fix(
            self,
            "top_logprobs",
            _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS),
        )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(
                    "`logit_bias` must be a dict of token id to bias; got "
                    f"{type(self.logit_bias).__name__}."
                )
            bias = {}
            for token, value in self.logit_bias.items():
                token = (
                    int(token) if str(token).lstrip("-").isdigit() else token
                )
                _integer("logit_bias token id", token, 0)
                # OpenAI's range: -100 bans a token, 100 forces it.
                bias[token] = _number(
                    f"logit_bias[{token}]", value, -100.0, 100.0
                )
            fix(self, "logit_bias", bias or None)

    def __hash__(self):
        return id(self)

    @property
    def greedy(self):
        return self.temperature == 0.0

    def check_vocabulary(self, vocabulary_size):
        """Refuses `logit_bias` ids outside the vocabulary."""
        for token in self.logit_bias or ():
            if token >= vocabulary_size:
                raise ValueError(
                    f"`logit_bias` names token {token}, outside this model's "
                    f"vocabulary of {vocabulary_size} ids."
                )

    @classmethod
    def from_sampler(cls, sampler):
        """The params of a KerasHub greedy, top-k, top-p or random sampler;
        `None` for any other (beam, contrastive, custom)."""
        # keras_hub's sampler classes: its samplers module, always present.
        from keras_hub import samplers

        name = type(sampler)
        if name is samplers.GreedySampler:
            return cls()
        seed = getattr(sampler, "seed", None)
        common = {
            "temperature": float(getattr(sampler, "temperature", 1.0)),
            "seed": seed if isinstance(seed, int) else None,
        }
        if name is samplers.TopKSampler:
            return cls(top_k=int(sampler.k), **common)
        if name is samplers.TopPSampler:
            k = getattr(sampler, "k", None)
            return cls(
                top_p=float(sampler.p), top_k=int(k) if k else None, **common
            )
        if name is samplers.RandomSampler:
            return cls(**common)
        return None


class SequenceRandom:
    """One sequence's uniforms in [0, 1): its own stream, whatever batch it
    runs in.

    `seed=None` takes a seed from numpy's global generator, so that
    `keras.utils.set_random_seed` (which seeds it) makes unseeded sampling
    repeat, as it does for KerasHub's samplers.

    Example:
    >>> SequenceRandom(3).next() == SequenceRandom(3).next()
    True
    """

    def __init__(self, seed=None):
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        self._generator = np.random.default_rng(seed)

    def next(self):
        return float(self._generator.random())


def features(params_list):
    """The stages any of `params_list` needs: a static argument, so that a
    compiled step skips the sorts no row uses."""
    needed = set()
    for params in params_list:
        if params.logit_bias:
            needed.add("bias")
        if params.repetition_penalty != 1.0:
            needed.add("repetition")
        if params.presence_penalty or params.frequency_penalty:
            needed.add("penalties")
        if not params.greedy:
            needed.add("sample")
            if params.top_k:
                needed.add("top_k")
            if params.top_p < 1.0:
                needed.add("top_p")
            if params.min_p > 0.0:
                needed.add("min_p")
    order = ("bias", "repetition", "penalties", "sample", "top_k", "top_p")
    return tuple(name for name in (*order, "min_p") if name in needed)


def stack(params_list, vocabulary_size):
    """A batch's settings as numpy arrays, one row per sequence."""
    arrays = {
        "temperature": [p.temperature for p in params_list],
        "top_k": [p.top_k or 0 for p in params_list],
        "top_p": [p.top_p for p in params_list],
        "min_p": [p.min_p for p in params_list],
        "repetition_penalty": [p.repetition_penalty for p in params_list],
        "presence_penalty": [p.presence_penalty for p in params_list],
        "frequency_penalty": [p.frequency_penalty for p in params_list],
    }
    arrays = {
        k: np.asarray(v, "int32" if k == "top_k" else "float32")
        for k, v in arrays.items()
    }
    if any(p.logit_bias for p in params_list):
        bias = np.zeros((len(params_list), vocabulary_size), "float32")
        for row, params in enumerate(params_list):
            for token, value in (params.logit_bias or {}).items():
                bias[row, token] = value
        arrays["logit_bias"] = bias
    return arrays


def _column(values):
    return ops.expand_dims(values, 1)


def process_logits(logits, arrays, seen=None, counts=None, features=()):
    """Applies each row's controls to float32 logits `[batch, vocab]`.

    In transformers' order: logit bias, repetition penalty, presence and
    frequency penalties, then (for sampled rows) temperature, top-k, top-p
    and min-p. Removed tokens get `-inf`. A greedy row keeps its penalised
    logits unscaled: its argmax is the pick.

    Example:
    ```python
    import numpy as np
    from keras_gemma2 import sampling
    params = [sampling.SamplingParams(temperature=0.5, top_k=2)]
    arrays = sampling.stack(params, 4)
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], "float32"))
    out = sampling.process_logits(
        logits, arrays, features=sampling.features(params)
    )
    ```
    """
    logits = ops.cast(logits, "float32")
    if "bias" in features:
        logits = logits + arrays["logit_bias"]
    if "repetition" in features:
        penalty = _column(arrays["repetition_penalty"])
        penalised = ops.where(logits < 0, logits * penalty, logits / penalty)
        logits = ops.where(seen > 0, penalised, logits)
    if "penalties" in features:
        logits = (
            logits
            - _column(arrays["frequency_penalty"]) * counts
            - _column(arrays["presence_penalty"])
            * ops.cast(counts > 0, "float32")
        )
    if "sample" not in features:
        return logits
    temperature = _column(arrays["temperature"])
    sampled = temperature > 0
    logits = ops.where(
        sampled, logits / ops.where(sampled, temperature, 1.0), logits
    )
    if "top_k" in features or "top_p" in features:
        ordered = ops.flip(ops.sort(logits, axis=-1), axis=-1)
    if "top_k" in features:
        top_k = _column(arrays["top_k"])
        vocabulary = ops.shape(logits)[-1]
        index = ops.clip(top_k - 1, 0, vocabulary - 1)
        kth = ops.take_along_axis(ordered, index, axis=-1)
        keep = ops.logical_or(top_k <= 0, logits >= kth)
        logits = ops.where(
            ops.logical_or(ops.logical_not(sampled), keep), logits, -np.inf
        )
        ordered = ops.where(
            ops.logical_or(top_k <= 0, ordered >= kth), ordered, -np.inf
        )
    if "top_p" in features:
        # transformers' TopPLogitsWarper: drop the tokens whose cumulative
        # probability, summed from the least likely, is at most 1 - top_p;
        # the most likely token always stays.
        top_p = _column(arrays["top_p"])
        ascending = ops.flip(ordered, axis=-1)
        cumulative = ops.cumsum(ops.softmax(ascending, axis=-1), axis=-1)
        removed = cumulative <= 1 - top_p
        vocabulary = ops.shape(logits)[-1]
        last = ops.arange(vocabulary) == vocabulary - 1
        removed = ops.logical_and(removed, ops.logical_not(last))
        # The smallest kept logit: everything below it goes.
        threshold = ops.min(
            ops.where(removed, np.inf, ascending), axis=-1, keepdims=True
        )
        keep = ops.logical_or(top_p >= 1.0, logits >= threshold)
        logits = ops.where(
            ops.logical_or(ops.logical_not(sampled), keep), logits, -np.inf
        )
    if "min_p" in features:
        probs = ops.softmax(logits, axis=-1)
        top = ops.max(probs, axis=-1, keepdims=True)
        keep = probs >= _column(arrays["min_p"]) * top
        logits = ops.where(
            ops.logical_or(ops.logical_not(sampled), keep), logits, -np.inf
        )
    return logits


def select_tokens(processed, temperature, uniform):
    """Each row's token: the argmax for greedy rows, else the first index
    whose cumulative probability exceeds the row's `uniform` draw."""
    processed = ops.cast(processed, "float32")
    greedy = ops.argmax(processed, axis=-1)
    probs = ops.softmax(processed, axis=-1)
    cumulative = ops.cumsum(probs, axis=-1)
    total = cumulative[:, -1:]
    below = cumulative <= _column(uniform) * total
    # Masked tokens add nothing to the sum, so the first index past the
    # draw is a kept one; rounding at the top end falls back to the argmax.
    sampled = ops.sum(ops.cast(below, "int32"), axis=-1)
    vocabulary = ops.shape(processed)[-1]
    sampled = ops.where(sampled >= vocabulary, greedy, sampled)
    picked_prob = ops.take_along_axis(
        probs, ops.expand_dims(ops.cast(sampled, "int32"), 1), axis=-1
    )[:, 0]
    sampled = ops.where(picked_prob > 0, sampled, greedy)
    return ops.cast(ops.where(temperature > 0, sampled, greedy), "int32")


def log_probs(logits, tokens, top_logprobs=0):
    """The model's log-probabilities (before any control) of `tokens`, and
    of the `top_logprobs` most likely ids: `(logprobs, (values, ids))`."""
    log_softmax = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    picked = ops.take_along_axis(
        log_softmax, ops.expand_dims(ops.cast(tokens, "int32"), 1), axis=-1
    )[:, 0]
    if not top_logprobs:
        return picked, None
    values, ids = ops.top_k(log_softmax, top_logprobs)
    return picked, (values, ops.cast(ids, "int32"))
