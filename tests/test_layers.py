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


class EinsumDenseTest(TestCase):
    # Gemma's products: query, attention output, FFN.
    CASES = (
        ("btd,ndh->btnh", (None, 4, 8), (2, 3, 16)),
        ("btnh,nhd->btd", (None, 16), (2, 3, 4, 8)),
        ("btd,df->btf", (None, 32), (2, 3, 16)),
    )

    def _pair(self, equation, output_shape, input_shape, config):
        keras_layer = keras.layers.EinsumDense(equation, output_shape)
        keras_layer.build(input_shape)
        ours = keras_gemma2.layers.Gemma2EinsumDense(equation, output_shape)
        ours.build(input_shape)
        ours.set_weights(keras_layer.get_weights())
        keras_layer.quantize("int8", config=config)
        ours.quantize("int8", config=config)
        return keras_layer, ours

    def test_int8_outputs_are_keras_int8_outputs(self):
        # On torch the int8 x int8 product runs through `torch._int_mm`
        # instead of Keras' int32 einsum; the int32 sums are the same.
        for equation, output_shape, input_shape in self.CASES:
            keras_layer, ours = self._pair(
                equation, output_shape, input_shape, config=None
            )
            x = np.random.rand(*input_shape).astype("float32")
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(ours(x)),
                keras.ops.convert_to_numpy(keras_layer(x)),
                err_msg=equation,
            )

    def test_weight_only_int8_is_the_dequantized_float_product(self):
        config = keras.quantizers.Int8QuantizationConfig(
            activation_quantizer=None
        )
        for equation, output_shape, input_shape in self.CASES:
            _, ours = self._pair(equation, output_shape, input_shape, config)
            kernel = keras.ops.convert_to_numpy(ours._kernel)
            scale = keras.ops.convert_to_numpy(ours.kernel_scale)[0, 0]
            # One scale per output; the kernel's output axes are its last
            # ones, except the query's heads (`ndh`), which come first.
            if equation.endswith("btnh"):
                scale = scale[:, None, :]
            dequantized = kernel.astype("float32") / scale
            x = np.random.rand(*input_shape).astype("float32")
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(ours(x)),
                np.einsum(equation, x, dequantized),
                rtol=1e-5,
                atol=1e-5,
                err_msg=equation,
            )

    def test_int8_logits_are_keras_int8_logits(self):
        # Keras' own layer: KerasHub's subclass refuses `quantize`.
        keras_layer = keras.layers.ReversibleEmbedding(
            50, 16, logit_soft_cap=30.0
        )
        keras_layer.build((2, 3))
        ours = keras_gemma2.layers.Gemma2Embedding(50, 16, logit_soft_cap=30.0)
        ours.build((2, 3))
        ours.set_weights(keras_layer.get_weights())
        keras_layer.quantize("int8")
        ours.quantize("int8")
        x = np.random.rand(2, 3, 16).astype("float32")
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(ours(x, reverse=True)),
            keras.ops.convert_to_numpy(keras_layer(x, reverse=True)),
        )
