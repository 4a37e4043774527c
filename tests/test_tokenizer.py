"""Gemma2Tokenizer: special tokens by name, on real SentencePiece models."""

import io
import os

import pytest
import sentencepiece as spm

import keras_gemma2
from tests import references
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

    def test_special_token_ids_are_not_in_the_text(self):
        # generate_postprocess strips these from replies.
        self.assertEqual(
            sorted(self.tokenizer.special_token_ids), [0, 1, 2, 106, 107]
        )


class OtherVocabularyTest(TestCase):
    """Special tokens found by name, as KerasHub and transformers do."""

    def test_other_ids_are_looked_up_by_name(self):
        proto = references.sentencepiece_vocabulary(
            ids=references.OTHER_IDS, user_symbols=references.TURN_MARKERS
        )
        reference = spm.SentencePieceProcessor(model_proto=proto)
        t = keras_gemma2.Gemma2Tokenizer(proto=proto)
        self.assertEqual(
            [t.start_token_id, t.end_token_id, t.pad_token_id],
            [reference.piece_to_id(p) for p in ("<bos>", "<eos>", "<pad>")],
        )
        self.assertEqual([t.start_token_id, t.end_token_id], [1, 2])
        self.assertEqual(t.pad_token_id, 3)
        self.assertEqual(
            [t.start_of_turn_token_id, t.end_of_turn_token_id], [4, 5]
        )
        self.assertEqual(t.stop_token_ids, (2, 5))
        self.assertEqual(sorted(t.special_token_ids), [1, 2, 3, 4, 5])
        text = "<start_of_turn>user\nThe marsh birds<end_of_turn>"
        ids = [int(i) for i in t(text)]
        self.assertEqual(ids, reference.encode(text))
        self.assertEqual(ids.count(4), 1)
        self.assertEqual(ids.count(5), 1)

    def test_stop_token_ids_need_a_vocabulary(self):
        with pytest.raises(ValueError, match="No vocabulary"):
            keras_gemma2.Gemma2Tokenizer(proto=None).stop_token_ids

    def test_turn_markers_are_optional(self):
        proto = references.sentencepiece_vocabulary()
        t = keras_gemma2.Gemma2Tokenizer(proto=proto)
        self.assertIsNone(t.start_of_turn_token_id)
        self.assertIsNone(t.end_of_turn_token_id)
        self.assertEqual(t.stop_token_ids, (1,))
        self.assertEqual(sorted(t.special_token_ids), [0, 1, 2])
        self.assertEqual(t.vocabulary_size(), 400)

    def test_missing_pieces_are_named_with_the_file(self):
        # No <pad> (pad_id=-1): the error names it and the file.
        proto = references.sentencepiece_vocabulary(
            ids={**references.GEMMA_IDS, "pad_id": -1}
        )
        path = os.path.join(self.get_temp_dir(), "no_pad.model")
        with open(path, "wb") as f:
            f.write(proto)
        with pytest.raises(ValueError) as error:
            keras_gemma2.Gemma2Tokenizer(proto=path)
        message = str(error.value)
        self.assertIn(f"{path} has no <pad> piece;", message)
        self.assertNotIn("<bos>,", message.split(";")[0])

    def test_a_vocabulary_without_the_special_tokens(self):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["hello world", "a quick brown fox"] * 20),
            model_writer=model,
            vocab_size=22,
            minloglevel=2,
        )
        # SentencePiece's default names are <s>, </s>, and no pad piece.
        with pytest.raises(
            ValueError, match="SentencePiece model has no <bos>, <eos>, <pad> "
        ):
            keras_gemma2.Gemma2Tokenizer(proto=model.getvalue())
