"""keras_gemma2.structured: llguidance masks over the tiny preset's tokens.

Random walks through the allowed tokens must spell JSON that validates;
for a Lark grammar and a regex the mask is checked token by token against
each piece's own text. No Keras ops: runs once, in the JAX pass.
"""

import json

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import structured
from keras_gemma2.structured import Constraint

pytest.importorskip("llguidance")

jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Backend-independent (no Keras): runs once, in the JAX pass.",
)
pytestmark = jax_only

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
# Where a walk prefers tokens that close something: a string runs on for
# thousands of steps among 4096 uniform picks otherwise.
STRUCTURAL = ('"', "}", ",", ":")


@pytest.fixture(scope="module")
def tokenizer():
    return keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")


@pytest.fixture(scope="module")
def texts(tokenizer):
    """Each id's text as SentencePiece writes it; None for special ids."""
    special = set(tokenizer.special_token_ids)
    out = []
    for i in range(tokenizer.vocabulary_size()):
        piece = tokenizer.id_to_token(i)
        if i in special or piece in ("<unk>", "<mask>"):
            out.append(None)
        elif len(piece) == 6 and piece.startswith("<0x"):
            byte = int(piece[3:5], 16)
            out.append(chr(byte) if byte < 0x80 else None)
        elif piece.startswith("<unused"):
            out.append(None)
        else:
            out.append(piece.replace("\u2581", " "))
    return out


def _ends(tokenizer):
    return tokenizer.stop_token_ids  # (<eos>, <end_of_turn>)


def _walk(constraint, tokenizer, texts, rng, limit=200):
    """Samples uniformly among allowed tokens, biased toward ending."""
    ids = []
    ends = _ends(tokenizer)
    while len(ids) < limit:
        if constraint.is_finished():
            return ids, True
        allowed = np.flatnonzero(constraint.allowed())
        assert allowed.size, f"nothing allowed after {ids}"
        end_allowed = [i for i in allowed if i in ends]
        if end_allowed and rng.random() < 0.5:
            constraint.advance(int(end_allowed[0]))
            return ids, True
        closing = [
            i
            for i in allowed
            if texts[i] is not None and any(c in texts[i] for c in STRUCTURAL)
        ]
        pool = closing if closing and rng.random() < 0.4 else allowed
        token = int(rng.choice(pool))
        constraint.advance(token)
        if token in ends:
            return ids, True
        ids.append(token)
    return ids, False


def test_random_walks_give_valid_json(tokenizer, texts):
    constraint = Constraint.from_json_schema(tokenizer, SCHEMA)
    rng = np.random.default_rng(0)
    for walk in range(20):
        constraint.reset()
        ids, finished = _walk(constraint, tokenizer, texts, rng)
        assert finished, f"walk {walk} ran 200 tokens: {ids}"
        assert constraint.is_accepting()
        text = tokenizer.detokenize(ids)
        value = json.loads(text)
        # Objects are closed (OpenAI strict mode): exactly the two keys.
        assert set(value) == {"name", "age"}, text
        assert isinstance(value["name"], str), text
        assert isinstance(value["age"], int), text
        assert not isinstance(value["age"], bool), text


def test_json_mask_at_the_start(tokenizer):
    constraint = Constraint.from_json_schema(tokenizer, SCHEMA)
    allowed = constraint.allowed()
    assert allowed.dtype == bool
    assert allowed.shape == (tokenizer.vocabulary_size(),)
    assert allowed[tokenizer.token_to_id("{")]
    for piece in ("a", "\u2581the", "[", "<0x20>"):
        assert not allowed[tokenizer.token_to_id(piece)], piece
    for end in _ends(tokenizer):
        assert not allowed[end]  # the empty text is not an object


def test_json_mask_follows_the_text(tokenizer):
    constraint = Constraint.from_json_schema(tokenizer, SCHEMA)
    for token_id in tokenizer('{"name":"Ada","age":3'):
        constraint.advance(int(token_id))
    allowed = constraint.allowed()
    assert not constraint.is_accepting()
    assert allowed[tokenizer.token_to_id("}")]
    assert allowed[tokenizer.token_to_id("<0x30>")]  # "0": age 30
    assert not allowed[tokenizer.token_to_id('"')]
    assert not any(allowed[end] for end in _ends(tokenizer))
    constraint.advance(tokenizer.token_to_id("}"))
    assert constraint.is_accepting()
    allowed = constraint.allowed()
    assert all(allowed[end] for end in _ends(tokenizer))


def test_disallowed_token_raises(tokenizer):
    constraint = Constraint.from_json_schema(tokenizer, SCHEMA)
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(tokenizer.token_to_id("a"))


def test_disallowed_token_leaves_the_state(tokenizer):
    constraint = Constraint.from_json_schema(tokenizer, SCHEMA)
    before = constraint.allowed()
    with pytest.raises(ValueError):
        constraint.advance(tokenizer.token_to_id("a"))
    np.testing.assert_array_equal(constraint.allowed(), before)
    constraint.advance(tokenizer.token_to_id("{"))


@pytest.mark.parametrize(
    "schema",
    [{"type": "nosuchtype"}, '{"type": ', '{"$ref": "#/nowhere"}'],
    ids=["unknown type", "malformed JSON", "dangling $ref"],
)
def test_invalid_schema_raises_at_construction(tokenizer, schema):
    with pytest.raises(ValueError, match="`json_schema` is not valid"):
        Constraint.from_json_schema(tokenizer, schema)


@pytest.mark.parametrize("schema", [3, ["type", "object"], None])
def test_schema_of_the_wrong_type(tokenizer, schema):
    with pytest.raises(TypeError, match="json_schema"):
        Constraint.from_json_schema(tokenizer, schema)


def test_schema_as_a_string(tokenizer):
    constraint = Constraint.from_json_schema(tokenizer, json.dumps(SCHEMA))
    assert constraint.allowed()[tokenizer.token_to_id("{")]


def _prefix_tokens(texts, words):
    """Ids whose text is a non-empty prefix of one of `words`."""
    return {
        i
        for i, text in enumerate(texts)
        if text and any(word.startswith(text) for word in words)
    }


def test_lark_grammar(tokenizer, texts):
    constraint = Constraint.from_grammar(tokenizer, 'start: "yes" | "no"')
    allowed = set(np.flatnonzero(constraint.allowed()))
    assert allowed == _prefix_tokens(texts, ("yes", "no"))
    for token_id in tokenizer("yes"):
        constraint.advance(int(token_id))
    assert constraint.is_accepting() and constraint.is_finished()
    assert set(np.flatnonzero(constraint.allowed())) == set(_ends(tokenizer))
    constraint.reset()
    assert set(np.flatnonzero(constraint.allowed())) == allowed
    assert not constraint.is_accepting()


def test_regex(tokenizer, texts):
    digits = {
        i
        for i, text in enumerate(texts)
        if text and text.isascii() and text.isdigit()
    }
    for constraint in (
        Constraint.from_regex(tokenizer, "[0-9]{3}"),
        Constraint.from_grammar(tokenizer, "regex:[0-9]{3}"),
    ):
        allowed = set(np.flatnonzero(constraint.allowed()))
        assert allowed == {i for i in digits if len(texts[i]) <= 3}
        for token_id in tokenizer("12"):
            constraint.advance(int(token_id))
        assert not constraint.is_accepting()
        allowed = set(np.flatnonzero(constraint.allowed()))
        assert allowed == {i for i in digits if len(texts[i]) == 1}
        constraint.advance(tokenizer.token_to_id("<0x37>"))  # "7"
        assert constraint.is_accepting() and constraint.is_finished()


def test_invalid_grammar_raises_at_construction(tokenizer):
    with pytest.raises(ValueError, match="`grammar` is not valid"):
        Constraint.from_grammar(tokenizer, "start: nosuchrule")
    with pytest.raises(ValueError, match="is not valid"):
        Constraint.from_regex(tokenizer, "[a-(")
    with pytest.raises(TypeError, match="grammar"):
        Constraint.from_grammar(tokenizer, {"start": "yes"})


def test_special_tokens_are_never_text(tokenizer):
    # Any string: still no <start_of_turn>, <pad>, ... inside it.
    constraint = Constraint.from_json_schema(tokenizer, {"type": "string"})
    constraint.advance(tokenizer.token_to_id('"'))
    allowed = constraint.allowed()
    for piece in ("<pad>", "<bos>", "<unk>", "<mask>", "<start_of_turn>"):
        assert not allowed[tokenizer.token_to_id(piece)], piece
    assert not any(allowed[end] for end in _ends(tokenizer))
    assert allowed[tokenizer.token_to_id("a")]


def test_llguidance_tokenizer_is_built_once(tokenizer):
    first = structured._ll_tokenizer(tokenizer)
    assert structured._ll_tokenizer(tokenizer) is first
    assert first.vocab_size == tokenizer.vocabulary_size()
    assert sorted(first.eos_tokens) == sorted(_ends(tokenizer))
