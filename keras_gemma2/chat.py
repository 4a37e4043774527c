"""The Gemma chat format, and an interactive chat loop with streaming."""

import sys

from keras_gemma2.special_tokens import END_OF_TURN
from keras_gemma2.special_tokens import START_OF_TURN

_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def check_tokenizer(tokenizer):
    """Raises a ValueError unless `tokenizer` encodes the chat turn markers.

    A vocabulary without `<start_of_turn>`/`<end_of_turn>` (a base model's
    own, say) would split them into ordinary pieces, and so would one that
    holds them as control pieces, which SentencePiece never produces from
    text: either way the model would see no turns, silently.

    Args:
        tokenizer: a `Gemma2Tokenizer`.
    """
    marker_ids = {
        START_OF_TURN: tokenizer.start_of_turn_token_id,
        END_OF_TURN: tokenizer.end_of_turn_token_id,
    }
    missing = [marker for marker, i in marker_ids.items() if i is None]
    if missing:
        raise ValueError(
            f"This tokenizer's vocabulary has no {'/'.join(missing)}; chat "
            "formatting needs an instruction-tuned Gemma vocabulary, with "
            f"{START_OF_TURN} and {END_OF_TURN} pieces. Pass the prompt as "
            "plain text instead."
        )
    ids = [int(i) for i in tokenizer.tokenize(START_OF_TURN + END_OF_TURN)]
    unparsed = [marker for marker, i in marker_ids.items() if i not in ids]
    if unparsed:
        raise ValueError(
            f"This tokenizer's {'/'.join(unparsed)} (id "
            f"{', '.join(str(marker_ids[m]) for m in unparsed)}) never comes "
            "out of text: the vocabulary holds it as a control piece, so "
            "chat-formatted text would not reach the model as turns. Train "
            "the vocabulary with the turn markers as `user_defined_symbols`."
        )


def format_chat(messages, add_generation_prompt=True, tokenizer=None):
    """Writes messages in the turns instruction-tuned Gemma 2 expects.

    `<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n...`,
    as Gemma's own chat template: roles alternate user/model starting with
    the user (`"assistant"` is accepted for `"model"`), text is stripped of
    surrounding whitespace, and a leading `"system"` message, which Gemma
    has no turn for, is prepended to the first user message. `<bos>` is not
    written: the preprocessor adds it.

    Args:
        messages: a list of `{"role": ..., "content": ...}` dicts.
        add_generation_prompt: bool. End with an open `<start_of_turn>model`
            turn, for `generate` (as Gemma's template, whatever the last
            role). Defaults to `True`.
        tokenizer: optional `Gemma2Tokenizer` the prompt is meant for; its
            vocabulary is checked to hold the turn markers (a clear error
            instead of turns the model cannot see). Defaults to `None`
            (not checked).

    Returns:
        The prompt string.

    Example:
    ```python
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    prompt = keras_gemma2.format_chat(
        [{"role": "user", "content": "What is a tokenizer?"}],
        tokenizer=lm.preprocessor.tokenizer,
    )
    reply = lm.generate(prompt, max_new_tokens=8, strip_prompt=True)
    ```
    """
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    if isinstance(messages, dict) or not messages:
        raise ValueError(
            "`messages` must be a non-empty list of {'role', 'content'} "
            f"dicts; got {messages!r}."
        )
    messages = list(messages)
    for position, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or message.get("role") not in (*_ROLES, "system")
        ):
            raise ValueError(
                f"Message {position} must be a dict with a 'role' (user, "
                "model/assistant or a first system) and a string 'content'; "
                f"got {message!r}."
            )
    if messages[0]["role"] == "system":
        system = messages.pop(0)["content"].strip()
        if not messages or messages[0]["role"] != "user":
            raise ValueError(
                "A system message must be followed by a user message: Gemma "
                "has no system turn, so it is prepended to that message."
            )
        first = messages[0]["content"].strip()
        messages[0] = {"role": "user", "content": f"{system}\n\n{first}"}
    turns = []
    for position, message in enumerate(messages):
        role = _ROLES.get(message["role"])
        expected = "user" if position % 2 == 0 else "model"
        if role != expected:
            raise ValueError(
                f"Message {position} has role {message['role']!r} but roles "
                "must alternate user, model, user, ... starting with user "
                "(after an optional first system message)."
            )
        turns.append(
            f"{START_OF_TURN}{role}\n{message['content'].strip()}"
            f"{END_OF_TURN}\n"
        )
    if add_generation_prompt:
        turns.append(f"{START_OF_TURN}model\n")
    return "".join(turns)


def chat(lm, input_fn=input, output=None, max_new_tokens=256, system=None):
    """An interactive chat: reads user turns, streams the model's replies.

    Ends at end of input or on `/exit`; `/reset` forgets the conversation.
    A vocabulary without the turn markers is refused before the first turn.
    Prompts are bucketed by `generate`, so turns do not recompile.

    Args:
        lm: a `Gemma2CausalLM` with a preprocessor.
        input_fn: reads one user message (`input` by default).
        output: a text stream for the replies (`sys.stdout` by default).
        max_new_tokens: int. The longest reply.
        system: optional text prepended to the first user message.

    Returns:
        The conversation, a list of messages.
    """
    output = output or sys.stdout
    check_tokenizer(lm.preprocessor.tokenizer)  # before the first turn
    messages = []
    while True:
        try:
            text = input_fn()
        except EOFError:
            break
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        history = messages
        if system:
            history = [{"role": "system", "content": system}, *messages]
        reply = []
        for piece in lm.generate(
            format_chat(history), max_new_tokens=max_new_tokens, stream=True
        ):
            reply.append(piece)
            output.write(piece)
            output.flush()
        output.write("\n")
        output.flush()
        messages.append({"role": "model", "content": "".join(reply)})
    return messages
