"""Ring caches, chunked attention, bucketed compiled generation, streaming.

References: transformers' eager `Gemma2ForCausalLM` (full forward passes, no
cache) and our own uncached forward pass.
"""

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import generation
from tests import references
from tests.harness import TestCase
from tests.test_causal_lm import _lm
from tests.test_causal_lm import _prompts


def _set_chunk_size(backbone, size):
    for block in backbone.transformer_layers:
        block.attention.chunk_size = size


def _uncached_greedy(lm, token_ids, num_tokens):
    """Greedy continuation by full forward passes of our model, no cache.

    Every pass has the final length, so it compiles once (a growing input
    took 37 s on JAX, which compiles eager ops per shape; this takes 7 s).
    The zeros past the current position cannot change it: the attention is
    causal.
    """
    ids = np.asarray(token_ids)
    batch, length = ids.shape
    full = np.zeros((batch, length + num_tokens), ids.dtype)
    full[:, :length] = ids
    for index in range(length, length + num_tokens):
        logits = lm.predict_on_batch(
            {"token_ids": full, "padding_mask": np.ones_like(full)}
        )
        logits = keras.ops.convert_to_numpy(logits)
        full[:, index] = logits[:, index - 1].argmax(-1)
    return full


def _count_traces(lm):
    """Counts the Python runs (traces, when compiled) of `lm`'s prefill and
    decode step, by wrapping the methods that the engine compiles."""
    counts = {"prefill": 0, "step": 0}

    def counting(name, method):
        def counted(*args, **kwargs):
            counts[name] += 1
            return method(*args, **kwargs)

        return counted

    lm._prefill = counting("prefill", lm._prefill)
    lm._decode_step = counting("step", lm._decode_step)
    lm._compiled_generation = None
    return counts


def _compiled_graphs():
    """Graphs `torch.compile` has made in this process (0 elsewhere)."""
    if keras.config.backend() != "torch":
        return 0
    import torch._dynamo

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class RingCacheTest(TestCase):
    def test_local_layers_keep_only_the_window(self):
        _, lm = _lm()
        backbone = lm.backbone
        # Window 4; layers alternate local, global, local.
        self.assertEqual(backbone.cache_capacities(20), (4, 20, 4))
        self.assertEqual(backbone.cache_capacities(3), (3, 3, 3))
        cache = backbone.init_cache(2, 20)
        shapes = [tuple(keras.ops.shape(k)) for k, _ in cache]
        self.assertEqual(shapes, [(2, 4, 2, 8), (2, 20, 2, 8), (2, 4, 2, 8)])

    def test_greedy_matches_transformers_around_the_window(self):
        # Prompts shorter than, equal to and longer than the window of 4 in
        # one batch: the prefill bucket (16) holds other rows' prompt tokens
        # past the shortest prompt, which must not reach the ring.
        hf, lm = _lm()
        lengths = [3, 4, 5, 9]
        new = 10
        inputs = _prompts(lengths, max(lengths) + new, seed=1)
        outputs = lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)
        for row, length in enumerate(lengths):
            prompt = inputs["token_ids"][row : row + 1, :length]
            expected = references.hf_greedy(hf, prompt, new)[0]
            np.testing.assert_array_equal(
                outputs["token_ids"][row, : length + new], expected
            )
            self.assertEqual(outputs["padding_mask"][row].sum(), length + new)

    def test_jit_compiled_greedy_matches_transformers(self):
        # compile(jit_compile=True): the default on JAX and TensorFlow; on
        # PyTorch, the torch.compile'd decode step. Two lengths past the
        # window of 4 and two `max_length` buckets (16, 32): on PyTorch the
        # global layers' cache capacity is dynamic, so one graph serves both.
        hf, lm = _lm()
        lm.compile(jit_compile=True)
        graphs = _compiled_graphs()
        for lengths, new in (([3, 9], 6), ([5, 7], 20)):
            inputs = _prompts(lengths, max(lengths) + new, seed=new)
            outputs = lm.generate(
                inputs, max_new_tokens=new, stop_token_ids=None
            )
            for row, length in enumerate(lengths):
                prompt = inputs["token_ids"][row : row + 1, :length]
                expected = references.hf_greedy(hf, prompt, new)[0]
                np.testing.assert_array_equal(
                    outputs["token_ids"][row, : length + new], expected
                )
        if keras.config.backend() == "torch":
            self.assertEqual(_compiled_graphs() - graphs, 1)

    def test_greedy_matches_the_uncached_forward_pass(self):
        _, lm = _lm(seed=3)
        inputs = _prompts([2, 6], 6 + 12, seed=2)
        outputs = lm.generate(inputs, max_new_tokens=12, stop_token_ids=None)
        for row, length in enumerate([2, 6]):
            prompt = inputs["token_ids"][row : row + 1, :length]
            expected = _uncached_greedy(lm, prompt, 12)[0]
            np.testing.assert_array_equal(
                outputs["token_ids"][row, : length + 12], expected
            )

    def test_beam_search_matches_an_uncached_beam_search(self):
        import keras_hub

        _, lm = _lm(seed=4)
        inputs = _prompts([3, 6], 14, seed=3)
        lm.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=3))
        outputs = lm.generate(inputs, stop_token_ids=None)

        # The same KerasHub sampler over full forward passes, no cache.
        def next(prompt, cache, index):
            logits = lm(
                {
                    "token_ids": prompt,
                    "padding_mask": keras.ops.ones_like(prompt),
                }
            )
            return logits[:, index - 1], None, cache

        sampler = keras_hub.samplers.BeamSampler(num_beams=3)
        expected = sampler(
            next=next,
            prompt=keras.ops.convert_to_tensor(inputs["token_ids"]),
            index=3,
            mask=keras.ops.convert_to_tensor(inputs["padding_mask"]),
        )
        np.testing.assert_array_equal(
            outputs["token_ids"], keras.ops.convert_to_numpy(expected)
        )

    def test_decode_step_reads_the_ring_past_many_wraps(self):
        # 40 positions through a window of 4: the ring wraps ten times.
        hf, lm = _lm()
        token_ids = references.random_token_ids(1, 40, seed=5)
        expected = references.hf_logits(hf, token_ids)
        cache = lm.backbone.init_cache(1, 40)
        steps = []
        for t in range(40):
            logits, _, cache = lm.call_with_cache(
                token_ids[:, t : t + 1], cache, t
            )
            steps.append(keras.ops.convert_to_numpy(logits)[:, 0])
        self.assertLess(np.abs(np.stack(steps, 1) - expected).max(), 1e-4)

    def test_prefill_keeps_only_valid_positions(self):
        # Prefill 12 positions but keep 7: decoding on from 7 equals HF.
        hf, lm = _lm()
        token_ids = references.random_token_ids(1, 12, seed=6)
        expected = references.hf_logits(hf, token_ids)
        cache = lm.backbone.init_cache(1, 12)
        _, _, cache = lm.call_with_cache(token_ids, cache, 0, valid_length=7)
        for t in range(7, 12):
            logits, _, cache = lm.call_with_cache(
                token_ids[:, t : t + 1], cache, t
            )
            actual = keras.ops.convert_to_numpy(logits)[0, 0]
            self.assertLess(np.abs(actual - expected[0, t]).max(), 1e-4)


class ChunkedAttentionTest(TestCase):
    def test_chunked_logits_match_transformers(self):
        # Chunks of 4 over 23 positions with padding: several query and key
        # blocks, the window of 4 crossing block edges.
        hf, lm = _lm()
        token_ids = references.random_token_ids(2, 23, seed=7)
        padding_mask = np.ones_like(token_ids)
        padding_mask[1, 17:] = 0
        expected = references.hf_logits(hf, token_ids, padding_mask)
        _set_chunk_size(lm.backbone, 4)
        actual = keras.ops.convert_to_numpy(
            lm({"token_ids": token_ids, "padding_mask": padding_mask})
        )
        self.assertLess(np.abs(actual[0] - expected[0]).max(), 1e-4)
        self.assertLess(np.abs(actual[1, :17] - expected[1, :17]).max(), 1e-4)

    def test_chunked_prefill_then_decode_matches_transformers(self):
        hf, lm = _lm()
        _set_chunk_size(lm.backbone, 5)
        inputs = _prompts([13], 13 + 6, seed=8)
        outputs = lm.generate(inputs, max_new_tokens=6, stop_token_ids=None)
        prompt = inputs["token_ids"][:, :13]
        expected = references.hf_greedy(hf, prompt, 6)[0]
        np.testing.assert_array_equal(outputs["token_ids"][0, :19], expected)

    def test_chunked_gradients_match_full_attention(self):
        hf, lm = _lm()
        token_ids = references.random_token_ids(1, 11, seed=9)
        full = lm.score(token_ids)
        _set_chunk_size(lm.backbone, 3)
        chunked = lm.score(token_ids)
        self.assertLess(np.abs(full - chunked).max(), 1e-5)


class BucketingTest(TestCase):
    def test_bucket_lengths(self):
        self.assertEqual(generation.bucket_length(1), 16)
        self.assertEqual(generation.bucket_length(17), 32)
        self.assertEqual(generation.bucket_length(1025), 2048)
        self.assertEqual(generation.bucket_length(2049), 3072)

    @pytest.mark.skipif(
        keras.config.backend() == "torch",
        reason="PyTorch runs eagerly: nothing is traced.",
    )
    def test_a_growing_chat_compiles_once_per_bucket(self):
        _, lm = _lm()
        functions = _count_traces(lm)
        # Prompts of 3 to 9 tokens and budgets of 3 to 5: one bucket each.
        for length, new in [(3, 3), (5, 4), (9, 5), (4, 3)]:
            lm.generate(
                _prompts([length], length, seed=length),
                max_new_tokens=new,
                stop_token_ids=None,
            )
        self.assertEqual(functions["prefill"], 1)
        self.assertEqual(functions["step"], 1)
        # A prompt past the bucket of 16 compiles a new prefill only once.
        for seed in (1, 2):
            lm.generate(
                _prompts([20], 20, seed=seed),
                max_new_tokens=4,
                stop_token_ids=None,
            )
        self.assertEqual(functions["prefill"], 2)
        self.assertEqual(functions["step"], 2)

    @pytest.mark.skipif(
        keras.config.backend() != "torch", reason="PyTorch's in-place path."
    )
    def test_torch_decode_step_updates_the_cache_in_place(self):
        import torch

        _, lm = _lm()
        cache = lm.backbone.init_cache(1, 8)
        pointers = [t.data_ptr() for pair in cache for t in pair]
        token = np.array([[2]], "int32")
        with torch.no_grad():
            _, _, new_cache = lm.call_with_cache(token, cache, 0)
        self.assertEqual(
            [t.data_ptr() for pair in new_cache for t in pair], pointers
        )
        self.assertTrue(bool((new_cache[1][0][0, 0] != 0).any()))


class StreamTest(TestCase):
    def _preset_lm(self):
        return keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")

    def test_streamed_text_equals_generated_text(self):
        lm = self._preset_lm()
        prompt = "The tokenizer"
        pieces = list(lm.generate(prompt, max_new_tokens=12, stream=True))
        self.assertGreater(len(pieces), 1)
        expected = lm.generate(prompt, max_new_tokens=12, strip_prompt=True)
        self.assertEqual("".join(pieces), expected)

    def test_stream_needs_one_prompt_and_a_stepwise_sampler(self):
        lm = self._preset_lm()
        with self.assertRaisesRegex(ValueError, "single string"):
            lm.generate(["a", "b"], max_new_tokens=2, stream=True)
        lm.compile(sampler="beam")
        with self.assertRaisesRegex(ValueError, "BeamSampler"):
            lm.generate("a", max_new_tokens=2, stream=True)

    def test_text_stream_waits_for_whole_characters(self):
        lm = self._preset_lm()
        tokenizer = lm.preprocessor.tokenizer
        ids = keras.ops.convert_to_numpy(tokenizer("naïve café ✓ done"))
        stream = generation.TextStream(tokenizer)
        text = "".join(stream.push([i]) for i in ids)
        self.assertEqual(text, "naïve café ✓ done")


class DirectCallsTest(TestCase):
    def test_direct_calls_give_the_same_decode_steps(self):
        from keras_gemma2.layers.direct import direct_calls

        _, lm = _lm()
        token_ids = references.random_token_ids(1, 9, seed=10)

        def run():
            cache = lm.backbone.init_cache(1, 9)
            _, _, cache = lm.call_with_cache(token_ids[:, :5], cache, 0)
            steps = []
            for t in range(5, 9):
                logits, _, cache = lm.call_with_cache(
                    token_ids[:, t : t + 1], cache, t
                )
                steps.append(keras.ops.convert_to_numpy(logits))
            return np.concatenate(steps, axis=1)

        expected = run()
        with direct_calls():
            actual = run()
        # On PyTorch the products run as `F.linear` instead of Keras'
        # einsum: the same sums in another order.
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    def test_mixed_precision_layers_keep_keras_call(self):
        from keras_gemma2.layers import direct

        layer = keras.layers.Dense(2, dtype="mixed_bfloat16")
        layer.build((None, 3))
        x = np.ones((1, 3), "float32")
        with direct.direct_calls():
            y = direct.call(layer, x)
        # Keras' __call__ casts the float32 input to bfloat16 compute.
        self.assertEqual(keras.backend.standardize_dtype(y.dtype), "bfloat16")
