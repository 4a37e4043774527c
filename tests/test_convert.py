"""Loading Hugging Face and KerasHub Gemma 2 checkpoints through from_preset."""

import json
import os
import shutil
from unittest import mock

import keras
import numpy as np
import pytest
import sentencepiece as spm

import keras_gemma2
from keras_gemma2 import architectures
from keras_gemma2 import presets  # noqa: F401
from keras_gemma2.convert import names
from tests import references
from tests.harness import TestCase

IDS = np.array([[2, 5, 9, 11, 40, 3, 7, 8, 9, 10, 12, 50, 61]], "int32")


def _logits(model, token_ids=IDS):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return keras.ops.convert_to_numpy(model(inputs))


class HuggingFaceCheckpointTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.hf = references.hf_model(seed=4)

    def _save(self, **kwargs):
        path = os.path.join(self.get_temp_dir(), "hf")
        self.hf.save_pretrained(path, **kwargs)
        return path

    def test_single_file_matches_transformers(self):
        lm = keras_gemma2.Gemma2CausalLM.from_preset(
            self._save(), preprocessor=None
        )
        expected = references.hf_logits(self.hf, IDS)
        self.assertLess(np.abs(_logits(lm) - expected).max(), 1e-4)
        self.assertEqual(lm.backbone.query_pre_attn_scalar, 5)
        # Same greedy continuation, past the window of 4.
        prompt = {"token_ids": np.pad(IDS[:, :5], [(0, 0), (0, 8)])}
        prompt["padding_mask"] = (np.arange(13) < 5)[None].astype("int32")
        ours = lm.generate(prompt, stop_token_ids=None)["token_ids"]
        theirs = references.hf_greedy(self.hf, IDS[:, :5], 8)
        np.testing.assert_array_equal(ours, theirs)

    def test_sharded_checkpoint_matches_transformers(self):
        path = self._save(max_shard_size="20KB")
        shards = [f for f in os.listdir(path) if f.startswith("model-0")]
        self.assertGreater(len(shards), 1)
        backbone = keras_gemma2.Gemma2Backbone.from_preset(path)
        lm = keras_gemma2.Gemma2CausalLM(backbone)
        expected = references.hf_logits(self.hf, IDS)
        self.assertLess(np.abs(_logits(lm) - expected).max(), 1e-4)

    def test_bfloat16_checkpoint_loads_in_bfloat16(self):
        import torch

        path = os.path.join(self.get_temp_dir(), "bf16")
        references.hf_model(seed=4).to(torch.bfloat16).save_pretrained(path)
        with mock.patch.dict(
            os.environ, {"KERAS_GEMMA2_XLA_CPU_BFLOAT16": "keep"}
        ):
            backbone = keras_gemma2.Gemma2Backbone.from_preset(path)
        self.assertEqual(backbone.dtype_policy.variable_dtype, "bfloat16")
        # Without `keep`, XLA:CPU holds it in float32 (tests/test_real_size).
        full = keras_gemma2.Gemma2Backbone.from_preset(path, dtype="float32")
        self.assertEqual(full.dtype_policy.variable_dtype, "float32")
        # bfloat16 values survive exactly into float32.
        embedding = self.hf.model.embed_tokens.weight.detach()
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(full.token_embedding.embeddings),
            embedding.to(torch.bfloat16).float().numpy(),
        )


class CheckpointErrorsTest(TestCase):
    def _hf_folder(self):
        path = os.path.join(self.get_temp_dir(), "hf")
        references.hf_model().save_pretrained(path, max_shard_size="20KB")
        return path

    def test_folder_of_neither_format(self):
        path = self.get_temp_dir()
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write("hi")
        with pytest.raises(ValueError, match="has no config.json"):
            keras_gemma2.Gemma2Backbone.from_preset(path)

    def test_pickled_weights_are_refused(self):
        path = self.get_temp_dir()
        config = references.hf_config().to_dict()
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, "model_type": "gemma2"}, f)
        with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
            f.write(b"not unpickled")
        with pytest.raises(ValueError, match="never unpickles"):
            keras_gemma2.Gemma2Backbone.from_preset(path)

    def test_missing_shard(self):
        path = self._hf_folder()
        os.remove(os.path.join(path, "model-00002-of-00004.safetensors"))
        with pytest.raises(FileNotFoundError, match="model-00002-of-00004"):
            keras_gemma2.Gemma2Backbone.from_preset(path)

    def test_shape_mismatch_names_the_tensor(self):
        path = self._hf_folder()
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["intermediate_size"] = 48
        with open(config_path, "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*48"):
            keras_gemma2.Gemma2Backbone.from_preset(path)

    def test_network_handle_while_offline(self):
        # conftest sets HF_HUB_OFFLINE=1: no test reaches a hub.
        with pytest.raises(ConnectionError, match="pass its local folder"):
            keras_gemma2.Gemma2Backbone.from_preset("hf://google/gemma-2-9b-it")


_keras_hub_backbone = references.keras_hub_backbone


class KerasHubPresetTest(TestCase):
    def test_matches_keras_hub_outputs(self):
        import keras_hub

        theirs = _keras_hub_backbone()
        path = os.path.join(self.get_temp_dir(), "kh")
        theirs.save_to_preset(path)
        ours = keras_gemma2.Gemma2Backbone.from_preset(path)
        self.assertEqual(ours.query_pre_attn_scalar, ours.head_dim)
        self.assertEqual(ours.intermediate_dim, theirs.intermediate_dim // 2)
        # 13 tokens through a window of 4: the sliding masks agree too.
        ids = IDS
        expected = keras.ops.convert_to_numpy(
            keras_hub.models.GemmaCausalLM(theirs)(
                {"token_ids": ids, "padding_mask": np.ones_like(ids)}
            )
        )
        lm = keras_gemma2.Gemma2CausalLM(ours)
        self.assertLess(np.abs(_logits(lm, ids) - expected).max(), 1e-4)

    def test_bfloat16_preset_loads_its_values_not_their_bytes(self):
        # HDF5 has no bfloat16: KerasHub's file holds the bits, with the
        # dtype in an attribute (h5py reads them as opaque |V2 values).
        theirs = _keras_hub_backbone(dtype="bfloat16")
        path = os.path.join(self.get_temp_dir(), "kh16")
        theirs.save_to_preset(path)
        # (Held in float32 on XLA:CPU, in bfloat16 on PyTorch: the values
        # are the same.)
        ours = keras_gemma2.Gemma2Backbone.from_preset(path)
        for layer in ("token_embedding", "final_normalization"):
            (mine,) = ours.get_layer(layer).weights
            (reference,) = theirs.get_layer(layer).weights
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(keras.ops.cast(mine, "float32")),
                keras.ops.convert_to_numpy(
                    keras.ops.cast(reference, "float32")
                ),
            )

    def test_27b_style_query_scale_is_the_reference_one(self):
        # query_head_dim_normalize=False: KerasHub means hidden/heads (6 here)
        # but its decoder block uses head_dim; we load the reference model.
        theirs = _keras_hub_backbone(query_head_dim_normalize=False)
        path = os.path.join(self.get_temp_dir(), "kh27")
        theirs.save_to_preset(path)
        ours = keras_gemma2.Gemma2Backbone.from_preset(path)
        self.assertEqual(ours.query_pre_attn_scalar, 6)
        hf = references.hf_model(query_pre_attn_scalar=6)
        _copy_into_hf(ours, hf)  # the same weights in the reference model
        ids = IDS
        expected = references.hf_logits(hf, ids)
        lm = keras_gemma2.Gemma2CausalLM(ours)
        self.assertLess(np.abs(_logits(lm, ids) - expected).max(), 1e-4)
        # KerasHub 0.32 itself is off: it scales by 1/sqrt(head_dim).
        import keras_hub

        keras_hub_logits = keras.ops.convert_to_numpy(
            keras_hub.models.GemmaCausalLM(theirs)(
                {"token_ids": ids, "padding_mask": np.ones_like(ids)}
            )
        )
        self.assertGreater(np.abs(keras_hub_logits - expected).max(), 1e-3)


def _by_path(model):
    return {w.path: w for w in model.weights}


def _copy_into_hf(backbone, hf):
    """Our weights into an HF model, through the names table."""
    import torch

    kwargs = backbone.get_config()
    dims = architectures.axis_sizes(kwargs)
    variables = _by_path(backbone)
    state = {}
    for spec in names.weight_specs(kwargs):
        value = keras.ops.convert_to_numpy(variables[spec.path])
        state[spec.hf_key] = torch.from_numpy(spec.to_hf(value, dims))
    hf.load_state_dict(state, strict=False)


class TokenizerFromCheckpointTest(TestCase):
    def test_tokenizer_model_of_a_hf_folder(self):
        path = os.path.join(self.get_temp_dir(), "hf")
        references.hf_model().save_pretrained(path)
        tiny = keras_gemma2.presets.PRESETS_DIR / "gemma2_tiny_en"
        shutil.copy(
            tiny / "assets" / "tokenizer" / "vocabulary.spm",
            os.path.join(path, "tokenizer.model"),
        )
        tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset(path)
        reference = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
        text = "<start_of_turn>user\nCafé 42<end_of_turn>"
        np.testing.assert_array_equal(tokenizer(text), reference(text))


class OtherVocabularyTest(TestCase):
    """HF checkpoints with 400-piece vocabularies that are not Gemma's."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Turn markers at 4 and 5, <bos>/<eos>/<pad> at Llama-like 1/2/3.
        cls.chat_proto = references.sentencepiece_vocabulary(
            ids=references.OTHER_IDS, user_symbols=references.TURN_MARKERS
        )
        # A base vocabulary: Gemma's 0/1/2, no turn markers.
        cls.base_proto = references.sentencepiece_vocabulary()

    def _folder(self, proto, hf, name="hf"):
        path = os.path.join(self.get_temp_dir(), name)
        return references.hf_folder(path, hf, proto)

    def _hf(self, seed=6):
        return references.hf_model(
            seed=seed,
            vocabulary_size=400,
            token_ids={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
        )

    def _check_logits(self, lm, hf, proto, text):
        """Our tokens are SentencePiece's; our logits are transformers'."""
        tokenizer = lm.preprocessor.tokenizer
        ids = [tokenizer.start_token_id] + [int(i) for i in tokenizer(text)]
        reference = spm.SentencePieceProcessor(model_proto=proto)
        self.assertEqual(ids[1:], reference.encode(text))
        ids = np.array([ids], "int32")
        expected = references.hf_logits(hf, ids)
        self.assertLess(np.abs(_logits(lm, ids) - expected).max(), 1e-4)
        return ids

    def test_turn_markers_at_4_and_5(self):
        hf = self._hf()
        lm = keras_gemma2.Gemma2CausalLM.from_preset(
            self._folder(self.chat_proto, hf)
        )
        tokenizer = lm.preprocessor.tokenizer
        self.assertEqual(
            [tokenizer.start_token_id, tokenizer.end_token_id], [1, 2]
        )
        self.assertEqual(tokenizer.stop_token_ids, (2, 5))
        prompt = keras_gemma2.format_chat(
            [{"role": "user", "content": "Which birds nest on the marsh?"}],
            tokenizer=tokenizer,
        )
        ids = self._check_logits(lm, hf, self.chat_proto, prompt)
        self.assertEqual(ids[0].tolist().count(4), 2)  # user and model turns
        self.assertEqual(ids[0].tolist().count(5), 1)
        # A Keras preset of it keeps the vocabulary and its looked-up ids.
        path = os.path.join(self.get_temp_dir(), "ours")
        lm.save_to_preset(path)
        back = keras_gemma2.Gemma2Tokenizer.from_preset(path)
        self.assertEqual(back.stop_token_ids, (2, 5))
        self.assertEqual(back.pad_token_id, 3)

    def test_generate_stops_at_its_end_of_turn(self):
        # Steer a real model by its weights: swap the embedding rows of a
        # token it generates and <end_of_turn> (5), so it now says 5 there.
        hf = self._hf()
        prompt = [1] + spm.SentencePieceProcessor(
            model_proto=self.chat_proto
        ).encode("The lantern festival")
        free = references.hf_greedy(hf, [prompt], 8)[0, len(prompt) :]
        step = next(
            k
            for k, token in enumerate(free)
            if k >= 2
            and token not in (*prompt, *free[:k], 2, 4, 5)
            and not {2, 5} & set(free[:k])
        )
        import torch

        with torch.no_grad():
            rows = hf.model.embed_tokens.weight
            rows[[free[step], 5]] = rows[[5, free[step]]].clone()
        theirs = references.hf_greedy(hf, [prompt], 8)[0]
        stop = len(prompt) + step
        self.assertEqual(int(theirs[stop]), 5)
        lm = keras_gemma2.Gemma2CausalLM.from_preset(
            self._folder(self.chat_proto, hf)
        )
        length = len(prompt) + 8
        inputs = {
            "token_ids": np.array([prompt + [3] * 8], "int32"),
            "padding_mask": (np.arange(length) < len(prompt))[None],
        }
        ours = lm.generate(inputs)
        self.assertEqual(int(ours["padding_mask"][0].sum()), stop + 1)
        np.testing.assert_array_equal(
            ours["token_ids"][0, : stop + 1], theirs[: stop + 1]
        )
        # Without <end_of_turn> among the stop ids it runs past.
        eos_only = lm.generate(inputs, stop_token_ids=(2,))
        self.assertGreater(int(eos_only["padding_mask"][0].sum()), stop + 1)

    def test_no_turn_markers(self):
        hf = references.hf_model(seed=7, vocabulary_size=400)
        lm = keras_gemma2.Gemma2CausalLM.from_preset(
            self._folder(self.base_proto, hf)
        )
        tokenizer = lm.preprocessor.tokenizer
        self.assertIsNone(tokenizer.start_of_turn_token_id)
        self.assertIsNone(tokenizer.end_of_turn_token_id)
        self.assertEqual(tokenizer.stop_token_ids, (1,))
        self._check_logits(lm, hf, self.base_proto, "The lantern festival")
        messages = [{"role": "user", "content": "Hi"}]
        match = "has no <start_of_turn>/<end_of_turn>; chat formatting needs"
        with pytest.raises(ValueError, match=match):
            keras_gemma2.format_chat(messages, tokenizer=tokenizer)
        with pytest.raises(ValueError, match=match):
            keras_gemma2.data.as_chat(
                {"prompts": ["Hi"], "responses": ["Hello"]}, tokenizer
            )
        # Without the tokenizer, format_chat cannot know, as before.
        self.assertIn("<start_of_turn>", keras_gemma2.format_chat(messages))

    def test_export_writes_the_looked_up_ids(self):
        import transformers

        for name, proto, ids, stops, markers in (
            ("chat", self.chat_proto, (1, 2, 3), [2, 5], [4, 5]),
            ("base", self.base_proto, (2, 1, 0), [1], [None, None]),
        ):
            lm = keras_gemma2.Gemma2CausalLM.from_preset(
                self._folder(proto, self._hf(), name)
            )
            path = lm.export_to_transformers(
                os.path.join(self.get_temp_dir(), f"{name}_export")
            )
            config = transformers.AutoConfig.from_pretrained(path)
            self.assertEqual(
                (config.bos_token_id, config.eos_token_id, config.pad_token_id),
                ids,
            )
            generation = transformers.GenerationConfig.from_pretrained(path)
            self.assertEqual(generation.eos_token_id, stops)
            theirs = transformers.AutoTokenizer.from_pretrained(path)
            # No token added past the 400 pieces the embedding has.
            self.assertEqual(len(theirs), 400)
            self.assertEqual(
                (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id),
                ids,
            )
            found = [theirs.get_vocab().get(t) for t in references.TURN_MARKERS]
            self.assertEqual(found, markers)
            text = "<start_of_turn>user\nThe marsh<end_of_turn>"
            self.assertEqual(
                theirs(text, add_special_tokens=False)["input_ids"],
                [int(i) for i in lm.preprocessor.tokenizer(text)],
            )


class RoundTripTest(TestCase):
    def test_ours_to_transformers_to_ours_is_exact(self):
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        path = os.path.join(self.get_temp_dir(), "hf")
        lm.export_to_transformers(path)
        back = keras_gemma2.Gemma2CausalLM.from_preset(path)
        original = _by_path(lm.backbone)
        for w in back.backbone.weights:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(w),
                keras.ops.convert_to_numpy(original[w.path]),
            )
        self.assertEqual(
            back.generate("The tokenizer", max_new_tokens=12),
            lm.generate("The tokenizer", max_new_tokens=12),
        )
