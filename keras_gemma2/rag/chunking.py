"""Recursive character splitting of text into overlapping chunks."""

import collections

# Paragraphs, then lines, then words, then single characters.
SEPARATORS = ("\n\n", "\n", " ", "")


def split_text(text, chunk_size=1000, chunk_overlap=200):
    """Splits text into chunks of at most `chunk_size` characters.

    The text is cut at paragraph breaks (`"\\n\\n"`) first; a piece still
    longer than `chunk_size` is cut at line breaks, then at spaces, then
    between characters. Consecutive pieces are then merged back into chunks
    of up to `chunk_size` characters, each starting with up to
    `chunk_overlap` characters from the end of the previous one. This is
    LangChain's `RecursiveCharacterTextSplitter` with its defaults (the
    separator kept at the start of the piece it precedes, chunks stripped of
    surrounding whitespace), written here so that no LangChain is needed.

    Args:
        text: str. The text to split.
        chunk_size: int. The longest chunk, in characters. Defaults to
            `1000`.
        chunk_overlap: int. The most characters a chunk repeats from the
            end of the previous one; less than `chunk_size`. Defaults to
            `200`.

    Returns:
        A list of `(start, chunk)` pairs: each chunk is `text[start:start +
        len(chunk)]`, never empty, never only whitespace.

    Example:
    ```python
    from keras_gemma2 import rag

    text = "First paragraph.\\n\\nA second one, a bit longer than that."
    chunks = rag.split_text(text, chunk_size=30, chunk_overlap=10)
    assert [c for _, c in chunks] == [
        "First paragraph.", "A second one, a bit longer", "longer than that."
    ]
    assert all(text[s:s + len(c)] == c for s, c in chunks)
    ```
    """
    check_chunking(chunk_size, chunk_overlap)
    spans = _split(text, 0, len(text), SEPARATORS, chunk_size, chunk_overlap)
    chunks = []
    for start, end in spans:
        chunk = text[start:end]
        stripped = chunk.lstrip()
        start += len(chunk) - len(stripped)
        stripped = stripped.rstrip()
        if stripped:
            chunks.append((start, stripped))
    return chunks


def check_chunking(chunk_size, chunk_overlap):
    """Raises a `ValueError` unless `0 <= chunk_overlap < chunk_size`."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive number of characters; got "
            f"{chunk_size!r}."
        )
    if not isinstance(chunk_overlap, int) or not (
        0 <= chunk_overlap < chunk_size
    ):
        raise ValueError(
            f"chunk_overlap must be at least 0 and less than chunk_size "
            f"({chunk_size}); got {chunk_overlap!r}. Lower the overlap or "
            "raise the chunk size."
        )


def _split(text, start, end, separators, chunk_size, chunk_overlap):
    """`(start, end)` spans of `text[start:end]`, recursively split."""
    # The first separator found in the text; "" always matches.
    for position, separator in enumerate(separators):
        if separator == "" or text.find(separator, start, end) >= 0:
            break
    finer = separators[position + 1 :]
    chunks, small = [], []
    for piece in _pieces(text, start, end, separator):
        if piece[1] - piece[0] < chunk_size:
            small.append(piece)
            continue
        if small:
            chunks.extend(_merge(small, chunk_size, chunk_overlap))
            small = []
        if finer:
            chunks.extend(
                _split(text, *piece, finer, chunk_size, chunk_overlap)
            )
        else:
            chunks.append(piece)
    if small:
        chunks.extend(_merge(small, chunk_size, chunk_overlap))
    return chunks


def _pieces(text, start, end, separator):
    """Contiguous spans cut before each `separator`; empty ones dropped."""
    if separator == "":
        return [(i, i + 1) for i in range(start, end)]
    cuts = [start]
    found = text.find(separator, start, end)
    while found >= 0:
        cuts.append(found)
        found = text.find(separator, found + len(separator), end)
    cuts.append(end)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _merge(pieces, chunk_size, chunk_overlap):
    """Merges contiguous pieces into spans of at most `chunk_size`.

    Each new span starts with the trailing pieces of the previous one that
    fit in `chunk_overlap` (LangChain's `_merge_splits` with the separator
    kept in the pieces, so joining adds no characters).
    """
    spans = []
    current = collections.deque()
    total = 0
    for piece in pieces:
        length = piece[1] - piece[0]
        if current and total + length > chunk_size:
            spans.append((current[0][0], current[-1][1]))
            while total > chunk_overlap or (
                total > 0 and total + length > chunk_size
            ):
                first = current.popleft()
                total -= first[1] - first[0]
        current.append(piece)
        total += length
    if current:
        spans.append((current[0][0], current[-1][1]))
    return spans
