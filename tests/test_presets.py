"""The preset registry, the bundled tiny preset, and loading round trips."""

import json
import pathlib
import re
import sys

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import presets as presets_lib
from tests.harness import TestCase

TINY = presets_lib.PRESETS_DIR / "gemma2_tiny_en"
sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts")
)
import tiny_corpus  # noqa: E402


def _bigrams(text):
    words = re.findall(r"[a-z]{2,}", text.lower())
    return list(zip(words, words[1:]))


class RegistryTest(TestCase):
    def test_lists_every_released_size_with_its_handle(self):
        presets = keras_gemma2.Gemma2CausalLM.presets
        for size in ("2b", "9b", "27b"):
            for name in (f"gemma2_{size}_en", f"gemma2_instruct_{size}_en"):
                self.assertIn(
                    "kaggle://keras/gemma2/keras/",
                    presets[name]["kaggle_handle"],
                )
        self.assertEqual(set(presets), set(keras_gemma2.Gemma2Backbone.presets))

    def test_released_checkpoints_default_to_bfloat16(self):
        handle, kwargs = presets_lib.resolve("gemma2_9b_en", {})
        self.assertEqual(kwargs["dtype"], "bfloat16")
        self.assertTrue(handle.startswith("kaggle://"))
        _, kwargs = presets_lib.resolve("gemma2_9b_en", {"dtype": "float32"})
        self.assertEqual(kwargs["dtype"], "float32")
        _, kwargs = presets_lib.resolve("gemma2_tiny_en", {})
        self.assertNotIn("dtype", kwargs)

    def test_unknown_name_lists_close_matches(self):
        with pytest.raises(ValueError, match="Did you mean 'gemma2_2b_en'"):
            keras_gemma2.Gemma2CausalLM.from_preset("gemma2_2b_eng")
        with pytest.raises(ValueError, match="Registered presets"):
            keras_gemma2.Gemma2Tokenizer.from_preset("llama")

    def test_tiny_preset_size_and_metadata(self):
        size = sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file())
        self.assertLess(size, 20 * 1024 * 1024)
        params = keras_gemma2.Gemma2CausalLM.presets["gemma2_tiny_en"][
            "metadata"
        ]["params"]
        backbone = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        self.assertEqual(params, backbone.count_params())
        # Local and global layers, both soft caps, GQA: a real Gemma 2 shape.
        self.assertEqual(set(backbone.attention_types), {"local", "global"})
        self.assertIsNotNone(backbone.attention_logit_soft_cap)
        self.assertIsNotNone(backbone.final_logit_soft_cap)
        self.assertLess(backbone.num_key_value_heads, backbone.num_query_heads)

    def test_tiny_preset_beats_the_unigram_baseline(self):
        report = json.loads((TINY / "training.json").read_text())
        self.assertLess(
            report["held_out_perplexity"], 0.5 * report["unigram_perplexity"]
        )


class TinyPresetTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")

    def test_generates_text_like_its_corpus(self):
        # Pairs of consecutive words in the generated text are pairs that
        # occur in Python's documentation; the same model with random
        # weights strings BPE pieces together and almost never hits one.
        corpus = set()
        for doc in tiny_corpus.documents():
            corpus.update(_bigrams(doc))
        prompts = ["The tokenizer", "A list is", "If the"]

        def in_corpus(lm):
            texts = lm.generate(prompts, max_new_tokens=32, strip_prompt=True)
            pairs = [pair for text in texts for pair in _bigrams(text)]
            return sum(pair in corpus for pair in pairs) / max(len(pairs), 1)

        random_lm = keras_gemma2.Gemma2CausalLM(
            keras_gemma2.Gemma2Backbone.from_preset(
                "gemma2_tiny_en", load_weights=False
            ),
            self.lm.preprocessor,
        )
        trained, untrained = in_corpus(self.lm), in_corpus(random_lm)
        self.assertGreater(trained, 0.7)
        self.assertLess(untrained, 0.3)

    def test_batch_of_prompt_lengths_equals_one_by_one(self):
        prompts = ["The", "A list object is a mutable sequence of"]
        batch = self.lm.generate(prompts, max_new_tokens=8)
        alone = [self.lm.generate(p, max_new_tokens=8) for p in prompts]
        self.assertEqual(batch, alone)

    def test_stops_at_end_of_turn_by_default(self):
        # Steer a real model by its weights: swap the embedding rows of its
        # first greedy token and <end_of_turn>, so it now says <end_of_turn>.
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        prompt = lm.preprocessor.generate_preprocess(["The tokenizer"], 12)
        prompt = {k: keras.ops.convert_to_numpy(v) for k, v in prompt.items()}
        length = int(prompt["padding_mask"].sum())
        free = lm.generate(prompt, stop_token_ids=None)["token_ids"][0]
        first = int(free[length])
        self.assertNotIn(first, prompt["token_ids"][0, :length].tolist())
        table = lm.backbone.token_embedding.embeddings
        rows = keras.ops.convert_to_numpy(table).copy()
        rows[[first, 107]] = rows[[107, first]]
        table.assign(rows)
        stopped = lm.generate(prompt)
        self.assertEqual(int(stopped["token_ids"][0, length]), 107)
        self.assertEqual(int(stopped["padding_mask"][0].sum()), length + 1)
        # Stopping at <eos> alone (KerasHub's default) runs past the turn.
        eos_only = lm.generate(prompt, stop_token_ids=(1,))
        self.assertGreater(int(eos_only["padding_mask"][0].sum()), length + 1)

    def test_prompt_longer_than_max_length_is_an_error(self):
        with pytest.raises(ValueError, match="max_new_tokens"):
            self.lm.generate(
                "The tokenizer reads a stream of text", max_length=4
            )

    def test_non_string_prompt_is_an_error(self):
        with pytest.raises(TypeError, match="Prompts must be strings"):
            self.lm.generate(["fine", 42])
        with pytest.raises(TypeError, match="takes a string"):
            self.lm.generate(42)

    def test_save_and_load_round_trip(self):
        path = self.get_temp_dir()
        self.lm.save_to_preset(path)
        restored = keras_gemma2.Gemma2CausalLM.from_preset(path)
        prompt = "A dictionary maps"
        self.assertEqual(
            self.lm.generate(prompt, max_new_tokens=10),
            restored.generate(prompt, max_new_tokens=10),
        )
        np.testing.assert_array_equal(
            self.lm.score(prompt), restored.score(prompt)
        )


class AtomicSaveTest(TestCase):
    def test_replaces_an_existing_preset_whole(self):
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        path = pathlib.Path(self.get_temp_dir()) / "preset"
        lm.save_to_preset(str(path))
        (path / "stale.txt").write_text("from an older save")
        lm.save_to_preset(str(path))
        self.assertFalse((path / "stale.txt").exists())
        self.assertTrue((path / "model.weights.h5").exists())
        leftovers = [
            p.name for p in path.parent.iterdir() if p.name != "preset"
        ]
        self.assertEqual(leftovers, [])

    def test_refuses_a_folder_that_is_not_a_preset(self):
        lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        path = pathlib.Path(self.get_temp_dir())
        (path / "thesis.tex").write_text("years of work")
        with pytest.raises(ValueError, match="not a preset"):
            lm.save_to_preset(str(path))
        self.assertEqual((path / "thesis.tex").read_text(), "years of work")
