"""Gemma's special tokens: their strings and their ids in Gemma's vocabulary.

The one table the tokenizer, the chat format, the HF exporter and the name
table read. The tokenizer looks tokens up by string, so a vocabulary that
holds them at other ids still loads; the ids here are those of Gemma's own
vocabulary (shared/GEMMA2.md), written where no tokenizer is at hand.

Example:
>>> ids = GEMMA_IDS
>>> ids[EOS], ids[END_OF_TURN]
(1, 107)
"""

PAD = "<pad>"
EOS = "<eos>"
BOS = "<bos>"
UNK = "<unk>"
MASK = "<mask>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# Ids in Gemma's own vocabulary.
GEMMA_IDS = {
    PAD: 0,
    EOS: 1,
    BOS: 2,
    UNK: 3,
    MASK: 4,
    START_OF_TURN: 106,
    END_OF_TURN: 107,
}
# Where generation stops by default: the end of the text, the end of a turn.
STOP_TOKENS = (EOS, END_OF_TURN)
# Hugging Face's names for the tokens that `tokenizer_config.json` names.
HF_NAMES = {
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": PAD,
    "unk_token": UNK,
}
