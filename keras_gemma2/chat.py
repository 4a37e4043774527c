"""The Gemma chat format, and an interactive chat loop with streaming."""

import sys

from keras_gemma2.generation import Engine
from keras_gemma2.generation import Sequence
from keras_gemma2.generation import api as generation_api
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


class ChatSession:
    """A conversation whose caches persist between turns.

    Each turn prefills only its new tokens (the end of the last reply's
    turn, the user's message and the turn markers): the engine keeps the
    conversation's caches, and every local layer's ring holds exactly the
    last window of it. The replies equal those of re-running the whole
    conversation each turn.

    Args:
        lm: a `Gemma2CausalLM` with a preprocessor whose vocabulary holds
            the turn markers.
        system: optional text prepended to the first user message.
        max_length: int. The longest conversation, in tokens. Defaults to
            4096.
        max_new_tokens: int. The longest reply. Defaults to 256.
        **controls: sampling controls of `generate` (`temperature`,
            `top_p`, `seed`, ...), for every reply.

    Example:
    ```python
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    session = keras_gemma2.ChatSession(lm, max_new_tokens=8)
    reply = session.send("What is a tokenizer?")
    for piece in session.stream("And a vocabulary?"):
        print(piece, end="")
    session.prefilled  # tokens the second turn ran: only its new ones
    session.reset()  # forgets the conversation, frees its caches
    ```
    """

    def __init__(
        self, lm, system=None, max_length=4096, max_new_tokens=256, **controls
    ):
        tokenizer = lm.preprocessor.tokenizer
        check_tokenizer(tokenizer)
        self.lm = lm
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.params = generation_api.resolve_params(lm, None, controls)
        if self.params is None:
            raise ValueError(
                f"A chat needs a sampler that picks each token as it goes; "
                f"{type(lm.sampler).__name__} does not. "
                "`compile(sampler='greedy')` first."
            )
        self.engine = Engine(lm, max_batch=1, max_length=max_length)
        self.messages = []
        self.prefilled = 0
        self._sequence = None

    def send(self, message):
        """Adds a user message; returns the model's reply."""
        return "".join(self.stream(message))

    def stream(self, message):
        """Adds a user message; yields the reply's text as it is sampled."""
        sequence = Sequence(
            self._prompt_ids(message),
            max_new_tokens=self.max_new_tokens,
            params=self.params,
            stop_token_ids=self.lm.preprocessor.tokenizer.stop_token_ids,
            tokenizer=self.lm.preprocessor.tokenizer,
            stream=True,
        )
        free = self.engine.max_length - len(sequence.prompt_ids)
        if free < 1:
            raise ValueError(
                f"The conversation has {len(sequence.prompt_ids)} tokens, "
                f"the session's `max_length` of {self.engine.max_length}: "
                "`reset()` it, or make the session with a larger "
                "`max_length`."
            )
        before = self.engine.prefilled_tokens
        previous, self._sequence = self._sequence, sequence
        self.engine.add([sequence], reuse=previous)
        # The prompt's last token runs in the first decode step.
        self.prefilled = self.engine.prefilled_tokens - before + 1
        self.messages.append({"role": "user", "content": message})
        reply = []
        while not sequence.finished:
            for _, piece in self.engine.step():
                if piece:
                    reply.append(piece)
                    yield piece
        self.messages.append({"role": "model", "content": "".join(reply)})

    def reset(self):
        """Forgets the conversation and frees its caches."""
        if self._sequence is not None:
            self.engine.remove(self._sequence)
        self._sequence = None
        self.engine.cache = None
        self.messages = []

    def _prompt_ids(self, message):
        """The conversation's ids so far, then this turn's."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError(
                f"A chat message must be a non-empty string; got {message!r}."
            )
        tokenizer = self.lm.preprocessor.tokenizer
        if self._sequence is None:
            history = [{"role": "user", "content": message}]
            if self.system:
                history.insert(0, {"role": "system", "content": self.system})
            text = format_chat(history)
            return [tokenizer.start_token_id] + _ids(tokenizer, text)
        ids = list(self._sequence.ids)
        # A reply cut short, or ended by <eos>, still closes its turn.
        if ids[-1] != tokenizer.end_of_turn_token_id:
            if ids[-1] in tokenizer.stop_token_ids:
                ids = ids[:-1]
            ids.append(tokenizer.end_of_turn_token_id)
        turn = format_chat([{"role": "user", "content": message}])
        return ids + _ids(tokenizer, "\n" + turn)


def _ids(tokenizer, text):
    return [int(i) for i in tokenizer.tokenize(text)]


def chat(lm, input_fn=input, output=None, max_new_tokens=256, system=None):
    """An interactive chat: reads user turns, streams the model's replies.

    Ends at end of input or on `/exit`; `/reset` forgets the conversation.
    A vocabulary without the turn markers is refused before the first turn.
    The conversation's caches are kept between turns (`ChatSession`), so a
    turn prefills only its own tokens.

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
    session = ChatSession(lm, system=system, max_new_tokens=max_new_tokens)
    while True:
        try:
            text = input_fn()
        except EOFError:
            break
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            session.reset()
            continue
        if not text.strip():
            continue
        for piece in session.stream(text):
            output.write(piece)
            output.flush()
        output.write("\n")
        output.flush()
    return session.messages
