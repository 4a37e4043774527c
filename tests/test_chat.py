"""`format_chat` against Gemma's own chat template, rendered by jinja2."""

import pytest

import keras_gemma2

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
