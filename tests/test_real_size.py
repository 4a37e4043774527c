"""What lets the real sizes run on a CPU, guarded cheaply on small models.

- JAX and TensorFlow on a CPU hold a bfloat16 backbone in float32, and the
  compiled decoding loop holds no copy of the weights beside them (JAX's
  `memory_analysis`);
- PyTorch stores kernels `[out, in]` (values and checkpoints unchanged),
  decodes bfloat16 without float32 copies of the weights, and its compiled
  GEMV gives transformers' greedy tokens;
- `from_preset(..., quantize=...)` equals loading, then quantizing.

`benchmarks/real_size.py` measures the 2B and 9B themselves.
"""

import os
from unittest import mock

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import backbone as backbone_lib
from keras_gemma2.layers import direct
from tests import references
from tests.harness import TestCase

BACKEND = keras.config.backend()
# Small enough to build in a second, with kernels that dwarf activations.
SMALL = {
    **references.TINY_KWARGS,
    "vocabulary_size": 512,
    "hidden_dim": 256,
    "intermediate_dim": 1024,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "query_pre_attn_scalar": 64,
}


def _weight_bytes(model):
    return sum(
        int(np.prod(v.shape)) * np.dtype(_numpy_dtype(v.dtype)).itemsize
        for v in model.weights
    )


def _numpy_dtype(dtype):
    return "float16" if dtype == "bfloat16" else dtype


def _lm(dtype="float32", seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_gemma2.Gemma2Backbone(**SMALL, dtype=dtype)
    lm = keras_gemma2.Gemma2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def _step_inputs(lm, batch=1, length=32, prompt=8):
    """Arguments of the engine's compiled decode loop (`generate`'s block
    of steps), rows at `prompt`."""
    from keras_gemma2 import sampling
    from keras_gemma2.generation import engine

    ids = references.random_token_ids(batch, 1, seed=1).astype("int32")
    params = [sampling.SamplingParams()] * batch
    arrays = sampling.stack(params, lm.backbone.vocabulary_size)
    arrays["uniform"] = np.zeros((engine.BLOCK_STEPS, batch), "float32")
    return (
        ids,
        np.full((batch,), prompt, "int32"),
        lm.backbone.init_cache(batch, length),
        arrays,
        np.full((batch,), length - prompt - 1, "int32"),
        np.full((batch, 4), -1, "int32"),
        np.int32(engine.BLOCK_STEPS),
    )


def _lower_step(lm):
    from keras_gemma2.generation import engine

    step = lm._engine_functions()["step"]
    return step.lower(*_step_inputs(lm), max_steps=engine.BLOCK_STEPS)


class XlaCpuDtypeTest(TestCase):
    @pytest.mark.skipif(BACKEND == "torch", reason="XLA backends only")
    def test_bfloat16_is_held_in_float32_on_a_cpu(self):
        lm = _lm("bfloat16")
        self.assertEqual(lm.backbone.dtype_policy.name, "float32")
        self.assertEqual(lm.backbone.token_embedding.variable_dtype, "float32")
        # Other policies are left alone.
        self.assertEqual(backbone_lib.xla_cpu_dtype("float32"), "float32")
        self.assertEqual(
            backbone_lib.xla_cpu_dtype("mixed_bfloat16"), "mixed_bfloat16"
        )
        with mock.patch.dict(
            os.environ, {"KERAS_GEMMA2_XLA_CPU_BFLOAT16": "keep"}
        ):
            kept = keras_gemma2.Gemma2Backbone(**SMALL, dtype="bfloat16")
        self.assertEqual(kept.dtype_policy.name, "bfloat16")

    @pytest.mark.skipif(BACKEND != "torch", reason="PyTorch keeps bfloat16")
    def test_torch_keeps_bfloat16(self):
        lm = _lm("bfloat16")
        self.assertEqual(lm.backbone.dtype_policy.name, "bfloat16")

    @pytest.mark.skipif(BACKEND != "jax", reason="JAX's memory_analysis")
    def test_compiled_decode_step_holds_no_copy_of_the_weights(self):
        # A bfloat16 model as loaded here (held in float32): the loop's
        # temporaries are a few activations, not a float32 copy of the
        # weights (which bfloat16 weights cost: 3.7x their bytes).
        for dtype in ("float32", "bfloat16"):
            lm = _lm(dtype)
            compiled = _lower_step(lm).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            weights = _weight_bytes(lm.backbone)
            print(f"{dtype}: step temporaries {temp / weights:.3f}x weights")
            self.assertLess(temp, 0.25 * weights)

    @pytest.mark.skipif(BACKEND != "jax", reason="JAX's memory_analysis")
    def test_guard_sees_a_float32_copy(self):
        # The guard can fail: bfloat16 weights kept (`keep`) make XLA:CPU
        # hoist float32 copies of them out of the loop.
        with mock.patch.dict(
            os.environ, {"KERAS_GEMMA2_XLA_CPU_BFLOAT16": "keep"}
        ):
            lm = _lm("bfloat16")
        compiled = _lower_step(lm).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        self.assertGreater(temp, 1.0 * _weight_bytes(lm.backbone))


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's kernel layout")
class TorchLayoutTest(TestCase):
    def test_kernels_are_stored_out_by_in_with_keras_shapes(self):
        hf = references.hf_model(seed=5)
        ours = references.our_twin(hf)
        block = ours.transformer_layers[0]
        query = block.attention.query._kernel.value
        # Keras' shape [n, d, h]; memory [n, h, d].
        self.assertEqual(tuple(query.shape), (4, 24, 8))
        self.assertTrue(query.permute(0, 2, 1).is_contiguous())
        self.assertTrue(block.ffw_linear._kernel.value.t().is_contiguous())
        # Values as loaded: the logits equal transformers'.
        ids = references.random_token_ids(1, 7, seed=2)
        logits = ours.logits(
            ours({"token_ids": ids, "padding_mask": np.ones_like(ids)})
        )
        expected = references.hf_logits(hf, ids)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(logits), expected, atol=1e-4
        )

    def test_layout_survives_saving_and_loading(self):
        lm = _lm(seed=3)
        path = os.path.join(self.get_temp_dir(), "preset")
        lm.backbone.save_to_preset(path)
        loaded = keras_gemma2.Gemma2Backbone.from_preset(path)
        for ours, theirs in zip(lm.backbone.weights, loaded.weights):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(ours),
                keras.ops.convert_to_numpy(theirs),
            )
        kernel = loaded.transformer_layers[1].ffw_gating._kernel.value
        self.assertTrue(kernel.t().is_contiguous())
        # Keras' torch layers track the new values, not the old ones.
        params = {id(p) for p in loaded.parameters()}
        self.assertIn(id(kernel), params)

    def test_bfloat16_decode_makes_no_float32_copy_of_the_weights(self):
        import torch
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile

        lm = _lm("bfloat16")
        backbone = lm.backbone
        ids = references.random_token_ids(1, 8, seed=4)
        with torch.no_grad(), direct.direct_calls():
            cache = backbone.init_cache(1, 16)
            _, cache = backbone.decode(backbone.embed(ids), cache, 0)
            x = backbone.embed(ids[:, -1:])
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True
            ) as prof:
                hidden, _ = backbone.decode(x, cache, 8)
                backbone.logits(hidden)
        largest = max(event.cpu_memory_usage for event in prof.key_averages())
        kernel = backbone.transformer_layers[0].ffw_gating._kernel.value
        kernel_bytes = kernel.numel() * kernel.element_size()
        print(f"largest allocation {largest} B, a kernel {kernel_bytes} B")
        # A float32 copy of a kernel would be twice its bfloat16 bytes.
        self.assertLess(largest, kernel_bytes)

    def test_compiled_gemv_gives_transformers_greedy_tokens(self):
        hf = references.hf_model(seed=6)
        lm = keras_gemma2.Gemma2CausalLM(
            backbone=references.our_twin(hf), preprocessor=None
        )
        lm.compile(sampler="greedy")
        # The kernel in float32 at every size (by default it takes only
        # large bfloat16 matrices), so that transformers' float32 greedy
        # tokens check it.
        with (
            mock.patch.dict(
                os.environ, {"KERAS_GEMMA2_TORCH_GEMV": "compiled"}
            ),
            mock.patch.object(direct, "_GEMV_ROWS", {"float32": 4}),
            mock.patch.object(direct, "_GEMV_MIN_WEIGHTS", 0),
        ):
            self.assertTrue(direct.use_compiled_gemv(lm))
            ids = references.random_token_ids(1, 5, seed=7)
            padded = np.zeros((1, 17), "int32")
            padded[:, :5] = ids
            outputs = lm.generate(
                {"token_ids": padded, "padding_mask": padded != 0},
                max_new_tokens=12,
                stop_token_ids=None,
            )
        expected = references.hf_greedy(hf, ids, 12)[0]
        np.testing.assert_array_equal(outputs["token_ids"][0], expected)

    def test_weight_only_int8_decodes_as_keras_computes_it(self):
        import torch

        lm = _lm(seed=11)
        lm.quantize(
            config=keras.quantizers.Int8QuantizationConfig(
                activation_quantizer=None
            )
        )
        backbone = lm.backbone
        ffw = backbone.transformer_layers[0].ffw_gating
        # Weight-only, stored [out, in].
        self.assertIsNone(ffw.inputs_quantizer)
        self.assertTrue(ffw._kernel.value.t().is_contiguous())
        ids = references.random_token_ids(1, 6, seed=12)
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        # The reference: Keras' own int8 layers (`Layer.__call__`).
        expected = keras.ops.convert_to_numpy(backbone.logits(backbone(inputs)))
        with mock.patch.dict(
            os.environ, {"KERAS_GEMMA2_TORCH_GEMV": "compiled"}
        ):
            with torch.no_grad(), direct.direct_calls(compiled_gemv=True):
                cache = backbone.init_cache(1, 8)
                _, cache = backbone.decode(backbone.embed(ids[:, :5]), cache, 0)
                hidden, _ = backbone.decode(
                    backbone.embed(ids[:, 5:]), cache, 5
                )
                step = backbone.logits(hidden)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(step)[:, 0],
            expected[:, 5],
            atol=1e-4,
            rtol=1e-4,
        )

    def test_gemv_switch_is_checked(self):
        with mock.patch.dict(os.environ, {"KERAS_GEMMA2_TORCH_GEMV": "fast"}):
            with self.assertRaisesRegex(ValueError, "'auto', 'compiled'"):
                direct.use_compiled_gemv(_lm())
        # The tiny model never pays for a compile.
        self.assertFalse(direct.use_compiled_gemv(_lm()))


class QuantizeWhileLoadingTest(TestCase):
    def _hf_folder(self):
        path = os.path.join(self.get_temp_dir(), "hf")
        references.hf_model(seed=8).save_pretrained(path)
        return path

    def test_equals_loading_then_quantizing(self):
        path = self._hf_folder()
        quantized = keras_gemma2.Gemma2Backbone.from_preset(
            path, quantize="int8"
        )
        expected = keras_gemma2.Gemma2Backbone.from_preset(path)
        expected.quantize("int8")
        modes = {
            layer.path: layer.quantization_mode
            for layer in quantized._flatten_layers()
            if backbone_lib.quantizable(layer)
        }
        self.assertEqual(set(modes.values()), {"int8"})
        self.assertEqual(len(modes), 1 + 7 * SMALL["num_layers"])
        ids = references.random_token_ids(1, 6, seed=9)
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(quantized(inputs)),
            keras.ops.convert_to_numpy(expected(inputs)),
        )

    def test_causal_lm_and_our_own_format(self):
        path = self._hf_folder()
        lm = keras_gemma2.Gemma2CausalLM.from_preset(
            path, preprocessor=None, quantize="int8"
        )
        self.assertEqual(
            lm.backbone.transformer_layers[0].ffw_linear.quantization_mode,
            "int8",
        )
        weight_only = keras.quantizers.Int8QuantizationConfig(
            activation_quantizer=None
        )
        own = keras_gemma2.Gemma2Backbone.from_preset(
            "gemma2_tiny_en", quantize=weight_only
        )
        self.assertEqual(own.token_embedding.quantization_mode, "int8")
        loaded = keras_gemma2.Gemma2Backbone.from_preset(
            path, quantize=weight_only
        )
        ffw = loaded.transformer_layers[0].ffw_gating
        self.assertIsNone(ffw.inputs_quantizer)

    def test_bad_modes_and_classes_are_refused(self):
        path = self._hf_folder()
        with self.assertRaisesRegex(ValueError, r"one of \('int8', 'int4'\)"):
            keras_gemma2.Gemma2Backbone.from_preset(path, quantize="int3")
        with self.assertRaisesRegex(ValueError, "applies to models"):
            keras_gemma2.Gemma2Tokenizer.from_preset(
                "gemma2_tiny_en", quantize="int8"
            )
