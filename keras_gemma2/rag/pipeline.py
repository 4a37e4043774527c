"""Retrieve chunks for a question, and answer it with Gemma 2."""

import dataclasses
import os
import re

import keras_gemma2
from keras_gemma2.rag import database
from keras_gemma2.rag import embeddings
from keras_gemma2.rag import store

PROMPT = (
    "Use the following pieces of context to answer the question at the "
    "end. If you don't know the answer, just say that you don't know, "
    "don't try to make up an answer.\n\n{context}\n\nQuestion: {question}\n"
    "Helpful Answer:"
)
DEFAULT_PRESET = "gemma2_tiny_en"


@dataclasses.dataclass
class Hit:
    """A retrieved chunk: its text, file, chunk number and distance.

    `distance` is the cosine distance to the question (0 is the same
    direction, 2 the opposite); `start` is the chunk's character offset in
    its file.
    """

    text: str
    source: str
    chunk: int
    distance: float
    start: int = 0


@dataclasses.dataclass
class Answer:
    """A generated answer, the exact prompt, and the chunks it was given."""

    text: str
    prompt: str
    sources: list


def retrieve(question, db, k=3, embedding=None):
    """The `k` chunks of a database nearest to a question, nearest first.

    Args:
        question: str, or a list of str to retrieve for several questions
            at once (one model call, one database query).
        db: str. A database folder written by `index`.
        k: int. How many chunks. Defaults to `3`.
        embedding: `None` (the database's own model) or the same model or
            `Embedder` the database was indexed with.

    Returns:
        A list of up to `k` `Hit`s; for a list of questions, one such list
        per question.

    Example:
    ```python
    import pathlib, tempfile
    from keras_gemma2 import rag

    docs = pathlib.Path(tempfile.mkdtemp())
    (docs / "cats.md").write_text("Cats sleep most of the day.")
    (docs / "tides.md").write_text("The moon's pull raises the tides.")
    db = docs.parent / (docs.name + "_db")
    rag.index(docs, db)
    hits = rag.retrieve("Why does the sea rise and fall?", db, k=1)
    assert hits[0].source == "tides.md"
    ```
    """
    questions = [question] if isinstance(question, str) else list(question)
    if not questions or not all(
        isinstance(q, str) and q.strip() for q in questions
    ):
        raise ValueError(f"Ask a non-empty question; got {question!r}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive number of chunks; got {k!r}.")
    db = os.path.abspath(os.fspath(db))
    with database.open_collection(db) as (collection, manifest):
        embedder = store.get_embedder(embedding, manifest, db)
        vectors = embeddings.embed(embedder, questions, query=True)
        model = (collection.metadata or {}).get("embedding_model")
        if model != manifest["embedding"]["name"]:
            raise ValueError(
                f"{db}'s collection was embedded with {model!r} but its "
                f"manifest names {manifest['embedding']['name']!r}; index "
                "the documents into a new --db."
            )
        count = collection.count()
        if count == 0:
            raise ValueError(
                f"{db} holds no chunks (the indexed files have no text), so "
                "nothing can answer the question. Index some documents."
            )
        found = collection.query(
            query_embeddings=vectors,
            n_results=min(k, count),
            include=["documents", "metadatas", "distances"],
        )
    hits = [
        [
            Hit(
                text=text,
                source=metadata["source"],
                chunk=metadata["chunk"],
                distance=float(distance),
                start=metadata.get("start", 0),
            )
            for text, metadata, distance in zip(*row)
        ]
        for row in zip(
            found["documents"], found["metadatas"], found["distances"]
        )
    ]
    return hits[0] if isinstance(question, str) else hits


def build_prompt(question, hits):
    """The question-answering prompt: the hits' text, then the question.

    Args:
        question: str. The question.
        hits: a list of `Hit`s (or of strings), nearest first.

    Returns:
        The prompt string.

    Example:
    ```python
    from keras_gemma2 import rag

    hit = rag.Hit("Cats sleep most of the day.", "cats.md", 0, 0.2)
    prompt = rag.build_prompt("How long do cats sleep?", [hit])
    assert "Cats sleep most of the day." in prompt
    assert prompt.endswith("Question: How long do cats sleep?\\n"
                           "Helpful Answer:")
    ```
    """
    context = "\n\n".join(getattr(hit, "text", hit) for hit in hits)
    return PROMPT.format(context=context, question=question.strip())


def ask(
    question,
    db,
    k=3,
    lm=None,
    max_new_tokens=256,
    chat=None,
    embedding=None,
):
    """Answers a question from the `k` nearest chunks of a database.

    Args:
        question: str. The question.
        db: str. A database folder written by `index`.
        k: int. How many chunks go into the prompt. Defaults to `3`.
        lm: `None`, a preset name or folder, or a `Gemma2CausalLM`.
            Defaults to the bundled tiny preset `"gemma2_tiny_en"`, a toy
            whose answers are not meaningful.
        max_new_tokens: int. The longest answer in tokens. Defaults to
            `256`.
        chat: bool. Wrap the prompt in a Gemma chat turn, as
            instruction-tuned models expect. Defaults to whether the preset
            name says it is one ("instruct", or "-it" as on Hugging Face);
            `False` for a model passed in.
        embedding: see `retrieve`.

    Returns:
        An `Answer`: the generated text, the prompt it came from, and the
        retrieved `Hit`s as its sources.

    Example:
    ```python
    import pathlib, tempfile
    from keras_gemma2 import rag

    docs = pathlib.Path(tempfile.mkdtemp())
    (docs / "cats.md").write_text("Cats sleep most of the day.")
    db = docs.parent / (docs.name + "_db")
    rag.index(docs, db)
    answer = rag.ask("How long do cats sleep?", db, max_new_tokens=8)
    assert answer.sources[0].source == "cats.md"
    assert answer.sources[0].text in answer.prompt
    ```
    """
    hits = retrieve(question, db, k=k, embedding=embedding)
    if lm is None or isinstance(lm, (str, os.PathLike)):
        name = os.fspath(lm or DEFAULT_PRESET)
        if chat is None:
            chat = is_instruction_tuned(name)
        lm = keras_gemma2.Gemma2CausalLM.from_preset(name)
    prompt = build_prompt(question, hits)
    if chat:
        prompt = keras_gemma2.format_chat(
            [{"role": "user", "content": prompt}],
            tokenizer=getattr(lm.preprocessor, "tokenizer", None),
        )
    text = lm.generate(prompt, max_new_tokens=max_new_tokens, strip_prompt=True)
    return Answer(text=text.strip(), prompt=prompt, sources=hits)


def is_instruction_tuned(preset):
    """Whether a preset's name marks it instruction-tuned."""
    name = os.path.basename(os.path.normpath(preset)).lower()
    return bool(re.search(r"instruct|(^|[-_])it($|[-_])", name))
