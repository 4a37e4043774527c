"""Sampling controls against transformers' logits processors and OpenAI's
published penalty formula."""

import keras
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from keras_gemma2 import sampling
from keras_gemma2.sampling import SamplingParams
from tests.harness import TestCase

VOCAB = 50


def _logits(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, VOCAB)) * 3).astype("float32")


def _input_ids(batch=4, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, 12))


def _ours(logits, params, input_ids=None, counts=None):
    params = (
        [params] * len(logits) if isinstance(params, SamplingParams) else params
    )
    arrays = sampling.stack(params, VOCAB)
    seen = None
    if input_ids is not None:
        seen = np.zeros((len(logits), VOCAB), "float32")
        for row, ids in enumerate(input_ids):
            seen[row, ids] = 1.0
    out = sampling.process_logits(
        logits, arrays, seen, counts, sampling.features(params)
    )
    return keras.ops.convert_to_numpy(out)


def _theirs(logits, processors, input_ids=None):
    scores = torch.as_tensor(logits)
    ids = torch.as_tensor(
        input_ids if input_ids is not None else np.zeros((len(logits), 1)),
        dtype=torch.long,
    )
    for processor in processors:
        scores = processor(ids, scores)
    return scores.numpy()


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


class AgainstTransformersTest(TestCase):
    def assert_same_distribution(self, ours, theirs):
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        np.testing.assert_allclose(_softmax(ours), _softmax(theirs), atol=1e-6)

    def test_each_warper(self):
        logits = _logits()
        cases = [
            (
                SamplingParams(temperature=0.7),
                [hf.TemperatureLogitsWarper(0.7)],
            ),
            (
                SamplingParams(temperature=1.0, top_k=7),
                [hf.TopKLogitsWarper(7)],
            ),
            (
                SamplingParams(temperature=1.0, top_p=0.8),
                [hf.TopPLogitsWarper(0.8)],
            ),
            (
                SamplingParams(temperature=1.0, min_p=0.1),
                [hf.MinPLogitsWarper(0.1)],
            ),
        ]
        for params, processors in cases:
            self.assert_same_distribution(
                _ours(logits, params), _theirs(logits, processors)
            )

    def test_repetition_penalty(self):
        logits, ids = _logits(), _input_ids()
        for penalty in (1.3, 0.8):
            ours = _ours(
                logits, SamplingParams(repetition_penalty=penalty), ids
            )
            theirs = _theirs(
                logits, [hf.RepetitionPenaltyLogitsProcessor(penalty)], ids
            )
            np.testing.assert_allclose(ours, theirs, atol=1e-6)

    def test_the_whole_chain_in_transformers_order(self):
        logits, ids = _logits(seed=3), _input_ids(seed=4)
        params = SamplingParams(
            repetition_penalty=1.2,
            temperature=0.8,
            top_k=20,
            top_p=0.9,
            min_p=0.05,
        )
        theirs = _theirs(
            logits,
            [
                hf.RepetitionPenaltyLogitsProcessor(1.2),
                hf.TemperatureLogitsWarper(0.8),
                hf.TopKLogitsWarper(20),
                hf.TopPLogitsWarper(0.9),
                hf.MinPLogitsWarper(0.05),
            ],
            ids,
        )
        self.assert_same_distribution(_ours(logits, params, ids), theirs)

    def test_each_row_keeps_its_own_settings(self):
        logits, ids = _logits(), _input_ids()
        params = [
            SamplingParams(),
            SamplingParams(temperature=0.7, top_k=5),
            SamplingParams(temperature=1.3, top_p=0.6, min_p=0.02),
            SamplingParams(repetition_penalty=1.5),
        ]
        together = _ours(logits, params, ids)
        for row, one in enumerate(params):
            alone = _ours(logits[row : row + 1], [one], ids[row : row + 1])
            np.testing.assert_allclose(
                together[row : row + 1], alone, atol=1e-6
            )


class PenaltiesTest(TestCase):
    def test_presence_and_frequency_follow_openai(self):
        # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        logits = _logits()
        counts = np.random.default_rng(2).integers(0, 3, (4, VOCAB))
        counts = counts.astype("float32")
        params = SamplingParams(presence_penalty=0.6, frequency_penalty=-0.4)
        expected = logits - counts * -0.4 - (counts > 0) * 0.6
        ours = _ours(logits, params, _input_ids(), counts)
        np.testing.assert_allclose(ours, expected, atol=1e-6)

    def test_logit_bias_adds(self):
        logits = _logits()
        ours = _ours(logits, SamplingParams(logit_bias={3: 5.0, 7: -100}))
        expected = logits.copy()
        expected[:, 3] += 5.0
        expected[:, 7] -= 100
        np.testing.assert_allclose(ours, expected, atol=1e-6)


class SelectTest(TestCase):
    def test_greedy_rows_take_the_argmax(self):
        logits = _logits()
        tokens = sampling.select_tokens(
            logits, np.zeros(4, "float32"), np.full(4, 0.99, "float32")
        )
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(tokens), logits.argmax(-1)
        )

    def test_inverse_cdf_picks_the_drawn_token(self):
        probs = np.array([[0.1, 0.0, 0.6, 0.3]] * 4, "float32")
        logits = np.log(np.maximum(probs, 1e-30)).astype("float32")
        logits[:, 1] = -np.inf
        uniforms = np.array([0.05, 0.15, 0.69, 0.71], "float32")
        tokens = sampling.select_tokens(logits, np.ones(4, "float32"), uniforms)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(tokens), [0, 2, 2, 3]
        )

    def test_sampled_frequencies_match_the_distribution(self):
        probs = np.array([0.5, 0.25, 0.15, 0.1], "float32")
        draws = 4000
        uniforms = np.random.default_rng(0).random(draws).astype("float32")
        logits = np.tile(np.log(probs), (draws, 1)).astype("float32")
        tokens = keras.ops.convert_to_numpy(
            sampling.select_tokens(logits, np.ones(draws, "float32"), uniforms)
        )
        observed = np.bincount(tokens, minlength=4)
        expected = probs * draws
        chi_square = ((observed - expected) ** 2 / expected).sum()
        self.assertLess(chi_square, 16.3)  # p = 0.001 with 3 dof

    def test_log_probs_are_the_raw_log_softmax(self):
        logits = _logits()
        tokens = np.array([1, 2, 3, 4], "int32")
        picked, (values, ids) = sampling.log_probs(logits, tokens, 3)
        reference = np.log(_softmax(logits.astype("float64")))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(picked),
            reference[np.arange(4), tokens],
            atol=1e-5,
        )
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(ids), np.argsort(-reference)[:, :3]
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(values),
            np.sort(reference)[:, ::-1][:, :3],
            atol=1e-5,
        )


class CompiledTest(TestCase):
    def test_compiled_equals_eager(self):
        logits, ids = _logits(), _input_ids()
        params = [
            SamplingParams(),
            SamplingParams(temperature=0.7, top_k=5, logit_bias={2: 1.0}),
            SamplingParams(temperature=1.3, top_p=0.6, min_p=0.02),
            SamplingParams(repetition_penalty=1.5, presence_penalty=0.5),
        ]
        arrays = sampling.stack(params, VOCAB)
        seen = np.zeros((4, VOCAB), "float32")
        for row, row_ids in enumerate(ids):
            seen[row, row_ids] = 1.0
        features = sampling.features(params)
        uniform = np.array([0.1, 0.5, 0.9, 0.3], "float32")

        def run(logits, arrays, seen, uniform):
            out = sampling.process_logits(logits, arrays, seen, seen, features)
            return sampling.select_tokens(out, arrays["temperature"], uniform)

        eager = keras.ops.convert_to_numpy(run(logits, arrays, seen, uniform))
        backend = keras.config.backend()
        if backend == "jax":
            import jax

            compiled = jax.jit(run)
        elif backend == "tensorflow":
            import tensorflow as tf

            compiled = tf.function(run, jit_compile=True)
        else:
            compiled = run
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(compiled(logits, arrays, seen, uniform)),
            eager,
        )


class BadInputTest(TestCase):
    def test_errors_name_the_argument(self):
        cases = [
            ({"temperature": -0.1}, "temperature"),
            ({"temperature": float("nan")}, "temperature"),
            ({"top_p": 0.0}, "top_p"),
            ({"top_p": 1.5}, "top_p"),
            ({"min_p": -0.1}, "min_p"),
            ({"min_p": 1.1}, "min_p"),
            ({"top_k": 0}, "top_k"),
            ({"top_k": -3}, "top_k"),
            ({"top_k": True}, "top_k"),
            ({"seed": "7"}, "seed"),
            ({"seed": 1.5}, "seed"),
            ({"top_logprobs": 21}, "top_logprobs"),
            ({"repetition_penalty": 0.0}, "repetition_penalty"),
            ({"presence_penalty": 2.5}, "presence_penalty"),
            ({"logit_bias": [1, 2]}, "logit_bias"),
        ]
        for kwargs, name in cases:
            with pytest.raises((ValueError, TypeError), match=name):
                SamplingParams(**kwargs)
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias={VOCAB: 1.0}).check_vocabulary(VOCAB)

    def test_keras_hub_samplers_map_to_params(self):
        import keras_hub

        self.assertTrue(
            SamplingParams.from_sampler(
                keras_hub.samplers.GreedySampler()
            ).greedy
        )
        top_k = SamplingParams.from_sampler(
            keras_hub.samplers.TopKSampler(k=7, temperature=0.5)
        )
        self.assertEqual((top_k.top_k, top_k.temperature), (7, 0.5))
        self.assertIsNone(
            SamplingParams.from_sampler(keras_hub.samplers.BeamSampler())
        )
