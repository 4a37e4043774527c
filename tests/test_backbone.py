"""Gemma2Backbone: parity with transformers, sizes, config, flags, errors."""

import os
from unittest import mock

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2.architectures import ARCHITECTURES
from keras_gemma2.memory import abstract_parameter_count
from tests import references
from tests.harness import TestCase


def _logits(backbone, token_ids, padding_mask=None):
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    return keras.ops.convert_to_numpy(backbone.logits(hidden))


class ParityWithTransformersTest(TestCase):
    def test_logits_match_transformers(self):
        # Sequence 11 > window 4; query scalar 5 != head_dim 8; both caps on.
        hf = references.hf_model()
        ours = references.our_twin(hf)
        token_ids = references.random_token_ids()
        expected = references.hf_logits(hf, token_ids)
        actual = _logits(ours, token_ids)
        self.assertLess(np.abs(actual - expected).max(), 1e-4)
        # The comparison can fail: a wrong query scale is far off.
        wrong = references.our_twin(hf, query_pre_attn_scalar=8)
        self.assertGreater(
            np.abs(_logits(wrong, token_ids) - expected).max(), 1e-2
        )

    def test_right_padded_batch_matches_transformers(self):
        hf = references.hf_model(seed=1)
        ours = references.our_twin(hf)
        token_ids = references.random_token_ids(length=9, seed=1)
        padding_mask = np.ones_like(token_ids)
        padding_mask[1, 5:] = 0
        expected = references.hf_logits(hf, token_ids, padding_mask)
        actual = _logits(ours, token_ids, padding_mask)
        real = padding_mask.astype(bool)
        self.assertLess(np.abs(actual[real] - expected[real]).max(), 1e-4)
        # The short row equals that row alone, unpadded.
        alone = _logits(ours, token_ids[1:, :5])
        self.assertLess(np.abs(actual[1, :5] - alone[0]).max(), 1e-5)


class ArchitectureTest(TestCase):
    def test_released_sizes_have_exact_parameter_counts(self):
        expected = {
            "2b": 2_614_341_888,
            "9b": 9_241_705_984,
            "27b": 27_227_128_320,
        }
        for size, count in expected.items():
            self.assertEqual(
                abstract_parameter_count(ARCHITECTURES[size]), count
            )

    def test_registry_params_match_abstract_builds(self):
        presets = keras_gemma2.Gemma2Backbone.presets
        for size, kwargs in ARCHITECTURES.items():
            for name in (f"gemma2_{size}_en", f"gemma2_instruct_{size}_en"):
                self.assertEqual(
                    presets[name]["metadata"]["params"],
                    abstract_parameter_count(kwargs),
                )

    def test_local_and_global_layers_alternate(self):
        backbone = keras_gemma2.Gemma2Backbone(**references.TINY_KWARGS)
        self.assertEqual(backbone.attention_types, ("local", "global", "local"))
        windows = [b.window_size for b in backbone.transformer_layers]
        self.assertEqual(windows, [4, None, 4])


class ConfigTest(TestCase):
    def test_config_round_trip_keeps_every_hyperparameter(self):
        backbone = keras_gemma2.Gemma2Backbone(**references.TINY_KWARGS)
        config = backbone.get_config()
        for key, value in references.TINY_KWARGS.items():
            self.assertEqual(config[key], value)
        restored = keras_gemma2.Gemma2Backbone.from_config(config)
        restored.set_weights(backbone.get_weights())
        token_ids = references.random_token_ids()
        np.testing.assert_array_equal(
            _logits(backbone, token_ids), _logits(restored, token_ids)
        )

    @pytest.mark.long
    def test_keras_hub_backbone_contract(self):
        # KerasHub's precision check builds in bfloat16 and expects it kept,
        # which XLA:CPU would otherwise hold in float32 (Gemma2Backbone).
        keep = {"KERAS_GEMMA2_XLA_CPU_BFLOAT16": "keep"}
        with mock.patch.dict(os.environ, keep):
            self._run_contract()

    def _run_contract(self):
        self.run_backbone_test(
            cls=keras_gemma2.Gemma2Backbone,
            init_kwargs=references.TINY_KWARGS,
            input_data={
                "token_ids": references.random_token_ids(),
                "padding_mask": np.ones((2, 11), "int32"),
            },
            expected_output_shape=(2, 11, 24),
            run_quantization_check=False,
        )


class FlagsChangeOutputTest(TestCase):
    """Each flag reaches the numerics: flipping it changes the logits."""

    def _compare(self, **changed):
        base = keras_gemma2.Gemma2Backbone(**references.TINY_KWARGS)
        base_weights = {w.path: w for w in base.weights}
        other = keras_gemma2.Gemma2Backbone(
            **{**references.TINY_KWARGS, **changed}
        )
        for w in other.weights:
            w.assign(base_weights[w.path])
        # Non-zero norm scales so that post norms are not the identity.
        for w in base.weights + other.weights:
            if w.path.endswith("scale"):
                w.assign(np.linspace(-0.5, 0.5, w.shape[0]))
        token_ids = references.random_token_ids(length=12)
        return np.abs(
            _logits(base, token_ids) - _logits(other, token_ids)
        ).max()

    def test_attention_soft_cap(self):
        self.assertGreater(self._compare(attention_logit_soft_cap=None), 1e-4)

    def test_final_soft_cap(self):
        self.assertGreater(self._compare(final_logit_soft_cap=None), 1e-4)

    def test_sliding_window(self):
        self.assertGreater(
            self._compare(use_sliding_window_attention=False), 1e-4
        )
        self.assertGreater(self._compare(sliding_window_size=6), 1e-4)

    def test_query_scalar(self):
        self.assertGreater(self._compare(query_pre_attn_scalar=8), 1e-4)

    def test_post_norms(self):
        # Norms are looked up by path; a missing layer drops its weights.
        self.assertGreater(self._compare(use_post_attention_norm=False), 1e-4)
        self.assertGreater(self._compare(use_post_ffw_norm=False), 1e-4)


class ValidationTest(TestCase):
    def test_query_heads_must_divide(self):
        kwargs = {**references.TINY_KWARGS, "num_key_value_heads": 3}
        with pytest.raises(
            ValueError,
            match=r"divisible.*Valid num_key_value_heads: \[1, 2, 4\]",
        ):
            keras_gemma2.Gemma2Backbone(**kwargs)

    def test_sliding_window_must_be_positive(self):
        kwargs = {**references.TINY_KWARGS, "sliding_window_size": 0}
        with pytest.raises(
            ValueError, match="use_sliding_window_attention=False"
        ):
            keras_gemma2.Gemma2Backbone(**kwargs)
