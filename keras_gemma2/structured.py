"""Structured output: a JSON schema, Lark grammar or regex the text follows.

Through llguidance, chosen over xgrammar and outlines-core because:
- it builds its token masks from the vocabulary's bytes, which we read
  from our own SentencePiece model: no Hugging Face tokenizer and no
  download;
- one matcher takes JSON Schema, Lark (a superset of regex) and regex;
- it has no Python dependencies (no torch), so all three backends use it
  alike;
- llama.cpp and SGLang integrate it, and vLLM offers it as a backend.

The engine asks each sequence's `Constraint` for the allowed tokens before
each step (a mask applied to the logits before every sampling control) and
reports the sampled token back.

Example:
```python
tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
from keras_gemma2.structured import Constraint
constraint = Constraint.from_grammar(tokenizer, 'start: "yes" | "no"')
allowed = constraint.allowed()  # bool mask over the vocabulary
```
"""

import json
import weakref

import numpy as np

from keras_gemma2.special_tokens import END_OF_TURN
from keras_gemma2.special_tokens import EOS

# One llguidance tokenizer per Gemma2Tokenizer: building it reads the whole
# vocabulary.
_TOKENIZERS = weakref.WeakKeyDictionary()


class _Vocabulary:
    """What llguidance's `TokenizerWrapper` reads: each id's bytes."""

    def __init__(self, tokenizer):
        pieces = [
            tokenizer.id_to_token(i) for i in range(tokenizer.vocabulary_size())
        ]
        self.tokens = [_piece_bytes(piece) for piece in pieces]
        self.eos_token_id = tokenizer.token_to_id(EOS)
        self.bos_token_id = tokenizer.start_token_id
        # Control pieces (<pad>, <bos>, <start_of_turn>, ...) never come
        # out of text.
        self.special_token_ids = [
            i
            for i, piece in enumerate(pieces)
            if piece.startswith("<")
            and piece.endswith(">")
            and not _is_byte_piece(piece)
        ]
        self._tokenizer = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return [int(i) for i in self._tokenizer.tokenize(text)]


def _is_byte_piece(piece):
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _piece_bytes(piece):
    """A SentencePiece piece's bytes: `▁` is a space, `<0xNN>` one byte."""
    if _is_byte_piece(piece):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _ll_tokenizer(tokenizer):
    # llguidance: an install requirement, imported when a grammar is used.
    import llguidance

    if tokenizer not in _TOKENIZERS:
        vocabulary = _Vocabulary(tokenizer)
        ends = [vocabulary.eos_token_id]
        end_of_turn = tokenizer.token_to_id(END_OF_TURN)
        if tokenizer.end_of_turn_token_id is not None:
            ends.append(end_of_turn)
        _TOKENIZERS[tokenizer] = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(vocabulary),
            n_vocab=tokenizer.vocabulary_size(),
            eos_token=ends,
        )
    return _TOKENIZERS[tokenizer]


def closed_objects(schema):
    """`schema` with `"additionalProperties": false` on every object schema
    that lists `properties` and says nothing about others.

    Example:
    >>> closed_objects({"type": "object", "properties": {"a": {}}})
    {'type': 'object', 'properties': {'a': {}}, 'additionalProperties': False}
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        closed["properties"] = {
            key: closed_objects(value)
            for key, value in schema["properties"].items()
        }
        closed["additionalProperties"] = False
    return closed


class Constraint:
    """The tokens a sequence may take next under a grammar.

    Make one with `from_json_schema`, `from_grammar` or `from_regex`; a
    grammar llguidance rejects fails here, before any generation.
    """

    def __init__(self, tokenizer, grammar, argument):
        # llguidance: as above.
        import llguidance

        self._ll = _ll_tokenizer(tokenizer)
        self.vocabulary_size = tokenizer.vocabulary_size()
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._ll)
        if problem and not problem.startswith("WARNING"):
            raise ValueError(f"`{argument}` is not valid: {problem}")
        self._matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(
                f"`{argument}` is not valid: {self._matcher.get_error()}"
            )

    @classmethod
    def from_json_schema(cls, tokenizer, schema):
        """Text that parses as JSON and validates against `schema` (a dict
        or a JSON string).

        As OpenAI's strict structured outputs, an object schema with
        `properties` and no `additionalProperties` takes only its declared
        properties (JSON Schema would allow any others, and a model then
        writes keys nobody asked for); say `"additionalProperties": true`
        to allow them. No whitespace is generated between tokens."""
        # llguidance: as above.
        import llguidance

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`json_schema` is not valid JSON: {error}."
                ) from None
        if not isinstance(schema, dict):
            raise TypeError(
                "`json_schema` must be a dict or a JSON string; got "
                f"{type(schema).__name__}."
            )
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                closed_objects(schema), defaults={"whitespace_flexible": False}
            )
        except ValueError as error:
            raise ValueError(f"`json_schema` is not valid: {error}") from None
        return cls(tokenizer, grammar, "json_schema")

    @classmethod
    def from_grammar(cls, tokenizer, grammar):
        """Text in a Lark grammar's language (`"regex:PATTERN"` for a
        regular expression)."""
        # llguidance: as above.
        import llguidance

        if not isinstance(grammar, str):
            raise TypeError(
                f"`grammar` must be a string; got {type(grammar).__name__}."
            )
        if grammar.startswith("regex:"):
            return cls.from_regex(tokenizer, grammar[len("regex:") :])
        lark = llguidance.LLMatcher.grammar_from_lark(grammar)
        return cls(tokenizer, lark, "grammar")

    @classmethod
    def from_regex(cls, tokenizer, pattern):
        """Text that matches the regular expression `pattern`, whole."""
        # llguidance: as above.
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
        return cls(tokenizer, grammar, "grammar")

    def allowed(self):
        """A bool mask `[vocabulary_size]` of the tokens allowed next;
        `<eos>` (and `<end_of_turn>`) only where the text may end."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little").astype(bool)
        return mask[: self.vocabulary_size]

    def advance(self, token_id):
        """Consumes a sampled token; a ValueError if it was not allowed,
        with the state left as it was (llguidance's matcher would stay in
        its error state after consuming it)."""
        if self._matcher.validate_tokens([int(token_id)]) != 1:
            raise ValueError(
                f"Token {token_id} is not allowed here by the grammar; "
                "`allowed()` gives the tokens that are."
            )
        self._matcher.consume_token(int(token_id))

    def is_accepting(self):
        """Whether the text so far is a complete match."""
        return self._matcher.is_accepting()

    def is_finished(self):
        """Whether nothing but the end may follow."""
        return self._matcher.is_stopped()

    def reset(self):
        """Back to the start of the grammar."""
        self._matcher.reset()
