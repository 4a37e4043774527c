"""export_to_transformers: what transformers loads back from our export.

Every check compares with transformers itself: the original random HF model
our twin was copied from, or HF's own tokenizer reading the exported files.
"""

import json
import os
import shutil
import tempfile
from unittest import mock

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import atomic
from tests import references
from tests.harness import TestCase


def _tmp(test):
    folder = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _twin_lm(seed=0, **kwargs):
    """(original HF model, our Gemma2CausalLM with its weights)."""
    hf = references.hf_model(seed=seed)
    backbone = references.our_twin(hf, **kwargs)
    return hf, keras_gemma2.Gemma2CausalLM(backbone, preprocessor=None)


def _hf_from(path, **kwargs):
    import transformers

    return transformers.Gemma2ForCausalLM.from_pretrained(
        path, attn_implementation="eager", **kwargs
    ).eval()


def _our_logits(lm, token_ids):
    logits = lm(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    )
    return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))


def _safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        return sorted(f.keys())


class ParityWithTransformersTest(TestCase):
    def test_export_reloads_as_the_original_transformers_model(self):
        # Sequence 11 > window 4; query scalar 5 != head_dim 8; 4 * 8 != 24.
        hf, lm = _twin_lm()
        path = lm.export_to_transformers(os.path.join(_tmp(self), "out"))
        reloaded = _hf_from(path)
        token_ids = references.random_token_ids()
        expected = references.hf_logits(hf, token_ids)
        actual = references.hf_logits(reloaded, token_ids)
        self.assertLess(np.abs(actual - expected).max(), 1e-5)
        # float32 round trip: every weight comes back bit for bit.
        original, restored = hf.state_dict(), reloaded.state_dict()
        self.assertEqual(sorted(original), sorted(restored))
        for key, value in original.items():
            np.testing.assert_array_equal(
                restored[key].numpy(), value.numpy(), err_msg=key
            )
        # Tied embeddings: no separate output matrix in the file.
        self.assertNotIn("lm_head.weight", _safetensors_keys(path))

    def test_comparison_can_fail(self):
        # A wrong query scale in our model is exported and shows in HF.
        hf, lm = _twin_lm(query_pre_attn_scalar=8)
        path = lm.export_to_transformers(os.path.join(_tmp(self), "out"))
        token_ids = references.random_token_ids()
        self.assertGreater(
            np.abs(
                references.hf_logits(_hf_from(path), token_ids)
                - references.hf_logits(hf, token_ids)
            ).max(),
            1e-2,
        )

    def test_bfloat16_export_equals_the_rounded_original(self):
        import torch

        hf, lm = _twin_lm()
        expected = hf.to(torch.bfloat16).state_dict()
        # A float32 model exported as bf16, and a bf16 model by default
        # (kept in bfloat16 on XLA:CPU too, see Gemma2Backbone).
        keep = {"KERAS_GEMMA2_XLA_CPU_BFLOAT16": "keep"}
        with mock.patch.dict(os.environ, keep):
            bf16_backbone = keras_gemma2.Gemma2Backbone(
                **references.TINY_KWARGS, dtype="bfloat16"
            )
        for variable, value in zip(
            bf16_backbone.weights, lm.backbone.get_weights()
        ):
            variable.assign(value)
        bf16_lm = keras_gemma2.Gemma2CausalLM(bf16_backbone)
        folder = _tmp(self)
        for name, model, dtype in (
            ("cast", lm, "bfloat16"),
            ("native", bf16_lm, None),
        ):
            path = model.export_to_transformers(
                os.path.join(folder, name), dtype=dtype
            )
            with open(os.path.join(path, "config.json")) as f:
                self.assertEqual(json.load(f)["torch_dtype"], "bfloat16")
            reloaded = _hf_from(path)
            self.assertEqual(reloaded.dtype, torch.bfloat16)
            restored = reloaded.state_dict()
            for key, value in expected.items():
                self.assertEqual(restored[key].dtype, torch.bfloat16)
                self.assertTrue(
                    torch.equal(restored[key], value), f"{name}: {key}"
                )


class ConfigTest(TestCase):
    def test_config_json_has_every_gemma2_field(self):
        import transformers

        _, lm = _twin_lm()
        path = lm.export_to_transformers(os.path.join(_tmp(self), "out"))
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        self.assertEqual(config["model_type"], "gemma2")
        self.assertEqual(config["architectures"], ["Gemma2ForCausalLM"])
        self.assertEqual(config["torch_dtype"], "float32")
        # As transformers reads it, equal to the reference's own config.
        loaded = transformers.AutoConfig.from_pretrained(path)
        reference = references.hf_config()
        for key in (
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "sliding_window",
            "query_pre_attn_scalar",
            "layer_types",
            "head_dim",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "vocab_size",
            "hidden_activation",
            "rms_norm_eps",
            "tie_word_embeddings",
        ):
            self.assertEqual(getattr(loaded, key), getattr(reference, key), key)
        self.assertEqual(
            loaded.layer_types,
            ["sliding_attention", "full_attention", "sliding_attention"],
        )
        self.assertEqual(loaded.query_pre_attn_scalar, 5)
        self.assertNotEqual(loaded.query_pre_attn_scalar, loaded.head_dim)

    def test_generation_config_stops_at_end_of_turn(self):
        import transformers

        _, lm = _twin_lm()
        path = lm.export_to_transformers(os.path.join(_tmp(self), "out"))
        generation = transformers.GenerationConfig.from_pretrained(path)
        self.assertEqual(generation.eos_token_id, [1, 107])
        self.assertEqual(generation.bos_token_id, 2)
        self.assertEqual(generation.pad_token_id, 0)

    def test_all_global_layers(self):
        _, lm = _twin_lm(use_sliding_window_attention=False)
        path = lm.export_to_transformers(os.path.join(_tmp(self), "out"))
        self.assertEqual(
            _hf_from(path).config.layer_types, ["full_attention"] * 3
        )


class LoraTest(TestCase):
    def test_lora_is_merged_into_the_export(self):
        _, lm = _twin_lm()
        folder = _tmp(self)
        before = lm.export_to_transformers(os.path.join(folder, "before"))
        lm.backbone.enable_lora(rank=2)
        rng = np.random.default_rng(0)
        lora_layers = [
            layer
            for layer in lm.backbone._flatten_layers()
            if getattr(layer, "lora_enabled", False)
        ]
        self.assertLen(lora_layers, 6)  # query and value of 3 blocks
        for layer in lora_layers:
            b = layer.lora_kernel_b
            b.assign(rng.normal(0.0, 0.3, b.shape).astype("float32"))
        after = lm.export_to_transformers(os.path.join(folder, "after"))

        token_ids = references.random_token_ids()
        ours = _our_logits(lm, token_ids)
        exported = references.hf_logits(_hf_from(after), token_ids)
        self.assertLess(np.abs(exported - ours).max(), 1e-4)
        # The adapters changed the export (the base kernels alone did not).
        unmerged = references.hf_logits(_hf_from(before), token_ids)
        self.assertGreater(np.abs(exported - unmerged).max(), 1e-2)
        # Same tensors, no adapter keys.
        self.assertEqual(_safetensors_keys(after), _safetensors_keys(before))

    def test_lora_on_other_kernels_and_the_tied_embedding(self):
        _, lm = _twin_lm(seed=2)
        lm.backbone.enable_lora(
            rank=2,
            target_layer_names=[
                "token_embedding",
                "key",
                "attention_output",
                "ffw_gating",
                "ffw_linear",
            ],
        )
        rng = np.random.default_rng(1)
        count = 0
        for layer in lm.backbone._flatten_layers():
            if getattr(layer, "lora_enabled", False):
                b = getattr(layer, "lora_kernel_b", None)
                if b is None:
                    b = layer.lora_embeddings_b
                b.assign(rng.normal(0.0, 0.3, b.shape).astype("float32"))
                count += 1
        self.assertEqual(count, 13)  # 4 kernels in 3 blocks + embedding
        path = lm.export_to_transformers(os.path.join(_tmp(self), "out"))
        token_ids = references.random_token_ids(seed=2)
        self.assertLess(
            np.abs(
                references.hf_logits(_hf_from(path), token_ids)
                - _our_logits(lm, token_ids)
            ).max(),
            1e-4,
        )


# Hand-picked strings: chat turns, non-ASCII, whitespace, digits, code.
_STRINGS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "Hello world",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "two  spaces",
    "The tokenizer reads a stream of characters.",
    "<start_of_turn>user\nWhat is a list?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>model\nA list is a sequence.<end_of_turn>",
    "<start_of_turn><end_of_turn>",
    "x<end_of_turn>y",
    "<start_of_turn>user\n日本語で答えて<end_of_turn>\n",
    "café",
    "naïve résumé",
    "über Müller Straße",
    "日本語",
    "中文字符",
    "한국어",
    "Привет, мир",
    "مرحبا",
    "🤗",
    "👍🏽 emoji 🎉🎉",
    "a\u200bb",  # zero-width space
    "é ü 日本語 🤗",
    "0",
    "42",
    "1234567890",
    "3.14159",
    "1,000,000",
    "2024-08-01",
    "0x1F",
    "def f(x):\n    return x + 1\n",
    "if a:\n\tb()\n",
    "    four spaces",
    "        eight spaces",
    "line one\nline two\r\nline three",
    "for i in range(10):\n    print(i)",
    "x = {'a': [1, 2, 3]}",
    "~!@#$%^&*()_+-=[]{}|;':\",./<>?",
    "<not_a_token>",
    "<start_of_turn",
    "end_of_turn>",
    "ALL CAPS TEXT",
    "MiXeD CaSe",
    "a" * 50,
    "🤗" * 5,
]
# Control tokens written as text: SentencePiece (ours) spells them out,
# HF parses them as special ids unless `split_special_tokens=True`.
_CONTROL_TEXT = ["<bos>hi", "a<eos>b", "<pad><unk>", "x <bos> y"]
_FRAGMENTS = [
    "the",
    " tokenizer",
    " é",
    "ü",
    " 日本",
    "語",
    " 🤗",
    "  ",
    "\n",
    "\t",
    "    ",
    " 123",
    "4567",
    "<start_of_turn>",
    "<end_of_turn>",
    "user\n",
    "model\n",
    ".",
    ",",
    " Python",
    "def",
    "(x)",
    " café",
    " Ωμέγα",
    "🎉",
    "0",
]


def _strings(count=200, seed=0):
    rng = np.random.default_rng(seed)
    strings = list(_STRINGS)
    while len(strings) < count:
        pieces = rng.choice(_FRAGMENTS, size=rng.integers(1, 9))
        strings.append("".join(pieces))
    return strings


class TokenizerTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import transformers

        cls.folder = tempfile.mkdtemp()
        cls.lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        cls.path = cls.lm.export_to_transformers(
            os.path.join(cls.folder, "out")
        )
        cls.hf = transformers.AutoTokenizer.from_pretrained(cls.path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)
        super().tearDownClass()

    def _ours(self, text):
        ids = self.lm.preprocessor.tokenizer(text)
        return [int(i) for i in np.asarray(ids).reshape(-1)]

    def test_files_and_special_tokens(self):
        files = sorted(os.listdir(self.path))
        self.assertEqual(
            files,
            [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "special_tokens_map.json",
                "tokenizer.model",
                "tokenizer_config.json",
            ],
        )
        with open(os.path.join(self.path, "tokenizer.model"), "rb") as f:
            self.assertEqual(f.read(), self.lm.preprocessor.tokenizer.proto)
        hf = self.hf
        self.assertEqual(
            (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id),
            (0, 1, 2),
        )
        self.assertEqual(hf.unk_token_id, 3)
        self.assertEqual(
            hf.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]),
            [106, 107],
        )
        self.assertEqual(
            len(hf), self.lm.preprocessor.tokenizer.vocabulary_size()
        )

    def test_encodings_match_on_200_strings(self):
        strings = _strings()
        self.assertGreaterEqual(len(strings), 200)
        for text in strings:
            ours = self._ours(text)
            theirs = self.hf(text, add_special_tokens=False)["input_ids"]
            self.assertEqual(theirs, ours, repr(text))
            # HF adds <bos> by itself, as our preprocessor does.
            self.assertEqual(self.hf(text)["input_ids"], [2] + ours)
            # And decodes back to the same text as ours.
            self.assertEqual(self.hf.decode(ours), text, repr(text))

    def test_preprocessor_ids_match_hf_with_special_tokens(self):
        strings = _strings()[:60]
        batch = self.lm.preprocessor.generate_preprocess(
            strings, sequence_length=64
        )
        token_ids = keras.ops.convert_to_numpy(batch["token_ids"])
        mask = keras.ops.convert_to_numpy(batch["padding_mask"]).astype(bool)
        for text, ids, keep in zip(strings, token_ids, mask):
            self.assertEqual(
                self.hf(text)["input_ids"], ids[keep].tolist(), repr(text)
            )

    def test_control_token_text_is_spelled_out_like_sentencepiece(self):
        for text in _CONTROL_TEXT:
            theirs = self.hf(
                text, add_special_tokens=False, split_special_tokens=True
            )["input_ids"]
            self.assertEqual(theirs, self._ours(text), repr(text))

    def test_exported_tiny_preset_matches_our_logits(self):
        token_ids = np.array([self.hf("The tokenizer reads text.").input_ids])
        token_ids = token_ids.astype("int32")
        ours = _our_logits(self.lm, token_ids)
        theirs = references.hf_logits(_hf_from(self.path), token_ids)
        self.assertLess(np.abs(theirs - ours).max(), 1e-4)


class AtomicWriteTest(TestCase):
    def test_refuses_a_non_empty_folder(self):
        _, lm = _twin_lm()
        path = os.path.join(_tmp(self), "out")
        os.makedirs(path)
        with open(os.path.join(path, "keep.txt"), "w") as f:
            f.write("mine")
        with pytest.raises(ValueError, match="overwrite=True"):
            lm.export_to_transformers(path)
        self.assertEqual(os.listdir(path), ["keep.txt"])
        # overwrite=True replaces the folder, and leaves no sibling behind.
        lm.export_to_transformers(path, overwrite=True)
        self.assertNotIn("keep.txt", os.listdir(path))
        self.assertIn("model.safetensors", os.listdir(path))
        self.assertEqual(os.listdir(os.path.dirname(path)), ["out"])
        _hf_from(path)

    def test_an_empty_folder_is_fine(self):
        _, lm = _twin_lm()
        path = os.path.join(_tmp(self), "out")
        os.makedirs(path)
        lm.export_to_transformers(path)
        self.assertIn("config.json", os.listdir(path))

    def test_refuses_a_file(self):
        _, lm = _twin_lm()
        path = os.path.join(_tmp(self), "out")
        with open(path, "w") as f:
            f.write("x")
        with pytest.raises(ValueError, match="not a folder"):
            lm.export_to_transformers(path, overwrite=True)

    def test_unexportable_model_writes_nothing(self):
        backbone = keras_gemma2.Gemma2Backbone(
            **references.TINY_KWARGS, use_post_ffw_norm=False
        )
        lm = keras_gemma2.Gemma2CausalLM(backbone)
        folder = _tmp(self)
        path = os.path.join(folder, "out")
        with pytest.raises(ValueError, match="use_post_ffw_norm=False"):
            lm.export_to_transformers(path)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(os.listdir(folder), [])

    def test_unsupported_dtype(self):
        _, lm = _twin_lm()
        folder = _tmp(self)
        with pytest.raises(ValueError, match="float16 overflows"):
            lm.export_to_transformers(
                os.path.join(folder, "out"), dtype="float16"
            )
        self.assertEqual(os.listdir(folder), [])

    def test_failure_mid_write_leaves_the_target_as_it_was(self):
        # The export writes through `atomic.staged_folder`; an error raised
        # halfway through its body (here, by the test itself) must leave
        # the target untouched, new or already exported.
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        folder = _tmp(self)
        path = os.path.join(folder, "out")
        with pytest.raises(RuntimeError, match="disk full"):
            with atomic.staged_folder(path, "export") as staging:
                with open(os.path.join(staging, "config.json"), "w") as f:
                    f.write("{")
                raise RuntimeError("disk full")
        self.assertEqual(os.listdir(folder), [])

        lm.export_to_transformers(path)
        before = {
            name: open(os.path.join(path, name), "rb").read()
            for name in os.listdir(path)
        }
        with pytest.raises(RuntimeError, match="disk full"):
            with atomic.staged_folder(path, "export") as staging:
                with open(os.path.join(staging, "config.json"), "w") as f:
                    f.write("{")
                raise RuntimeError("disk full")
        self.assertEqual(os.listdir(folder), ["out"])
        after = {
            name: open(os.path.join(path, name), "rb").read()
            for name in os.listdir(path)
        }
        self.assertEqual(after, before)
