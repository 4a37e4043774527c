"""`format_chat` against Gemma's own chat template, rendered by jinja2."""

import io

import pytest

import keras_gemma2
from keras_gemma2 import chat
from tests import references

# The chat template of Gemma 2's instruction-tuned tokenizer_config.json.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)


def _reference(messages, add_generation_prompt=True):
    import jinja2

    def raise_exception(message):
        raise ValueError(message)

    template = jinja2.Environment().from_string(GEMMA_TEMPLATE)
    return template.render(
        messages=messages,
        bos_token="",  # our preprocessor adds <bos>
        add_generation_prompt=add_generation_prompt,
        raise_exception=raise_exception,
    )


CONVERSATION = [
    {"role": "user", "content": "  What is a tokenizer? \n"},
    {"role": "assistant", "content": "It splits text into pieces."},
    {"role": "user", "content": "Naïve question: and a parser?"},
]


@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_gemma_template(turns, add_generation_prompt):
    messages = CONVERSATION[:turns]
    assert keras_gemma2.format_chat(
        messages, add_generation_prompt
    ) == _reference(messages, add_generation_prompt)


def test_system_message_is_prepended_to_the_first_user_turn():
    prompt = keras_gemma2.format_chat(
        [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    )
    expected = _reference(
        [{"role": "user", "content": "Be brief.\n\nWhat is a tokenizer?"}]
    )
    assert prompt == expected


def test_chat_markers_tokenize_to_gemma_ids():
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    ids = list(
        lm.preprocessor.tokenizer(keras_gemma2.format_chat(CONVERSATION))
    )
    assert ids.count(106) == 4 and ids.count(107) == 3


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ({"role": "user", "content": "hi"}, "non-empty list"),
        ([{"role": "model", "content": "hi"}], "must alternate"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
            ],
            "must alternate",
        ),
        ([{"role": "bot", "content": "hi"}], "'role'"),
        ([{"role": "user", "content": 3}], "string 'content'"),
        ([{"role": "system", "content": "x"}], "followed by a user"),
    ],
)
def test_bad_messages_are_clear_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        keras_gemma2.format_chat(messages)


def test_a_tokenizer_with_turn_markers_changes_nothing():
    tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
    assert keras_gemma2.format_chat(
        CONVERSATION, tokenizer=tokenizer
    ) == keras_gemma2.format_chat(CONVERSATION)


def _tokenizer(**kwargs):
    proto = references.sentencepiece_vocabulary(**kwargs)
    return keras_gemma2.Gemma2Tokenizer(proto=proto)


def test_a_vocabulary_without_turn_markers_is_refused():
    tokenizer = _tokenizer()
    with pytest.raises(
        ValueError,
        match="vocabulary has no <start_of_turn>/<end_of_turn>; chat "
        "formatting needs an instruction-tuned Gemma vocabulary",
    ):
        keras_gemma2.format_chat(CONVERSATION, tokenizer=tokenizer)


def test_a_vocabulary_with_one_turn_marker_names_the_other():
    tokenizer = _tokenizer(user_symbols=["<start_of_turn>"])
    assert tokenizer.start_of_turn_token_id == 4
    with pytest.raises(ValueError, match="has no <end_of_turn>;"):
        keras_gemma2.format_chat(CONVERSATION, tokenizer=tokenizer)


def test_turn_markers_that_text_never_produces_are_refused():
    # Control pieces exist in the vocabulary, but SentencePiece never cuts
    # them out of text: the prompt would reach the model without turns.
    tokenizer = _tokenizer(control_symbols=references.TURN_MARKERS)
    assert tokenizer.stop_token_ids == (1, 5)
    prompt = keras_gemma2.format_chat(CONVERSATION[:1])
    assert 4 not in [int(i) for i in tokenizer(prompt)]
    with pytest.raises(ValueError, match="control piece"):
        keras_gemma2.format_chat(CONVERSATION, tokenizer=tokenizer)


def test_chat_refuses_before_the_first_turn():
    tokenizer = _tokenizer()
    backbone = keras_gemma2.Gemma2Backbone(
        **{**references.TINY_KWARGS, "vocabulary_size": 400}
    )
    lm = keras_gemma2.Gemma2CausalLM(
        backbone, keras_gemma2.Gemma2CausalLMPreprocessor(tokenizer)
    )
    asked = []

    def read():
        asked.append(True)
        return "Hi"

    with pytest.raises(ValueError, match="has no <start_of_turn>"):
        chat.chat(lm, input_fn=read, output=io.StringIO())
    assert not asked
