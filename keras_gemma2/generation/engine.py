"""The generation engine: a batch of sequences, each with its own state.

`Engine` holds the caches of `max_batch` rows. Each row holds one
`Sequence`: its tokens and position, its sampling settings and random
stream, its limits, stop tokens, stop strings and grammar. `step()` advances
every row by one token in one compiled call, whatever position each row is
at; sequences join (`add`, one prefill for all that join together) and
leave (`remove`) between steps. `generate`, `ChatSession`, streaming and the
server all run on it.

Why our own and not KerasHub's `Sampler` loop: that loop is one closed call
with one position for the whole batch and one sampler for every row, so no
request can join, stop on a string, follow a grammar or keep its cache for
the next turn.

A row's cache is read only at positions its own sequence wrote (the masks
follow positions), so a new sequence needs no cleared row, and a finished
one keeps its cache until it leaves: `add(..., reuse=finished)` continues
it, prefilling only the tokens its cache does not hold.
"""

import dataclasses

import numpy as np
from keras import ops

from keras_gemma2 import sampling
from keras_gemma2.generation import compiled
from keras_gemma2.generation import speculative
from keras_gemma2.generation.text import TextStream
from keras_gemma2.generation.text import detokenize


@dataclasses.dataclass
class GenerationResult:
    """What one sequence generated.

    Attributes:
        text: the generated text, without stop tokens or stop strings.
        token_ids: the generated token ids, a stop token included.
        finish_reason: `"stop"` (a stop token, stop string or the end of
            the grammar) or `"length"` (`max_new_tokens` or the cache ran
            out).
        logprobs: the model's log-probability of each of `token_ids`,
            before any sampling control (as OpenAI's and vLLM's).
        top_logprobs: with `top_logprobs=k`, one dict per generated token
            of the `k` most likely ids and their log-probabilities.
        prompt_tokens: tokens in the prompt, `<bos>` included.
        draft_tokens: with speculative decoding, the tokens drafted for
            this sequence.
        accepted_tokens: how many of the drafts were kept.
    """

    text: str
    token_ids: list
    finish_reason: str
    logprobs: list
    top_logprobs: list = None
    prompt_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class Sequence:
    """One generation's state inside an `Engine`.

    Args:
        prompt_ids: the prompt's token ids, `<bos>` first.
        max_new_tokens: int. The most tokens to generate.
        params: a `keras_gemma2.sampling.SamplingParams`; defaults to
            greedy.
        stop_token_ids: ids that end the sequence (kept in its ids).
        stop: strings that end the sequence; the text stops before them.
        constraint: an optional `keras_gemma2.structured.Constraint` the
            text must follow.
        tokenizer: the tokenizer, needed for `stop` and for text.
        stream: bool. Settle text token by token (see `Engine.step`);
            implied by `stop`.
        sampler: optional KerasHub `Sampler` that picks tokens instead of
            `params` (a custom sampler of `compile(sampler=...)`).
    """

    def __init__(
        self,
        prompt_ids,
        max_new_tokens,
        params=None,
        stop_token_ids=(),
        stop=(),
        constraint=None,
        tokenizer=None,
        stream=False,
        sampler=None,
    ):
        self.prompt_ids = [int(i) for i in prompt_ids]
        if not self.prompt_ids:
            raise ValueError("A prompt needs at least one token (`<bos>`).")
        self.ids = list(self.prompt_ids)
        self.max_new_tokens = int(max_new_tokens)
        self.params = params or sampling.SamplingParams()
        self.random = sampling.SequenceRandom(self.params.seed)
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids)
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.stop = tuple(stop)
        if self.stop and tokenizer is None:
            raise ValueError("Stop strings need the `tokenizer`.")
        self.stream = None
        if tokenizer is not None and (stream or self.stop):
            self.stream = TextStream(tokenizer, self.stop)
        self.logprobs = []
        self.top_logprobs = []
        self.finish_reason = None
        # Leading positions of `ids` that this sequence's cache holds.
        self.cached = 0
        self.row = None
        # Token counts for the penalties: output only, and prompt too.
        self.counts = self.seen = None
        # Speculative decoding: tokens drafted and kept; drafting waits
        # until `ids` reach `_draft_after` after a step that kept none.
        self.drafted = self.accepted = 0
        self._draft_pause = self._draft_after = 0

    @property
    def finished(self):
        return self.finish_reason is not None

    @property
    def output_ids(self):
        return self.ids[len(self.prompt_ids) :]

    def result(self):
        """The `GenerationResult` so far."""
        return GenerationResult(
            text=self.text(),
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            logprobs=list(self.logprobs),
            top_logprobs=list(self.top_logprobs)
            if self.params.top_logprobs
            else None,
            prompt_tokens=len(self.prompt_ids),
            draft_tokens=self.drafted,
            accepted_tokens=self.accepted,
        )

    def text(self):
        """The generated text: up to a stop string, without stop tokens."""
        if self.stream is not None:
            return self.stream.text
        ids = [i for i in self.output_ids if i not in self.stop_token_ids]
        return detokenize(self.tokenizer, ids) if self.tokenizer else ""

    def room(self, limit):
        """Tokens this sequence may still generate: the rest of its
        `max_new_tokens`, and of `limit` positions in all."""
        return min(
            self.max_new_tokens - len(self.output_ids), limit - len(self.ids)
        )

    def _accept(self, token, logprob, top, limit):
        """Appends a sampled token; returns the text it settles."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = 1.0
        piece = ""
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
        else:
            if self.stream is not None:
                piece = self.stream.push([token])
                if self.stream.stopped:
                    self.finish_reason = "stop"
            if self.constraint is not None and not self.finished:
                self.constraint.advance(token)
                if self.constraint.is_finished():
                    self.finish_reason = "stop"
        if not self.finished and self.room(limit) <= 0:
            self.finish_reason = "length"
        if self.finished and self.stream is not None:
            # Text held back for a stop string that never came.
            piece += self.stream.finish()
        return piece


class Engine:
    """Advances a batch of `Sequence`s one token per step.

    Args:
        lm: a `Gemma2CausalLM`.
        max_batch: int. Rows in the batch.
        max_length: int. Positions each row holds (prompt and output).
        num_draft_tokens: int. With more than 0, `run` decodes
            speculatively (`speculative_step`): each step drafts up to this
            many tokens per sequence by prompt lookup and verifies them in
            one pass (`keras_gemma2.generation.speculative`).

    Example:
    ```python
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    tokenizer = lm.preprocessor.tokenizer
    engine = keras_gemma2.generation.Engine(lm, max_batch=2, max_length=64)
    prompt = [2] + [int(i) for i in tokenizer.tokenize("The tokenizer")]
    first = keras_gemma2.generation.Sequence(
        prompt, max_new_tokens=8, tokenizer=tokenizer
    )
    engine.add([first])
    engine.step()  # first's first token
    second = keras_gemma2.generation.Sequence(
        prompt, max_new_tokens=4, tokenizer=tokenizer,
        params=keras_gemma2.sampling.SamplingParams(temperature=1.0, seed=7),
    )
    engine.add([second])  # joins the running batch
    while engine.running:
        engine.step()
    first.result().text, second.result().finish_reason
    ```
    """

    def __init__(self, lm, max_batch=8, max_length=1024, num_draft_tokens=0):
        self.lm = lm
        self.max_batch = int(max_batch)
        self.max_length = int(max_length)
        self.num_draft_tokens = int(num_draft_tokens)
        self.vocabulary_size = lm.backbone.vocabulary_size
        self.rows = [None] * self.max_batch
        self.cache = None
        # Tokens run through the model outside of decode steps.
        self.prefilled_tokens = 0

    @property
    def running(self):
        """The sequences still generating."""
        return [s for s in self.rows if s is not None and not s.finished]

    def _functions(self):
        return self.lm._engine_functions()

    def _init_cache(self):
        if self.cache is None:
            self.cache = self.lm.backbone.init_cache(
                self.max_batch,
                self.max_length,
                draft_tokens=self.num_draft_tokens,
            )

    def add(self, sequences, reuse=None):
        """Puts `sequences` in free rows and prefills their prompts.

        All but each prompt's last token are prefilled together; the last
        is fed by the next `step`. With `reuse`, a finished sequence in
        this engine whose tokens start the (single) new sequence's prompt,
        the new one takes its row and cache and only the tokens after the
        cached ones are run.
        """
        sequences = list(sequences)
        for sequence in sequences:
            self._check(sequence)
        self._init_cache()
        if reuse is not None:
            if len(sequences) != 1:
                raise ValueError("`reuse` continues one sequence at a time.")
            return self._continue(sequences[0], reuse)
        free = [row for row, s in enumerate(self.rows) if s is None]
        if len(free) < len(sequences):
            raise ValueError(
                f"The engine has {len(free)} free rows of {self.max_batch}; "
                f"cannot add {len(sequences)} sequences. Remove finished "
                "sequences first, or make the engine with a larger "
                "`max_batch`."
            )
        for sequence, row in zip(sequences, free):
            sequence.row = row
            self.rows[row] = sequence
        self._prefill(sequences)

    def _check(self, sequence):
        compiled.check_token_ids(
            np.asarray(sequence.prompt_ids), self.vocabulary_size, "prompt"
        )
        if len(sequence.prompt_ids) >= self.max_length:
            raise ValueError(
                f"A prompt has {len(sequence.prompt_ids)} tokens but the "
                f"engine holds {self.max_length} positions per row, which "
                "leaves no room to generate. Make the engine with a larger "
                "`max_length`."
            )
        sequence.params.check_vocabulary(self.vocabulary_size)
        if _needs_counts(sequence.params):
            sequence.counts = np.zeros(self.vocabulary_size, "float32")
            seen = np.zeros(self.vocabulary_size, "float32")
            seen[sequence.prompt_ids] = 1.0
            sequence.seen = seen

    def _prefill(self, sequences):
        """One prefill of every prompt but its last token, into the rows."""
        lengths = [len(s.prompt_ids) - 1 for s in sequences]
        longest = max(lengths)
        if longest == 0:
            return
        size = min(compiled.bucket_length(longest), self.max_length)
        token_ids = np.zeros((len(sequences), size), "int32")
        for row, sequence in enumerate(sequences):
            token_ids[row, : lengths[row]] = sequence.prompt_ids[:-1]
        cache = self._functions()["prefill"](
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(np.maximum(lengths, 1).astype("int32")),
            max_length=self.max_length,
            draft_tokens=self.num_draft_tokens,
        )
        rows = [s.row for s in sequences]
        if rows == list(range(self.max_batch)):
            self.cache = cache
        else:
            self.cache = _write_rows(self.cache, rows, cache)
        for sequence, length in zip(sequences, lengths):
            sequence.cached = length
        self.prefilled_tokens += sum(lengths)

    def _continue(self, sequence, previous):
        """`sequence` takes `previous`'s row; runs only its uncached tokens."""
        cached = previous.cached
        if (
            previous.row is None
            or self.rows[previous.row] is not previous
            or not previous.finished
        ):
            raise ValueError(
                "`reuse` must be a finished sequence still in this engine."
            )
        if sequence.prompt_ids[:cached] != previous.ids[:cached] or (
            len(sequence.prompt_ids) <= cached
        ):
            raise ValueError(
                "The new prompt does not continue the reused sequence: its "
                "first tokens must be that sequence's prompt and output."
            )
        row = previous.row
        previous.row = None
        sequence.row = row
        self.rows[row] = sequence
        new = sequence.prompt_ids[cached:-1]
        if new:
            rows = [row]
            part = _take_rows(self.cache, rows)
            part = self._functions()["extend"](
                ops.convert_to_tensor(np.asarray([new], "int32")),
                part,
                ops.convert_to_tensor(cached, "int32"),
            )
            self.cache = (
                part
                if self.max_batch == 1
                else _write_rows(self.cache, rows, part)
            )
            self.prefilled_tokens += len(new)
        sequence.cached = len(sequence.prompt_ids) - 1

    def remove(self, sequence):
        """Frees `sequence`'s row (its cache is dropped)."""
        if sequence.row is not None and self.rows[sequence.row] is sequence:
            self.rows[sequence.row] = None
        sequence.row = None

    def step(self, num_steps=1):
        """Advances every running sequence by up to `num_steps` tokens.

        One step feeds each row's last token and picks its next. With
        `num_steps > 1`, rows that need no host work between tokens (no
        grammar, stop strings, streamed text or custom sampler) run up to
        `num_steps` steps (at most 64) in one compiled loop, which ends
        early once every row has stopped; otherwise one step is run. The
        loop is the faster path: a compiled call costs about a quarter of a
        small model's step on XLA:CPU beyond the step itself (30.8 ms a
        step in a loop of 16 against 39 ms called one by one, JAX, the
        benchmark's small config), and the host's work is paid once.

        Args:
            num_steps: int. The most tokens to add to each sequence.

        Returns:
            A list of `(sequence, text)`, one per generated token in order:
            the text that the token settled (maybe `""`).
        """
        running = self.running
        if not running:
            return []
        if int(num_steps) < 1:
            raise ValueError(
                f"`num_steps` must be at least 1, not {num_steps}."
            )
        self._init_cache()
        max_steps = 1
        if num_steps > 1 and not any(_needs_host(s) for s in running):
            max_steps = _steps_bucket(num_steps)
            num_steps = min(
                num_steps,
                max_steps,
                max(s.room(self.max_length) for s in running),
            )
        else:
            num_steps = 1
        token_ids = np.zeros((self.max_batch, 1), "int32")
        positions = np.zeros(self.max_batch, "int32")
        remaining = np.zeros(self.max_batch, "int32")
        for row, sequence in enumerate(self.rows):
            if sequence is not None:
                # A finished row writes its own last token again: the same
                # key and value at the same slot, so its cache stays whole.
                token_ids[row, 0] = sequence.ids[-1]
                positions[row] = len(sequence.ids) - 1
                if not sequence.finished:
                    remaining[row] = sequence.room(self.max_length)
        features, arrays = self._sampling_arrays()
        constrained = [s for s in running if s.constraint is not None]
        if constrained:
            allowed = np.ones((self.max_batch, self.vocabulary_size), bool)
            for sequence in constrained:
                allowed[sequence.row] = _pad_mask(
                    sequence.constraint.allowed(), self.vocabulary_size
                )
            arrays["allowed"] = allowed
        # Each running row draws one uniform per step it may take, in order:
        # a draw left unused belongs to a row that has stopped.
        uniform = np.zeros((max_steps, self.max_batch), "float32")
        for row, sequence in enumerate(self._live_rows()):
            if sequence is not None:
                for i in range(num_steps):
                    uniform[i, row] = sequence.random.next()
        arrays["uniform"] = uniform
        top_logprobs = max(s.params.top_logprobs for s in running)
        custom = _custom_sampler(running)
        outputs = self._functions()["step"](
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(positions),
            self.cache,
            {k: ops.convert_to_tensor(v) for k, v in arrays.items()},
            ops.convert_to_tensor(remaining),
            ops.convert_to_tensor(self._stop_ids(running)),
            ops.convert_to_tensor(num_steps, "int32"),
            max_steps=max_steps,
            features=features,
            top_logprobs=top_logprobs,
            custom_sampler=custom is not None,
        )
        (tokens, logprobs, top_values, top_ids), steps, self.cache = outputs
        tokens = ops.convert_to_numpy(tokens)
        logprobs = ops.convert_to_numpy(logprobs)
        if top_logprobs:
            top_values = ops.convert_to_numpy(top_values)
            top_ids = ops.convert_to_numpy(top_ids)
        events = []
        for i in range(int(ops.convert_to_numpy(steps))):
            for row, sequence in enumerate(self.rows):
                if sequence is None:
                    continue
                sequence.cached = len(sequence.ids)
                if sequence.finished:
                    continue
                top = _top_logprobs(sequence, top_ids, top_values, i, row)
                piece = sequence._accept(
                    int(tokens[i, row]),
                    float(logprobs[i, row]),
                    top,
                    self.max_length,
                )
                events.append((sequence, piece))
        return events

    def _sampling_arrays(self):
        """`(features, arrays)`: the rows' sampling settings for a step
        (`sampling.features`, `sampling.stack`), with the token counts of
        the penalties."""
        params = [
            s.params if s is not None and not s.finished else _IDLE
            for s in self.rows
        ]
        features = sampling.features(params)
        arrays = sampling.stack(params, self.vocabulary_size)
        if "repetition" in features or "penalties" in features:
            zeros = np.zeros(self.vocabulary_size, "float32")
            arrays["seen"] = np.stack(
                [
                    zeros if s is None or s.seen is None else s.seen
                    for s in self._live_rows()
                ]
            )
            arrays["counts"] = np.stack(
                [
                    zeros if s is None or s.counts is None else s.counts
                    for s in self._live_rows()
                ]
            )
        return features, arrays

    def speculative_step(self):
        """Drafts by prompt lookup and verifies every row's drafts at once.

        Each running sequence that may draft (no penalties, grammar or
        custom sampler; see `keras_gemma2.generation.speculative`) drafts
        up to `num_draft_tokens` tokens; one forward pass over each row's
        last token and drafts, at the row's own position, keeps the drafts
        the model agrees with and adds one token of the model's own. Rows
        without drafts take one token, as in `step`. A row whose drafts
        were all rejected pauses drafting for 1, 2, 4, ... up to 16 tokens
        (reset by a kept draft), so text with nothing to copy costs little.

        Returns:
            The `(sequence, text)` events as `step` does, or `None` when no
            row drafted (nothing was run: take a plain `step`).
        """
        running = self.running
        k = self.num_draft_tokens
        if (
            not running
            or k < 1
            or any(s.constraint is not None or s.sampler for s in running)
        ):
            return None
        drafts = {}
        for sequence in running:
            if _needs_counts(sequence.params):
                continue
            if len(sequence.ids) < sequence._draft_after:
                continue
            budget = min(k, sequence.room(self.max_length) - 1)
            found = speculative.prompt_lookup(sequence.ids, budget)
            if found:
                drafts[sequence.row] = found
        if not drafts:
            return None
        self._init_cache()
        columns = k + 1
        token_ids = np.zeros((self.max_batch, columns), "int32")
        positions = np.zeros(self.max_batch, "int32")
        num_drafts = np.zeros(self.max_batch, "int32")
        uniform = np.zeros((self.max_batch, 2, columns), "float32")
        for row, sequence in enumerate(self.rows):
            if sequence is None:
                continue
            token_ids[row, 0] = sequence.ids[-1]
            positions[row] = len(sequence.ids) - 1
            found = drafts.get(row, [])
            token_ids[row, 1 : 1 + len(found)] = found
            num_drafts[row] = len(found)
            if sequence.finished:
                continue
            if found:
                draws = [sequence.random.next() for _ in range(2 * columns)]
                uniform[row] = np.reshape(draws, (2, columns))
            else:
                # One draw, as a plain step takes.
                uniform[row, 1, 0] = sequence.random.next()
        features, arrays = self._sampling_arrays()
        arrays["uniform"] = uniform.reshape(self.max_batch, -1)
        top_logprobs = max(s.params.top_logprobs for s in running)
        *outputs, self.cache = self._functions()["verify"](
            ops.convert_to_tensor(token_ids),
            ops.convert_to_tensor(positions),
            self.cache,
            {name: ops.convert_to_tensor(v) for name, v in arrays.items()},
            ops.convert_to_tensor(num_drafts),
            features=features,
            top_logprobs=top_logprobs,
        )
        accepted, tokens, draft_logprobs, logprobs = (
            ops.convert_to_numpy(x) for x in outputs[:4]
        )
        top_values, top_ids = outputs[4:]
        if top_logprobs:
            top_values, top_ids = (ops.convert_to_numpy(x) for x in outputs[4:])
        events = []
        for row, sequence in enumerate(self.rows):
            if sequence is None:
                continue
            before = len(sequence.ids)
            if sequence.finished:
                sequence.cached = before
                continue
            drafted = int(num_drafts[row])
            kept = 0
            while kept < drafted and accepted[row, kept]:
                kept += 1
            picks = [
                (int(token_ids[row, j + 1]), float(draft_logprobs[row, j]))
                for j in range(kept)
            ] + [(int(tokens[row, kept]), float(logprobs[row, kept]))]
            for column, (token, logprob) in enumerate(picks):
                top = _top_logprobs(sequence, top_ids, top_values, row, column)
                piece = sequence._accept(token, logprob, top, self.max_length)
                events.append((sequence, piece))
                if sequence.finished:
                    break
            kept = min(kept, len(sequence.ids) - before)
            # The cache holds the fed tokens up to the last kept draft.
            sequence.cached = before + kept
            if drafted:
                sequence.drafted += drafted
                sequence.accepted += kept
                if kept:
                    sequence._draft_pause = 0
                else:
                    sequence._draft_pause = min(
                        2 * sequence._draft_pause or 1, _MAX_DRAFT_PAUSE
                    )
                sequence._draft_after = (
                    len(sequence.ids) + sequence._draft_pause
                )
        return events

    def _stop_ids(self, running):
        """`[max_batch, n]` stop ids of each row, padded with -1 (never an
        id) to a multiple of 4, so that a few more ids do not recompile."""
        width = max([len(s.stop_token_ids) for s in running] + [1])
        stop_ids = np.full((self.max_batch, -(-width // 4) * 4), -1, "int32")
        for sequence in running:
            ids = sorted(sequence.stop_token_ids)
            stop_ids[sequence.row, : len(ids)] = ids
        return stop_ids

    def _live_rows(self):
        return [
            s if s is not None and not s.finished else None for s in self.rows
        ]

    def advance(self, num_steps=1):
        """A `speculative_step` if the engine drafts and a row has drafts,
        else `step(num_steps)` (at most 4 steps while drafting, so that the
        next lookup comes soon). Returns the events."""
        if self.num_draft_tokens:
            events = self.speculative_step()
            if events is not None:
                return events
            num_steps = min(num_steps, _LOOKUP_STEPS)
        return self.step(num_steps=num_steps)

    def run(self, sequences):
        """Adds `sequences`, steps until they finish, removes them.

        Returns:
            Their `GenerationResult`s.
        """
        self.add(sequences)
        while any(not s.finished for s in sequences):
            self.advance(BLOCK_STEPS)
        for sequence in sequences:
            self.remove(sequence)
        return [s.result() for s in sequences]


# The settings of an empty or finished row: greedy, no controls.
_IDLE = sampling.SamplingParams()
# Steps per compiled loop in `Engine.run` (so `generate`): past 16 a step
# gains little (30.8 ms at 16 on the benchmark's small config, JAX, from 39
# one by one), and a block should stay short enough for joins between
# blocks.
BLOCK_STEPS = 32
_MAX_STEPS = 64
# Speculative decoding: plain steps between lookups that found nothing, and
# the longest pause of a row whose drafts keep failing.
_LOOKUP_STEPS = 4
_MAX_DRAFT_PAUSE = 16


def _steps_bucket(num_steps):
    """The compiled loop length for `num_steps`: a power of two, at most
    64, so that `step(num_steps=k)` compiles once per bucket."""
    size = 2
    while size < min(int(num_steps), _MAX_STEPS):
        size *= 2
    return size


def _needs_host(sequence):
    """Whether `sequence` needs the host between its tokens."""
    return (
        sequence.constraint is not None
        or sequence.stream is not None
        or sequence.sampler is not None
    )


def _top_logprobs(sequence, ids, values, *index):
    """`{id: logprob}` of `sequence`'s `top_logprobs` best alternatives at
    `ids[index]`, `values[index]` (the batch's widest `k`); `None` if it
    asked for none."""
    k = sequence.params.top_logprobs
    if not k:
        return None
    return {int(t): float(v) for t, v in zip(ids[index][:k], values[index][:k])}


def _needs_counts(params):
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _custom_sampler(running):
    samplers = {id(s.sampler): s.sampler for s in running if s.sampler}
    return next(iter(samplers.values()), None)


def _pad_mask(mask, vocabulary_size):
    mask = np.asarray(mask, bool)
    if mask.shape[0] >= vocabulary_size:
        return mask[:vocabulary_size]
    return np.pad(mask, (0, vocabulary_size - mask.shape[0]))


def _take_rows(cache, rows):
    rows = ops.convert_to_tensor(np.asarray(rows, "int32"))
    return tuple(
        tuple(ops.take(tensor, rows, axis=0) for tensor in layer)
        for layer in cache
    )


def _write_rows(cache, rows, part):
    """`cache` with `part`'s rows written at `rows` (in place on torch)."""
    indices = np.asarray(rows, "int32")
    written = []
    for layer, new_layer in zip(cache, part):
        tensors = []
        for tensor, new in zip(layer, new_layer):
            if hasattr(tensor, "index_copy_"):
                # torch: in place, as the decode steps write.
                import torch

                with torch.no_grad():
                    index = torch.as_tensor(indices, device=tensor.device)
                    tensor.index_copy_(0, index.long(), new.to(tensor.dtype))
                tensors.append(tensor)
            else:
                tensors.append(
                    ops.scatter_update(tensor, ops.expand_dims(indices, 1), new)
                )
        written.append(tuple(tensors))
    return tuple(written)


def decode_and_sample(
    model,
    token_ids,
    positions,
    cache,
    arrays,
    features=(),
    top_logprobs=0,
    custom_sampler=False,
):
    """One compiled engine step: every row's next token.

    Feeds each row's last token at its own position, then picks the next
    token with the row's sampling controls (`sampling.process_logits`, with
    the grammar's `allowed` mask first), and reports the model's own
    log-probabilities of it and of its `top_logprobs` best alternatives.

    Returns:
        `(tokens, logprobs, top_values, top_ids, cache)`.
    """
    logits, _, cache = compiled.decode_step(model)(token_ids, cache, positions)
    logits = ops.cast(ops.squeeze(logits, 1), "float32")
    processed = logits
    if "allowed" in arrays:
        processed = ops.where(arrays["allowed"], processed, -np.inf)
    if custom_sampler:
        sampler = model.sampler
        tokens = sampler.get_next_token(
            sampler.compute_probabilities(processed)
        )
    else:
        processed = sampling.process_logits(
            processed,
            arrays,
            arrays.get("seen"),
            arrays.get("counts"),
            features,
        )
        if "sample" in features:
            tokens = sampling.select_tokens(
                processed, arrays["temperature"], arrays["uniform"]
            )
        else:
            # Every row greedy: no softmax or cumulative sum to compute.
            tokens = ops.argmax(processed, axis=-1)
    tokens = ops.cast(tokens, "int32")
    logprobs, top = sampling.log_probs(logits, tokens, top_logprobs)
    top_values, top_ids = top if top_logprobs else (None, None)
    return tokens, logprobs, top_values, top_ids, cache


def decode_steps(
    model,
    token_ids,
    positions,
    cache,
    arrays,
    remaining,
    stop_ids,
    num_steps,
    max_steps=1,
    features=(),
    top_logprobs=0,
    custom_sampler=False,
):
    """Up to `num_steps` engine steps in one compiled loop.

    Each step is `decode_and_sample` with the step's row of
    `arrays["uniform"]` (`[max_steps, batch]`). A row runs while it has
    `remaining` tokens and has not picked one of its `stop_ids`; then it
    feeds its last token again at its last position, as a finished row
    does between single steps. The repetition and presence/frequency
    counts follow the picked tokens inside the loop. The loop ends after
    `num_steps` steps or once every row has stopped.

    Returns:
        `((tokens, logprobs, top_values, top_ids), steps, cache)`: the
        first four `[max_steps, batch, ...]` (the first `steps` filled),
        the top ones `None` without `top_logprobs`.
    """

    def one_step(token_ids, positions, cache, step_arrays):
        return decode_and_sample(
            model,
            token_ids,
            positions,
            cache,
            step_arrays,
            features=features,
            top_logprobs=top_logprobs,
            custom_sampler=custom_sampler,
        )

    uniform = arrays["uniform"]
    if max_steps == 1:
        *picked, cache = one_step(
            token_ids, positions, cache, dict(arrays, uniform=uniform[0])
        )
        picked = [None if x is None else ops.expand_dims(x, 0) for x in picked]
        return tuple(picked), ops.convert_to_tensor(1, "int32"), cache

    batch = ops.shape(token_ids)[0]
    vocabulary = model.backbone.vocabulary_size
    state = {
        "i": ops.convert_to_tensor(0, "int32"),
        "token_ids": token_ids,
        "positions": positions,
        "remaining": remaining,
        "cache": cache,
        "tokens": ops.zeros((max_steps, batch), "int32"),
        "logprobs": ops.zeros((max_steps, batch), "float32"),
    }
    if top_logprobs:
        state["top_values"] = ops.zeros(
            (max_steps, batch, top_logprobs), "float32"
        )
        state["top_ids"] = ops.zeros((max_steps, batch, top_logprobs), "int32")
    for name in ("seen", "counts"):
        if name in arrays:
            state[name] = arrays[name]

    def cond(state):
        return ops.logical_and(
            state["i"] < num_steps, ops.any(state["remaining"] > 0)
        )

    def body(state):
        i = state["i"]
        step_arrays = dict(arrays, uniform=ops.take(uniform, i, axis=0))
        for name in ("seen", "counts"):
            if name in state:
                step_arrays[name] = state[name]
        new, logprobs, top_values, top_ids, cache = one_step(
            state["token_ids"], state["positions"], state["cache"], step_arrays
        )
        active = state["remaining"] > 0
        new = ops.where(active, new, state["token_ids"][:, 0])
        stopped = ops.any(ops.expand_dims(new, 1) == stop_ids, axis=1)
        remaining = ops.where(
            stopped, 0, ops.maximum(state["remaining"] - 1, 0)
        )
        state = dict(
            state,
            i=i + 1,
            token_ids=ops.expand_dims(new, 1),
            positions=ops.where(
                active, state["positions"] + 1, state["positions"]
            ),
            remaining=remaining,
            cache=cache,
            tokens=_write(state["tokens"], i, new),
            logprobs=_write(state["logprobs"], i, logprobs),
        )
        if top_logprobs:
            state["top_values"] = _write(state["top_values"], i, top_values)
            state["top_ids"] = _write(state["top_ids"], i, top_ids)
        if "counts" in state:
            picked = ops.one_hot(new, vocabulary, dtype="float32")
            picked = picked * ops.expand_dims(ops.cast(active, "float32"), 1)
            state["counts"] = state["counts"] + picked
            state["seen"] = ops.maximum(state["seen"], picked)
        return state

    (state,) = ops.while_loop(cond, lambda s: (body(s),), (state,))
    picked = (
        state["tokens"],
        state["logprobs"],
        state.get("top_values"),
        state.get("top_ids"),
    )
    return picked, state["i"], state["cache"]


def _write(buffer, i, value):
    """`buffer` with `value` at index `i` of its first axis."""
    start = [i] + [0] * (len(ops.shape(buffer)) - 1)
    return ops.slice_update(buffer, start, ops.expand_dims(value, 0))
