"""Gemma2Tokenizer: SentencePiece with Gemma's special tokens, found by name."""

import os

import keras
import sentencepiece
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_gemma2 import presets as presets_lib
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.convert import damaged
from keras_gemma2.special_tokens import BOS
from keras_gemma2.special_tokens import END_OF_TURN
from keras_gemma2.special_tokens import EOS
from keras_gemma2.special_tokens import PAD
from keras_gemma2.special_tokens import START_OF_TURN


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Tokenizer(
    presets_lib.RegisteredPresetsMixin, SentencePieceTokenizer
):
    """Gemma 2's SentencePiece tokenizer.

    Special tokens are looked up by name, as KerasHub's and transformers'
    Gemma tokenizers do, so any SentencePiece vocabulary with `<bos>`,
    `<eos>` and `<pad>` pieces loads, at whatever ids (Gemma's own has
    `<pad>` 0, `<eos>` 1, `<bos>` 2, `<start_of_turn>` 106 and
    `<end_of_turn>` 107). The turn markers are optional:
    `start_of_turn_token_id` and `end_of_turn_token_id` are `None` for a
    vocabulary without them, and chat formatting then refuses it.
    `stop_token_ids` lists the ids at which generation stops by default:
    `<eos>` and, where the vocabulary has it, `<end_of_turn>`.

    Args:
        proto: a path to a SentencePiece `.spm`/`.model` file, or its bytes.

    Example:
    ```python
    tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
    ids = tokenizer("The tokenizer")
    text = tokenizer.detokenize(ids)
    tokenizer.stop_token_ids  # (1, 107): <eos>, <end_of_turn>
    ```
    """

    backbone_cls = Gemma2Backbone
    _preset_takes_dtype = False

    def __init__(self, proto, **kwargs):
        # Required: KerasHub's special tokens, checked once a vocabulary is set.
        self._add_special_token(BOS, "start_token")
        self._add_special_token(EOS, "end_token")
        self._add_special_token(PAD, "pad_token")
        # Optional: only instruction-tuned vocabularies need them.
        self.start_of_turn_token = START_OF_TURN
        self.end_of_turn_token = END_OF_TURN
        self.start_of_turn_token_id = None
        self.end_of_turn_token_id = None
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        self._proto_source = _describe(proto)
        if proto is not None:
            _check_sentencepiece(proto, self._proto_source)
        super().set_proto(proto)
        if proto is None:
            self.start_of_turn_token_id = None
            self.end_of_turn_token_id = None

    def _update_special_token_ids(self):
        # KerasHub's `set_proto` calls this once the vocabulary is read. Its
        # own check names neither every missing piece nor the file.
        ids = {piece: i for i, piece in enumerate(self.get_vocabulary())}
        required = (self.start_token, self.end_token, self.pad_token)
        missing = [piece for piece in required if piece not in ids]
        if missing:
            raise ValueError(
                f"{self._proto_source} has no {', '.join(missing)} "
                f"piece{'s' if len(missing) > 1 else ''}; Gemma2Tokenizer "
                f"needs {', '.join(required)} in its vocabulary (looked up "
                "by name, at any ids). Train it with `bos_piece='<bos>'`, "
                "`eos_piece='<eos>'` and `pad_piece='<pad>'` (see "
                "scripts/train_tiny_preset.py)."
            )
        super()._update_special_token_ids()
        self.start_of_turn_token_id = ids.get(self.start_of_turn_token)
        self.end_of_turn_token_id = ids.get(self.end_of_turn_token)

    @property
    def special_tokens(self):
        """`<bos>`, `<eos>`, `<pad>` and the turn markers the vocabulary has."""
        return super().special_tokens + [
            token for token, _ in self._turn_markers()
        ]

    @property
    def special_token_ids(self):
        """Their ids: `generate_postprocess` strips them from replies."""
        return super().special_token_ids + [i for _, i in self._turn_markers()]

    def _turn_markers(self):
        """`(piece, id)` of the turn markers in the vocabulary."""
        markers = (
            (self.start_of_turn_token, self.start_of_turn_token_id),
            (self.end_of_turn_token, self.end_of_turn_token_id),
        )
        return [(token, i) for token, i in markers if i is not None]

    @property
    def stop_token_ids(self):
        """Ids that end generation by default: `<eos>`, `<end_of_turn>`.

        `<end_of_turn>` only where the vocabulary has it.
        """
        self._check_vocabulary()
        ids = (self.end_token_id, self.end_of_turn_token_id)
        return tuple(i for i in ids if i is not None)


def _check_sentencepiece(proto, source):
    """Refuses a vocabulary file SentencePiece cannot parse, naming it.

    TensorFlow's op would raise an `InternalError` from inside the graph;
    the `sentencepiece` package (a dependency) parses the same bytes first.
    """
    what = "a SentencePiece model"
    if isinstance(proto, (str, os.PathLike)):
        with damaged.reading(proto, what, damaged.COPY_FIX):
            with open(proto, "rb") as f:
                proto = f.read()
    if not isinstance(proto, bytes):
        return  # a tensor of bytes: KerasHub reads it
    try:
        sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as error:
        raise damaged.DamagedFileError(
            source,
            f"is not {what}: SentencePiece cannot parse its {len(proto)} "
            "bytes (cut short, or another file)",
            damaged.COPY_FIX,
        ) from error


def _describe(proto):
    """The vocabulary's file for error messages, or what it was given as."""
    if isinstance(proto, (str, os.PathLike)) and os.path.isfile(proto):
        return os.fspath(proto)
    return "This SentencePiece model"
