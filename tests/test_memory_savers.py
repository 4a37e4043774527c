"""int8 quantization with LoRA, bfloat16 mixed precision, gradient
accumulation and LoRA dropout: the memory savers of fine-tuning."""

import functools
import os
import tempfile

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import lora
from tests import references
from tests.harness import TestCase

TOKENS = references.random_token_ids(2, 12, seed=5) * 40  # tiny preset ids


def _lm(**kwargs):
    return keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en", **kwargs)


def _deterministic_lm(**kwargs):
    """The tiny preset without its training dropout (0.1)."""
    backbone = keras_gemma2.Gemma2Backbone.from_preset(
        "gemma2_tiny_en", dropout=0.0, **kwargs
    )
    preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_en"
    )
    return keras_gemma2.Gemma2CausalLM(backbone, preprocessor)


def _lm_for_lora(mode=None, config=None):
    """The deterministic tiny preset, quantized if asked, with rank-4
    adapters on every target, compiled for 8 steps of `_train`."""
    keras.utils.set_random_seed(0)
    lm = _deterministic_lm()
    if mode is not None or config is not None:
        lm.quantize(mode, config=config)
    lora.enable(lm.backbone, rank=4, targets="all")
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    lm.preprocessor.sequence_length = 16
    return lm


def _train(lm):
    """The loss drop over 8 steps on two short texts."""
    texts = ["the tokenizer reads a stream", "of characters and words"]
    losses = [
        lm.train_on_batch(texts, return_dict=True)["loss"] for _ in range(8)
    ]
    return float(losses[0]) - float(losses[-1])


@functools.lru_cache(maxsize=None)
def _float_lora_loss_drop():
    """`_train`'s drop with a float32 base: the baseline both int8 tests
    compare with, trained once per process."""
    return _train(_lm_for_lora())


def _inputs(token_ids):
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def _weight_bytes(model):
    return sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        for v in model.weights
    )


def _fit(lm, texts, **kwargs):
    lm.preprocessor.sequence_length = 16
    return lm.fit(texts, batch_size=2, verbose=0, **kwargs).history["loss"]


class QuantizeTest(TestCase):
    def test_int8_logits_stay_close_to_transformers_float(self):
        hf = references.hf_model(seed=2)
        ids = references.random_token_ids(2, 11, seed=4)
        expected = references.hf_logits(hf, ids)
        backbone = references.our_twin(hf)
        backbone.quantize("int8")
        self.assertEqual(
            backbone.transformer_layers[0].attention.query.quantization_mode,
            "int8",
        )
        self.assertEqual(backbone.token_embedding.quantization_mode, "int8")
        got = _numpy(backbone.logits(backbone(_inputs(ids))))
        error = np.abs(got - expected).max()
        print(f"int8 vs transformers float32: max |logit diff| {error:.4f}")
        # Rounded weights move the logits, but only a little.
        self.assertGreater(error, 0.0)
        self.assertLess(error, 0.05 * np.abs(expected).max())

    def test_quantized_model_generates_saves_and_is_smaller(self):
        lm = _lm()
        float_bytes = _weight_bytes(lm.backbone)
        expected = _numpy(lm(_inputs(TOKENS)))
        lm.quantize("int8")
        int8_bytes = _weight_bytes(lm.backbone)
        print(f"tiny preset weights: {float_bytes} -> {int8_bytes} bytes")
        self.assertLess(int8_bytes, float_bytes / 3.5)
        got = _numpy(lm(_inputs(TOKENS)))
        self.assertLess(np.abs(got - expected).max(), 0.05 * 30)
        text = lm.generate("The tokenizer", max_new_tokens=6)
        path = os.path.join(tempfile.mkdtemp(), "int8")
        lm.save_to_preset(path)
        reloaded = keras_gemma2.Gemma2CausalLM.from_preset(path)
        np.testing.assert_array_equal(_numpy(reloaded(_inputs(TOKENS))), got)
        # The reloaded layers hold a DTypePolicyMap; generation must see
        # their int8 kernels as int8 (torch's direct calls once did not).
        self.assertEqual(
            reloaded.generate("The tokenizer", max_new_tokens=6), text
        )

    @pytest.mark.long
    def test_lora_on_int8_learns_like_float(self):
        # Keras' int8 output head gave the hidden states no gradient, so
        # adapters below it barely moved (loss flat); ours passes the
        # straight-through gradient.
        self._lora_on_int8_learns_like_float(config=None)

    @pytest.mark.long
    def test_lora_on_weight_only_int8_learns_like_float(self):
        # Keras 3.15's weight-only int8 backward on torch adjusted the scale
        # twice (a shape error); `Gemma2EinsumDense` computes it once.
        self._lora_on_int8_learns_like_float(
            config=keras.quantizers.Int8QuantizationConfig(
                activation_quantizer=None
            )
        )

    def _lora_on_int8_learns_like_float(self, config):
        lm = _lm_for_lora("int8" if config is None else None, config)
        before = {v.path: _numpy(v) for v in lm.backbone.weights}
        drops = {"float32": _float_lora_loss_drop(), "int8": _train(lm)}
        # Only the adapters moved; the int8 kernels and scales did not.
        for v in lm.backbone.weights:
            changed = not np.array_equal(before[v.path], _numpy(v))
            self.assertEqual(changed, "lora_kernel" in v.path, v.path)
        self.assertTrue(lm.generate("The tokenizer", max_new_tokens=4))
        print(f"loss drop over 8 steps: {drops}")
        self.assertGreater(drops["float32"], 0.1)
        self.assertGreater(drops["int8"], 0.8 * drops["float32"])

    def test_merge_into_int8_and_float16_are_refused(self):
        lm = _lm()
        lm.quantize("int8")
        lora.enable(lm.backbone, rank=2)
        with self.assertRaisesRegex(ValueError, "quantized"):
            lora.merge(lm.backbone)
        half = keras_gemma2.Gemma2Backbone.from_preset(
            "gemma2_tiny_en", dtype="float16"
        )
        with self.assertRaisesRegex(ValueError, "float16"):
            half.quantize("int8")


class MixedPrecisionTest(TestCase):
    def test_mixed_bfloat16_keeps_float32_weights_and_trains(self):
        keras.utils.set_random_seed(0)
        expected = _numpy(_lm()(_inputs(TOKENS)))
        lm = _deterministic_lm(dtype="mixed_bfloat16")
        block = lm.backbone.transformer_layers[0]
        self.assertEqual(block.attention.query.kernel.dtype, "float32")
        self.assertEqual(block.attention.query.compute_dtype, "bfloat16")
        got = _numpy(lm(_inputs(TOKENS)))
        error = np.abs(got - expected).max()
        print(f"mixed_bfloat16 vs float32: max |logit diff| {error:.4f}")
        self.assertLess(error, 0.5)
        lora.enable(lm.backbone, rank=2)
        lm.compile(optimizer=keras.optimizers.Adam(2e-2))
        losses = _fit(lm, ["the tokenizer reads", "a stream of text"], epochs=5)
        print(f"mixed_bfloat16 LoRA losses: {losses}")
        self.assertLess(losses[-1], 0.9 * losses[0])


class GradientAccumulationTest(TestCase):
    def test_two_accumulated_half_batches_equal_one_batch(self):
        texts = ["the cat sat", "the dog ran", "a cat ran", "a dog sat"]
        lengths = {len(_lm().preprocessor.tokenizer(t)) for t in texts}
        self.assertEqual(len(lengths), 1)  # equal weights per half batch
        results = []
        for batch_size, steps in ((4, None), (2, 2)):
            lm = _deterministic_lm()
            lora.enable(lm.backbone, rank=2)
            for v in lora.adapter_variables(lm.backbone).values():
                v.assign(np.full(tuple(v.shape), 0.01, "float32"))
            lm.compile(
                optimizer=keras.optimizers.SGD(
                    0.5, gradient_accumulation_steps=steps
                )
            )
            lm.preprocessor.sequence_length = 8
            lm.fit(texts, batch_size=batch_size, shuffle=False, verbose=0)
            results.append(
                {
                    k: _numpy(v)
                    for k, v in lora.adapter_variables(lm.backbone).items()
                }
            )
        for name, value in results[0].items():
            self.assertFalse(np.allclose(value, 0.01), name)  # it trained
            np.testing.assert_allclose(results[1][name], value, atol=1e-6)


class LoraDropoutTest(TestCase):
    def test_dropout_reaches_only_the_adapters_input(self):
        backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        hidden = backbone.hidden_dim
        lora.enable(
            backbone, rank=hidden, alpha=hidden, targets="ffw_gating",
            dropout=0.5, seed=3,
        )  # fmt: skip
        layer = backbone.transformer_layers[0].ffw_gating
        rng = np.random.default_rng(0)
        b = rng.normal(size=(hidden, layer.kernel.shape[-1])).astype("float32")
        layer.lora_kernel_a.assign(np.eye(hidden, dtype="float32"))
        layer.lora_kernel_b.assign(b)
        x = rng.normal(size=(2, 3, hidden)).astype("float32")
        base = x @ _numpy(layer._kernel)
        # Inference: base + x @ a @ b, no dropout.
        np.testing.assert_allclose(
            _numpy(layer(x, training=False)), base + x @ b, atol=1e-3
        )
        # Training: base + dropout(x) @ b, with dropout(x) in {0, 2x}.
        first = _numpy(layer(x, training=True))
        dropped = (first - base) @ np.linalg.pinv(b)
        kept = np.isclose(dropped, 2 * x, atol=1e-3)
        zeroed = np.isclose(dropped, 0, atol=1e-3)
        self.assertTrue((kept | zeroed).all())
        self.assertTrue(0.35 < zeroed.mean() < 0.65)
        second = _numpy(layer(x, training=True))
        self.assertFalse(np.allclose(first, second))  # a fresh mask

    def test_dropout_is_saved_with_the_adapters(self):
        backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        lora.enable(backbone, rank=2, dropout=0.1)
        path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        lora.save_adapters(backbone, path)
        fresh = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        lora.load_adapters(fresh, path)
        layer = fresh.transformer_layers[0].attention.query
        self.assertEqual(layer.lora_dropout, 0.1)
        with self.assertRaisesRegex(ValueError, "dropout"):
            lora.enable(
                keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en"),
                rank=2,
                dropout=1.0,
            )
