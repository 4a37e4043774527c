"""Speculative decoding by prompt lookup: exact for greedy, the rejection
rule for sampling, a ring cache that loses nothing to rejected drafts.

References: plain greedy decoding of the same model (itself checked against
transformers in test_engine), the model's own next-token distributions for
the sampled test, and the caches of plain decoding.
"""

import functools

import keras
import numpy as np
import pytest

from keras_gemma2 import generation
from keras_gemma2.generation import speculative
from keras_gemma2.sampling import SamplingParams
from tests.harness import TestCase
from tests.test_causal_lm import _lm
from tests.test_causal_lm import _prompts

# The 0.999 quantiles of the chi-square distribution, by degrees of freedom.
CHI_SQUARE_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
}


@functools.lru_cache(maxsize=None)
def _model(**kwargs):
    """One tiny model per module (and vocabulary), so that the compiled
    steps are shared by the tests that use it."""
    return _lm(**kwargs)[1]


def _copy_prompts():
    """Prompts that repeat a span: drafts that get kept (and the random
    model's greedy loops copy their own output)."""
    rng = np.random.default_rng(3)
    span = rng.integers(4, 97, 7).tolist()
    return [
        [2, *span, 11, 12, *span[:3]],
        [2, 30, 31, *span, *span[:2]],
        [2, *rng.integers(4, 97, 5).tolist()],
    ]


def _ids(prompts):
    width = max(map(len, prompts))
    token_ids = np.zeros((len(prompts), width), "int32")
    mask = np.zeros((len(prompts), width), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return {"token_ids": token_ids, "padding_mask": mask}


class PromptLookupTest(TestCase):
    def test_drafts_follow_the_latest_earlier_ngram(self):
        self.assertEqual(
            speculative.prompt_lookup([5, 6, 7, 8, 9, 1, 6, 7], 3), [8, 9, 1]
        )
        # The 3-gram (1, 6, 7) recurs: it wins over the later 2-gram.
        ids = [1, 6, 7, 3, 6, 7, 4, 1, 6, 7]
        self.assertEqual(speculative.prompt_lookup(ids, 2), [3, 6])
        self.assertEqual(speculative.prompt_lookup(ids, 1), [3])
        self.assertEqual(speculative.prompt_lookup([5, 6, 7, 8], 4), [])
        # A match at the very end drafts what follows it, fewer if short.
        self.assertEqual(speculative.prompt_lookup([4, 4, 4], 5), [4])


def _rejection_prompt(seed):
    """Every 2-gram recurs with a different follower: drafts that the
    model mostly rejects."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(4, 97, 2).tolist()
    prompt = [2]
    for _ in range(6):
        prompt += [a, b, int(rng.integers(4, 97))]
    return prompt + [a, b]


class GreedyExactnessTest(TestCase):
    def test_copying_rejected_and_fully_accepted_rows_equal_plain_greedy(self):
        lm = _model()
        # Row 2 quotes the model's own greedy output: its drafts are the
        # argmax (full acceptances).
        source = [2, 17, 40, 5]
        loop = lm.generate(
            _ids([source]),
            max_new_tokens=32,
            stop_token_ids=None,
            return_details=True,
        )[0].token_ids
        prompts = [
            _copy_prompts()[0],
            _rejection_prompt(9),
            source + loop[:8],
        ]
        inputs = _ids(prompts)
        # 32 new tokens: eight times the window of 4.
        plain = lm.generate(
            inputs, max_new_tokens=32, stop_token_ids=None, return_details=True
        )
        fast = lm.generate(
            inputs,
            max_new_tokens=32,
            stop_token_ids=None,
            return_details=True,
            speculative="prompt_lookup",
            num_draft_tokens=4,
        )
        for a, b in zip(plain, fast):
            self.assertEqual(a.token_ids, b.token_ids)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
            self.assertEqual(a.finish_reason, b.finish_reason)
        self.assertEqual(plain[2].token_ids[:24], loop[8:])
        for row in fast:
            self.assertGreater(row.draft_tokens, 0)
            self.assertLessEqual(row.accepted_tokens, row.draft_tokens)
        # Some drafts rejected, and a quoted row mostly accepted.
        self.assertGreater(fast[1].draft_tokens, fast[1].accepted_tokens)
        self.assertGreater(fast[2].accepted_tokens, fast[2].draft_tokens / 2)
        self.assertEqual(plain[0].draft_tokens, 0)

    def test_mixed_batch_rows_that_cannot_draft_keep_their_output(self):
        lm = _model()
        params = [
            SamplingParams(),
            SamplingParams(repetition_penalty=1.5),
            SamplingParams(temperature=0.8, top_k=5, seed=3),
        ]
        inputs = _ids(_copy_prompts())
        fast = lm.generate(
            inputs,
            max_new_tokens=32,
            stop_token_ids=None,
            params=params,
            return_details=True,
            speculative="prompt_lookup",
        )
        plain = lm.generate(
            inputs,
            max_new_tokens=32,
            stop_token_ids=None,
            params=params[:2] + [SamplingParams()],
            return_details=True,
        )
        self.assertEqual(fast[0].token_ids, plain[0].token_ids)
        # The penalised row never drafts, and equals its plain run.
        self.assertEqual(fast[1].token_ids, plain[1].token_ids)
        self.assertEqual(fast[1].draft_tokens, 0)
        self.assertEqual(len(fast[2].token_ids), 32)

    def test_stream_and_stop_strings_with_drafts(self):
        from tests.test_engine import _preset_lm

        lm = _preset_lm()
        prompt = "one two three four. one two three four. one two"
        plain = lm.generate(prompt, max_new_tokens=24, strip_prompt=True)
        streamed = "".join(
            lm.generate(
                prompt,
                max_new_tokens=24,
                stream=True,
                speculative="prompt_lookup",
            )
        )
        self.assertEqual(streamed, plain)
        self.assertGreater(len(plain), 6)
        stop = plain[3:6]
        stopped = lm.generate(
            prompt,
            max_new_tokens=24,
            strip_prompt=True,
            stop=[stop],
            speculative="prompt_lookup",
            return_details=True,
        )
        self.assertEqual(stopped.text, plain[: plain.index(stop)])
        self.assertEqual(stopped.finish_reason, "stop")
        self.assertGreater(stopped.draft_tokens, 0)


class RingCacheTest(TestCase):
    def test_cache_after_rejections_equals_plain_decoding(self):
        lm = _model()
        backbone = lm.backbone
        prompt = [2, 9, 8, 21, 9, 8, 33, 9, 8, 50, 9, 8]
        k = 4
        runs = {}
        for drafts in (0, k):
            engine = generation.Engine(
                lm, max_batch=1, max_length=40, num_draft_tokens=drafts
            )
            sequence = generation.Sequence(prompt, max_new_tokens=20)
            engine.add([sequence])
            while not sequence.finished:
                engine.advance(4)
            runs[drafts] = (engine, sequence)
        plain, fast = runs[0][1], runs[k][1]
        self.assertEqual(plain.ids, fast.ids)
        self.assertGreater(fast.drafted, fast.accepted)
        # Compare every position both caches hold, layer by layer: the
        # last `window` positions in a ring, all of them in a global layer.
        cached = fast.cached
        self.assertEqual(cached, plain.cached)
        for layer, (a, b) in enumerate(zip(runs[0][0].cache, runs[k][0].cache)):
            window = backbone.transformer_layers[layer].window_size
            first = 0 if window is None else cached - window
            for tensor_a, tensor_b in zip(a, b):
                tensor_a = keras.ops.convert_to_numpy(tensor_a)
                tensor_b = keras.ops.convert_to_numpy(tensor_b)
                for position in range(max(first, 0), cached):
                    np.testing.assert_allclose(
                        tensor_b[0, position % tensor_b.shape[1]],
                        tensor_a[0, position % tensor_a.shape[1]],
                        atol=1e-5,
                        err_msg=f"layer {layer}, position {position}",
                    )

    def test_rings_have_room_for_the_drafts(self):
        lm = _model()
        plain = lm.backbone.cache_capacities(40)
        drafting = lm.backbone.cache_capacities(40, draft_tokens=4)
        self.assertEqual([c + 4 for c in plain], list(drafting))


class SampledDistributionTest(TestCase):
    def test_rejection_rule_keeps_the_model_distribution(self):
        # Vocabulary of 8; a bias makes the drafted token likely, so both
        # acceptances and rejections happen often.
        lm = _model(vocabulary_size=8)
        prompt = [2, 5, 6, 7, 5, 6]  # drafts 7, then 5, 6
        params = dict(temperature=1.0, logit_bias={7: 1.5, 5: 1.0})
        # The exact distributions: the first token, and the second one's
        # marginal over the first.
        inputs = np.asarray([prompt + [t] for t in range(8)], "int32")
        logits = keras.ops.convert_to_numpy(
            lm({"token_ids": inputs, "padding_mask": np.ones_like(inputs)})
        ).astype("float64")
        bias = np.zeros(8)
        bias[7], bias[5] = 1.5, 1.0

        def softmax(x):
            x = x + bias
            e = np.exp(x - x.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        first = softmax(logits[0, len(prompt) - 1])
        second = first @ softmax(logits[:, len(prompt)])
        rows, rounds = 50, 8
        counts = np.zeros((2, 8))
        accepted = 0
        for round_ in range(rounds):
            engine = generation.Engine(
                lm, max_batch=rows, max_length=16, num_draft_tokens=3
            )
            sequences = [
                generation.Sequence(
                    prompt,
                    max_new_tokens=2,
                    params=SamplingParams(seed=round_ * rows + r, **params),
                )
                for r in range(rows)
            ]
            engine.add(sequences)
            events = engine.speculative_step()
            self.assertIsNotNone(events)
            while engine.running:
                engine.advance()
            for sequence in sequences:
                counts[0, sequence.output_ids[0]] += 1
                counts[1, sequence.output_ids[1]] += 1
                accepted += sequence.accepted
        total = rows * rounds
        self.assertGreater(accepted, total // 10)
        self.assertLess(accepted, total * 2)
        for observed, expected in zip(counts, (first, second)):
            keep = expected * total >= 5
            rest = [observed[~keep].sum()], [expected[~keep].sum() * total]
            obs = np.concatenate([observed[keep], rest[0]])
            exp = np.concatenate([expected[keep] * total, rest[1]])
            obs, exp = obs[exp > 0], exp[exp > 0]
            exp = exp * obs.sum() / exp.sum()
            statistic = float(((obs - exp) ** 2 / exp).sum())
            # The chi-square quantile at p = 0.001 for len(obs) - 1 degrees.
            self.assertLess(
                statistic,
                CHI_SQUARE_999[len(obs) - 1],
                (observed, expected * total),
            )


class OptionsTest(TestCase):
    @pytest.mark.skipif(
        keras.config.backend() != "jax", reason="argument checks: one pass"
    )
    def test_bad_options_name_the_argument(self):
        lm = _model()
        inputs = _prompts([3], 3)
        for kwargs, name in (
            ({"speculative": "medusa"}, "speculative"),
            ({"speculative": lm}, "speculative"),
            ({"speculative": "prompt_lookup", "num_draft_tokens": 0}, "num_"),
            ({"speculative": "prompt_lookup", "num_draft_tokens": 17}, "num_"),
            ({"speculative": "prompt_lookup", "num_draft_tokens": "4"}, "num"),
        ):
            with self.assertRaisesRegex(ValueError, name):
                lm.generate(inputs, max_new_tokens=2, **kwargs)
