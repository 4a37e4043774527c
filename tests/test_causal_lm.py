"""Gemma2CausalLM: cached decoding, generation and scoring vs transformers."""

import keras
import numpy as np
import pytest

import keras_gemma2
from tests import references
from tests.harness import TestCase


def _lm(hf=None, seed=0, **kwargs):
    hf = hf or references.hf_model(seed=seed, **kwargs)
    return hf, keras_gemma2.Gemma2CausalLM(
        references.our_twin(hf, **kwargs), preprocessor=None
    )


def _prompts(lengths, total, seed=0):
    """Right-padded prompts of the given lengths, `<bos>` first."""
    rng = np.random.default_rng(seed)
    token_ids = np.zeros((len(lengths), total), "int32")
    padding_mask = np.zeros((len(lengths), total), "int32")
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.integers(4, 97, length)
        token_ids[row, 0] = 2
        padding_mask[row, :length] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


class CachedDecodingTest(TestCase):
    def test_token_by_token_cache_equals_full_forward(self):
        # 13 positions through a window of 4: local layers must slide.
        _, lm = _lm()
        token_ids = _prompts([13], 13)["token_ids"]
        full = keras.ops.convert_to_numpy(
            lm(
                {
                    "token_ids": token_ids,
                    "padding_mask": np.ones_like(token_ids),
                }
            )
        )
        cache = lm.backbone.init_cache(1, 13)
        steps = []
        for t in range(13):
            logits, _, cache = lm.call_with_cache(
                token_ids[:, t : t + 1], cache, t
            )
            steps.append(keras.ops.convert_to_numpy(logits)[:, 0])
        self.assertLess(np.abs(np.stack(steps, axis=1) - full).max(), 1e-5)


class GreedyParityTest(TestCase):
    def test_greedy_generation_matches_transformers(self):
        # Prompts of 3 and 6 tokens in one batch, 9 new tokens: past the window.
        hf, lm = _lm()
        inputs = _prompts([3, 6], 6 + 9)
        outputs = lm.generate(inputs, stop_token_ids=None)
        for row, length in enumerate([3, 6]):
            prompt = inputs["token_ids"][row : row + 1, :length]
            expected = references.hf_greedy(hf, prompt, 9)[0]
            actual = outputs["token_ids"][row, : length + 9]
            np.testing.assert_array_equal(actual, expected)

    def test_max_new_tokens_is_per_sequence(self):
        _, lm = _lm()
        inputs = _prompts([3, 6], 6)
        outputs = lm.generate(inputs, max_new_tokens=4, stop_token_ids=None)
        self.assertEqual(outputs["padding_mask"].sum(axis=1).tolist(), [7, 10])
        stripped = lm.generate(
            inputs, max_new_tokens=4, stop_token_ids=None, strip_prompt=True
        )
        self.assertEqual(stripped["padding_mask"].sum(axis=1).tolist(), [4, 4])
        np.testing.assert_array_equal(
            stripped["token_ids"][0, :4], outputs["token_ids"][0, 3:7]
        )

    def test_stop_token_ends_each_sequence(self):
        # Stop at a token the model really produces: its third greedy token.
        hf, lm = _lm()
        inputs = _prompts([4], 4 + 8)
        free = lm.generate(inputs, stop_token_ids=None)["token_ids"][0]
        stop = int(free[6])
        first = 4 + int(np.argmax(free[4:] == stop))
        outputs = lm.generate(inputs, stop_token_ids=(stop,))
        self.assertEqual(int(outputs["padding_mask"][0].sum()), first + 1)


class SamplersTest(TestCase):
    @pytest.mark.long
    def test_every_keras_hub_sampler_runs(self):
        _, lm = _lm()
        inputs = _prompts([3, 5], 9)
        for sampler in (
            "greedy",
            "top_k",
            "top_p",
            "beam",
            "random",
            "contrastive",
        ):
            lm.compile(sampler=sampler)
            outputs = lm.generate(inputs, stop_token_ids=None)
            self.assertEqual(outputs["token_ids"].shape, (2, 9))
            # Prompts are kept; every position is filled.
            np.testing.assert_array_equal(
                outputs["token_ids"][1, :5], inputs["token_ids"][1, :5]
            )
            self.assertTrue(outputs["padding_mask"].all())


class ScoreTest(TestCase):
    def test_log_probs_match_transformers(self):
        hf, lm = _lm()
        inputs = _prompts([10, 7], 10)
        scores = lm.score(inputs["token_ids"], inputs["padding_mask"])
        logits = references.hf_logits(
            hf, inputs["token_ids"], inputs["padding_mask"]
        )
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for row, length in enumerate([10, 7]):
            ids = inputs["token_ids"][row, 1:length]
            expected = log_probs[row, np.arange(length - 1), ids]
            np.testing.assert_allclose(
                scores[row, 1:length], expected, atol=1e-4
            )
            self.assertTrue((scores[row, length:] == 0).all())
        self.assertTrue((scores[:, 0] == 0).all())


class InputErrorsTest(TestCase):
    def test_max_length_and_max_new_tokens_are_exclusive(self):
        _, lm = _lm()
        with pytest.raises(ValueError, match="not both"):
            lm.generate(_prompts([3], 5), max_length=5, max_new_tokens=2)

    def test_strings_need_a_preprocessor(self):
        _, lm = _lm()
        with pytest.raises(ValueError, match="no preprocessor"):
            lm.generate("hello", stop_token_ids=None)

    def test_auto_stop_needs_a_preprocessor(self):
        _, lm = _lm()
        with pytest.raises(ValueError, match=r"stop_token_ids=\(1, 107\)"):
            lm.generate(_prompts([3], 5))


class LoraFitTest(TestCase):
    def test_fit_trains_only_the_lora_weights(self):
        _, lm = _lm()
        lm.backbone.enable_lora(rank=2)
        trainable = {w.path for w in lm.trainable_weights}
        self.assertTrue(trainable)
        self.assertTrue(all("lora_kernel" in p for p in trainable))
        before = {
            w.path: keras.ops.convert_to_numpy(w).copy() for w in lm.weights
        }
        inputs = _prompts([8, 8, 6, 7], 8, seed=3)
        labels = np.roll(inputs["token_ids"], -1, axis=1)
        lm.compile(optimizer=keras.optimizers.Adam(1e-2))
        history = lm.fit(
            inputs,
            labels,
            sample_weight=inputs["padding_mask"],
            batch_size=2,
            epochs=3,
            verbose=0,
        )
        losses = history.history["loss"]
        self.assertLess(losses[-1], losses[0])
        for w in lm.weights:
            changed = not np.array_equal(
                before[w.path], keras.ops.convert_to_numpy(w)
            )
            # lora_kernel_b starts at zero and must move; base weights must not.
            if "lora_kernel_b" in w.path:
                self.assertTrue(changed, w.path)
            elif "lora" not in w.path:
                self.assertFalse(changed, w.path)
