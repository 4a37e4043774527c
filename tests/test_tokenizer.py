"""Gemma2Tokenizer: Gemma's special-token ids on a real SentencePiece model."""

import io

import pytest
import sentencepiece as spm

import keras_gemma2
from tests.harness import TestCase


class TokenizerTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset(
            "gemma2_tiny_en"
        )

    def test_special_token_ids(self):
        t = self.tokenizer
        self.assertEqual(
            [t.pad_token_id, t.end_token_id, t.start_token_id],
            [0, 1, 2],
        )
        self.assertEqual(t.token_to_id("<unk>"), 3)
        self.assertEqual(t.start_of_turn_token_id, 106)
        self.assertEqual(t.end_of_turn_token_id, 107)
        self.assertEqual(t.stop_token_ids, (1, 107))

    def test_chat_markers_are_single_tokens(self):
        ids = self.tokenizer("<start_of_turn>user\nHi<end_of_turn>")
        ids = [int(i) for i in ids]
        self.assertEqual(ids[0], 106)
        self.assertIn(107, ids)

    def test_round_trip(self):
        text = "The tokenizer splits\n    indented code, café and 42."
        ids = self.tokenizer(text)
        self.assertEqual(self.tokenizer.detokenize(ids), text)

    def test_rejects_a_vocabulary_with_other_ids(self):
        # Gemma's tokens, at Llama-like ids: a silent mismatch without a check.
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["hello world", "a quick brown fox"] * 20),
            model_writer=model,
            vocab_size=25,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            bos_piece="<bos>",
            eos_piece="<eos>",
            pad_piece="<pad>",
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
            minloglevel=2,
        )
        with pytest.raises(ValueError, match="not a Gemma vocabulary"):
            keras_gemma2.Gemma2Tokenizer(proto=model.getvalue())

    def test_rejects_a_vocabulary_without_the_special_tokens(self):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["hello world", "a quick brown fox"] * 20),
            model_writer=model,
            vocab_size=22,
            minloglevel=2,
        )
        with pytest.raises(ValueError, match="Cannot find special token"):
            keras_gemma2.Gemma2Tokenizer(proto=model.getvalue())
