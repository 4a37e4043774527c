"""LoRA: targets and alpha, adapter files, merge/unmerge, bad input."""

import json
import os

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import lora
from tests import references
from tests.harness import TestCase


def _lm():
    return keras_gemma2.Gemma2CausalLM.from_preset(
        "gemma2_tiny_en", preprocessor=None
    )


def _train_adapters(backbone, seed=0):
    """Stands in for training: random values in every adapter matrix."""
    rng = np.random.default_rng(seed)
    for variable in lora.adapter_variables(backbone).values():
        variable.assign(
            rng.normal(0, 0.05, tuple(variable.shape)).astype("float32")
        )


def _logits(lm, token_ids):
    return keras.ops.convert_to_numpy(
        lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )


TOKENS = references.random_token_ids(2, 12, seed=3) * 40  # tiny preset ids


class EnableTest(TestCase):
    def test_targets_alpha_and_frozen_base(self):
        lm = _lm()
        lora.enable(lm.backbone, rank=2, alpha=8, targets="all")
        block = lm.backbone.transformer_layers[0]
        layers = [
            block.attention.query,
            block.attention.key,
            block.attention.value,
            block.attention.attention_output,
            block.ffw_gating,
            block.ffw_gating_2,
            block.ffw_linear,
        ]
        self.assertTrue(all(layer.lora_enabled for layer in layers))
        self.assertEqual(layers[0].lora_alpha, 8)
        trainable = {v.path for v in lm.backbone.trainable_variables}
        self.assertEqual(trainable, set(lora.adapter_variables(lm.backbone)))
        self.assertEqual(len(trainable), 6 * 7 * 2)

    def test_default_targets_are_query_and_value(self):
        lm = _lm()
        lora.enable(lm.backbone, rank=2)
        names = {p.split("/")[-2] for p in lora.adapter_variables(lm.backbone)}
        self.assertEqual(names, {"query", "value"})

    def test_alpha_scales_the_adapter_output(self):
        # alpha 4 at rank 2 doubles the adapter's effect of alpha 2.
        outputs = []
        for alpha in (2, 4):
            lm = _lm()
            lora.enable(lm.backbone, rank=2, alpha=alpha)
            _train_adapters(lm.backbone)
            attention = lm.backbone.transformer_layers[0].attention
            base = keras.ops.convert_to_numpy(attention.query._kernel)
            outputs.append(
                keras.ops.convert_to_numpy(attention.query.kernel) - base
            )
        np.testing.assert_allclose(outputs[1], 2 * outputs[0], atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "`rank` must be an int of at least 1; got 0"),
        ({"rank": -2}, "`rank` must be an int of at least 1; got -2"),
        ({"rank": 1.5}, "`rank` must be an int of at least 1; got 1.5"),
        ({"rank": True}, "`rank` must be an int of at least 1; got True"),
        ({"rank": 2, "alpha": 0}, "`alpha` must be a number above 0"),
        ({"rank": 2, "alpha": -4.0}, "`alpha` must be a number above 0"),
        ({"rank": 2, "dropout": 1.0}, r"`dropout` must be in \[0, 1\)"),
        ({"rank": 2, "dropout": -0.1}, r"`dropout` must be in \[0, 1\)"),
        (
            {"rank": 2, "targets": ["q_proj"]},
            r"Unknown LoRA targets \['q_proj'\]: choose among \('query'",
        ),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    backbone = _lm().backbone
    trainable = [v.path for v in backbone.trainable_variables]
    with pytest.raises(ValueError, match=match):
        lora.enable(backbone, **kwargs)
    # Refused before anything changed: no adapters, nothing frozen.
    assert not lora.adapter_variables(backbone)
    assert [v.path for v in backbone.trainable_variables] == trainable


@pytest.mark.parametrize("rank", [0, -1, 2.0])
def test_keras_hub_enable_lora_refuses_a_bad_rank(rank):
    backbone = _lm().backbone
    trainable = [v.path for v in backbone.trainable_variables]
    with pytest.raises(ValueError, match="`rank` must be an int of at least"):
        backbone.enable_lora(rank=rank)
    assert [v.path for v in backbone.trainable_variables] == trainable


class AdapterFileTest(TestCase):
    def test_save_load_onto_a_fresh_base_and_merge(self):
        tuned = _lm()
        lora.enable(tuned.backbone, rank=2, alpha=4, targets=("query", "key"))
        _train_adapters(tuned.backbone)
        expected = _logits(tuned, TOKENS)
        path = os.path.join(self.get_temp_dir(), "a", "adapters.safetensors")
        lora.save_adapters(tuned.backbone, path)
        # Only adapters: a small fraction of the model.
        self.assertLess(os.path.getsize(path), 0.05 * 14e6)

        fresh = _lm()
        self.assertGreater(
            np.abs(_logits(fresh, TOKENS) - expected).max(), 1e-3
        )
        lora.load_adapters(fresh.backbone, path)
        np.testing.assert_allclose(_logits(fresh, TOKENS), expected, atol=1e-5)

        lora.merge(fresh.backbone)
        self.assertFalse(
            fresh.backbone.transformer_layers[0].attention.query.lora_enabled
        )
        np.testing.assert_allclose(_logits(fresh, TOKENS), expected, atol=1e-5)
        lora.unmerge(fresh.backbone)
        np.testing.assert_allclose(_logits(fresh, TOKENS), expected, atol=1e-5)
        base = _logits(_lm(), TOKENS)
        for variable in lora.adapter_variables(fresh.backbone).values():
            if variable.path.endswith("lora_kernel_b"):
                variable.assign(np.zeros(tuple(variable.shape), "float32"))
        # With zero adapters the unmerged kernels are the base ones again.
        np.testing.assert_allclose(_logits(fresh, TOKENS), base, atol=1e-5)

    def test_keys_are_weight_paths(self):
        from safetensors import safe_open

        lm = _lm()
        lora.enable(lm.backbone, rank=2)
        path = os.path.join(self.get_temp_dir(), "adapters.safetensors")
        lora.save_adapters(lm.backbone, path)
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
            metadata = f.metadata()
        self.assertIn("decoder_block_3/attention/value/lora_kernel_b", keys)
        self.assertEqual(json.loads(metadata["targets"]), ["query", "value"])

    def test_adapters_for_another_architecture_are_refused(self):
        lm = _lm()
        lora.enable(lm.backbone, rank=2)
        path = os.path.join(self.get_temp_dir(), "adapters.safetensors")
        lora.save_adapters(lm.backbone, path)
        other = keras_gemma2.Gemma2Backbone(**references.TINY_KWARGS)
        with pytest.raises(
            ValueError,
            match="another architecture: "
            "vocabulary_size 4096 \\(adapters\\) != 97",
        ):
            lora.load_adapters(other, path)
        self.assertFalse(getattr(other, "_lora_enabled_layers", None))

    def test_a_mismatched_rank_changes_nothing(self):
        trained = _lm()
        lora.enable(trained.backbone, rank=2)
        _train_adapters(trained.backbone)
        path = os.path.join(self.get_temp_dir(), "adapters.safetensors")
        lora.save_adapters(trained.backbone, path)
        target = _lm()
        lora.enable(target.backbone, rank=3)
        before = {
            k: keras.ops.convert_to_numpy(v)
            for k, v in lora.adapter_variables(target.backbone).items()
        }
        with pytest.raises(ValueError, match="shape \\(.*\\) in the file"):
            lora.load_adapters(target.backbone, path)
        for name, variable in lora.adapter_variables(target.backbone).items():
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), before[name]
            )

    def test_not_an_adapter_file_is_a_clear_error(self):
        path = os.path.join(self.get_temp_dir(), "x.safetensors")
        with open(path, "wb") as f:
            f.write(b"not safetensors")
        with pytest.raises(ValueError, match="not a safetensors adapter"):
            lora.load_adapters(_lm().backbone, path)
        with pytest.raises(FileNotFoundError):
            lora.load_adapters(_lm().backbone, path + ".missing")

    def test_saving_without_adapters_is_a_clear_error(self):
        with pytest.raises(ValueError, match="no LoRA adapters"):
            lora.save_adapters(_lm().backbone, "x.safetensors")


class MergedSaveTest(TestCase):
    def test_saving_a_merged_model_is_refused_and_unmerged_round_trips(self):
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        lora.enable(lm.backbone, rank=2)
        _train_adapters(lm.backbone)
        expected = _logits(lm, TOKENS)
        lora.merge(lm.backbone)
        path = os.path.join(self.get_temp_dir(), "preset")
        with pytest.raises(ValueError, match="add them twice"):
            lm.save_to_preset(path)
        self.assertFalse(os.path.exists(path))
        lora.unmerge(lm.backbone)
        lm.save_to_preset(path)
        loaded = keras_gemma2.Gemma2CausalLM.from_preset(path)
        np.testing.assert_allclose(_logits(loaded, TOKENS), expected, atol=1e-5)
