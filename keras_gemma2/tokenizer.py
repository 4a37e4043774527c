"""Gemma2Tokenizer: SentencePiece with Gemma's special tokens."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_gemma2 import presets as presets_lib
from keras_gemma2.backbone import Gemma2Backbone

# Ids fixed by every Gemma vocabulary (shared/GEMMA2.md).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 106, 107


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Tokenizer(
    presets_lib.RegisteredPresetsMixin, SentencePieceTokenizer
):
    """Gemma 2's SentencePiece tokenizer.

    `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<start_of_turn>` 106 and
    `<end_of_turn>` 107; a vocabulary with other ids for them is rejected.
    `stop_token_ids` lists the ids at which generation stops by default:
    `<eos>` and, for the chat format, `<end_of_turn>`.

    Args:
        proto: a path to a SentencePiece `.spm`/`.model` file, or its bytes.

    Example:
    ```python
    tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
    ids = tokenizer("The tokenizer")
    text = tokenizer.detokenize(ids)
    ```
    """

    backbone_cls = Gemma2Backbone
    _preset_takes_dtype = False

    def __init__(self, proto, **kwargs):
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        self._add_special_token("<start_of_turn>", "start_of_turn_token")
        self._add_special_token("<end_of_turn>", "end_of_turn_token")
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        super().set_proto(proto)
        if proto is None:
            return
        expected = {
            "<pad>": PAD_ID,
            "<eos>": EOS_ID,
            "<bos>": BOS_ID,
            "<start_of_turn>": START_OF_TURN_ID,
            "<end_of_turn>": END_OF_TURN_ID,
        }
        wrong = {
            token: self.token_to_id(token)
            for token, token_id in expected.items()
            if self.token_to_id(token) != token_id
        }
        if wrong:
            raise ValueError(
                "This SentencePiece model is not a Gemma vocabulary: "
                f"special tokens have ids {wrong}, expected {expected}. "
                "Train it with these ids (see scripts/train_tiny_preset.py)."
            )

    @property
    def stop_token_ids(self):
        """Ids that end generation by default: `<eos>`, `<end_of_turn>`."""
        return (self.end_token_id, self.end_of_turn_token_id)
