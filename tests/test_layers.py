"""Layers: masks as tables, RMSNorm against transformers, layer contracts."""

import keras
import numpy as np

import keras_gemma2
from keras_gemma2.layers import attention_masks
from tests.harness import TestCase


class AttentionMasksTest(TestCase):
    def test_sliding_window_mask_table(self):
        mask = attention_masks.decoder_attention_mask(5, 5, window_size=3)
        expected = np.array(
            [
                [1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1],
            ],
            bool,
        )
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(mask)[0], expected
        )

    def test_global_mask_with_padding_table(self):
        padding = np.array([[1, 1, 1, 0]])
        mask = attention_masks.decoder_attention_mask(
            4, 4, padding_mask=padding
        )
        expected = np.array(
            [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], bool
        )
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(mask)[0], expected
        )

    def test_cached_decode_step_sees_its_window_of_the_cache(self):
        # Query at position 5 of a 7-slot cache, window 3: keys 3, 4, 5.
        mask = attention_masks.decoder_attention_mask(
            1, 7, start_index=5, window_size=3
        )
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(mask)[0, 0], [0, 0, 0, 1, 1, 1, 0]
        )


class RMSNormalizationTest(TestCase):
    def test_matches_transformers(self):
        import torch
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

        x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
        scale = np.linspace(-1, 1, 8).astype("float32")
        theirs = Gemma2RMSNorm(8, eps=1e-6)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(scale))
            expected = theirs(torch.from_numpy(x)).numpy()
        ours = keras_gemma2.Gemma2RMSNormalization(epsilon=1e-6)
        ours.build(x.shape)
        ours.scale.assign(scale)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours(x)), expected, atol=1e-6
        )

    def test_layer_contract(self):
        self.run_layer_test(
            cls=keras_gemma2.Gemma2RMSNormalization,
            init_kwargs={"epsilon": 1e-6},
            input_data=np.ones((2, 3, 8), "float32"),
            expected_output_shape=(2, 3, 8),
            expected_num_trainable_weights=1,
        )


class DecoderBlockTest(TestCase):
    def test_layer_contract(self):
        self.run_layer_test(
            cls=keras_gemma2.Gemma2DecoderBlock,
            init_kwargs={
                "hidden_dim": 16,
                "intermediate_dim": 32,
                "num_query_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "query_pre_attn_scalar": 6,
                "attention_type": "local",
                "sliding_window_size": 3,
                "attention_logit_soft_cap": 50.0,
            },
            input_data=np.random.rand(2, 5, 16).astype("float32"),
            expected_output_shape=(2, 5, 16),
            expected_num_trainable_weights=11,
        )
