"""Token ids to text while generating: incremental detokenizing and stop
strings that may span several tokens."""

import numpy as np


def detokenize(tokenizer, ids):
    """The text of `ids` (a list of ints) as a Python string."""
    text = tokenizer.detokenize(np.asarray(ids, "int32"))
    if hasattr(text, "numpy"):
        text = text.numpy()
    if isinstance(text, np.ndarray):
        text = text.item()
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text


class TextStream:
    """Turns a growing list of token ids into new text, piece by piece.

    SentencePiece decodes a token differently depending on its neighbours
    (a leading space, bytes of one character split across tokens), so the
    whole continuation is detokenized each time and only the new suffix is
    yielded; text ending in an incomplete character waits for more tokens.

    With `stop` strings, the text ends before the first of them, even one
    spread over several tokens, and no piece shows the start of a stop
    string before it is settled: text that could still grow into one is
    held back until the next tokens decide.

    Example:
    ```python
    tokenizer = keras_gemma2.Gemma2Tokenizer.from_preset("gemma2_tiny_en")
    stream = keras_gemma2.generation.TextStream(tokenizer, stop=["\\n\\n"])
    ids = [int(i) for i in tokenizer.tokenize("one two\\n\\nthree")]
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) == "one two" and stream.stopped
    ```
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids = []
        # Everything detokenized, and the part already handed out.
        self.decoded = ""
        self.text = ""
        self.stopped = False

    def push(self, ids):
        """Adds token ids; returns the text they settle (maybe "")."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        decoded = detokenize(self.tokenizer, self.ids)
        if decoded.endswith("\ufffd") or not decoded.startswith(self.text):
            return ""
        self.decoded = decoded
        settled = decoded
        if self.stop:
            # A stop string can only start where it was not already seen.
            begin = max(0, len(self.text) - max(map(len, self.stop)))
            found = [
                i for i in (decoded.find(s, begin) for s in self.stop) if i >= 0
            ]
            if found:
                self.stopped = True
                settled = decoded[: min(found)]
            else:
                settled = decoded[: len(decoded) - self._held_back(decoded)]
        settled = max(settled, self.text, key=len)
        new, self.text = settled[len(self.text) :], settled
        return new

    def finish(self):
        """The held-back text once no token follows (no stop string came)."""
        if self.stopped or not self.decoded.startswith(self.text):
            return ""
        new, self.text = self.decoded[len(self.text) :], self.decoded
        return new

    def _held_back(self, text):
        """Length of the longest end of `text` that begins a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
