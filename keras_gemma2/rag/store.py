"""Incremental, atomic indexing of a folder into a Chroma database."""

import dataclasses
import hashlib
import os
import pathlib
import shutil
import warnings

from keras_gemma2 import atomic
from keras_gemma2.rag import chunking
from keras_gemma2.rag import database
from keras_gemma2.rag import embeddings
from keras_gemma2.rag import lock

DEFAULT_GLOBS = ("**/*.md", "**/*.txt")


@dataclasses.dataclass
class IndexReport:
    """What an `index` run changed, by source path (relative to the folder).

    `skipped_files` are binary or not UTF-8 (each also warned about); any
    chunks they had are removed. `chunks_added` and `chunks_removed` count
    the chunks written to and deleted from the database. `written` says
    whether the run wrote a new state of the database at all: not when
    nothing changed.
    """

    added_files: list = dataclasses.field(default_factory=list)
    updated_files: list = dataclasses.field(default_factory=list)
    removed_files: list = dataclasses.field(default_factory=list)
    unchanged_files: list = dataclasses.field(default_factory=list)
    skipped_files: list = dataclasses.field(default_factory=list)
    chunks_added: int = 0
    chunks_removed: int = 0
    written: bool = False


def index(
    docs_dir,
    db,
    glob=DEFAULT_GLOBS,
    chunk_size=1000,
    chunk_overlap=200,
    embedding=None,
    lock_timeout=600.0,
):
    """Indexes text and Markdown files into a persistent Chroma database.

    Files are split with `split_text`, embedded, and stored with their
    source path, chunk number, start offset and the SHA-256 of the file.
    Run it again after editing the folder: only files whose content hash
    changed are embedded again, chunks of deleted files are removed, and
    an unchanged folder writes nothing. Each run builds the new state in a
    copy of the database beside it, flushes it to disk and swaps it in
    with a rename, so an interrupted run (or a power cut) leaves the
    previous database as it was. Runs on the same database take turns: a
    second one waits for the first (see `lock_timeout`), then indexes
    what is left to do. A database whose Chroma files were deleted or
    damaged raises `DamagedDatabaseError`, which says how to rebuild it.

    Args:
        docs_dir: str. The folder to index.
        db: str. The database folder; created if missing.
        glob: str or list of str. Patterns relative to `docs_dir`; files
            and folders whose name starts with "." are left out. Defaults
            to `("**/*.md", "**/*.txt")`.
        chunk_size: int. The longest chunk in characters. Defaults to
            `1000`.
        chunk_overlap: int. Characters shared by consecutive chunks.
            Defaults to `200`.
        embedding: `None`, a model folder or Hugging Face id (see
            `SentenceEmbedder`), or an `Embedder`. Defaults to the model the
            database was built with, else all-MiniLM-L6-v2. A database
            refuses a model other than its own.
        lock_timeout: float. Seconds to wait for another `index` run on
            the same database to finish before raising
            `rag.DatabaseBusyError` (a `ValueError` and a `TimeoutError`).
            Defaults to `600`.

    Returns:
        An `IndexReport`.

    Example:
    ```python
    import pathlib, tempfile
    from keras_gemma2 import rag

    docs = pathlib.Path(tempfile.mkdtemp())
    (docs / "cats.md").write_text("Cats sleep most of the day.")
    db = docs.parent / (docs.name + "_db")
    report = rag.index(docs, db)
    assert report.added_files == ["cats.md"]
    assert not rag.index(docs, db).written  # nothing to do the second time
    ```
    """
    chunking.check_chunking(chunk_size, chunk_overlap)
    db = os.path.abspath(os.fspath(db))
    settings = {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap}
    with lock.locked(db, timeout=lock_timeout):
        return _index_locked(docs_dir, db, glob, settings, embedding)


def _index_locked(docs_dir, db, glob, settings, embedding):
    """`index`, holding the database's lock."""
    manifest = database.read_manifest(db)
    if manifest is not None:
        database.check_database(db)
    embedder = get_embedder(embedding, manifest, db)
    texts, report = _read_folder(docs_dir, glob, db)
    old_files = manifest["files"] if manifest else {}
    same_chunking = manifest is not None and all(
        manifest[key] == value for key, value in settings.items()
    )
    changed = {}
    for source, (digest, text) in texts.items():
        if source not in old_files:
            report.added_files.append(source)
        elif old_files[source]["sha256"] != digest or not same_chunking:
            report.updated_files.append(source)
        else:
            report.unchanged_files.append(source)
            continue
        changed[source] = (digest, text)
    report.removed_files = sorted(
        s for s in old_files if s not in texts and s not in report.skipped_files
    )
    gone = report.updated_files + report.removed_files
    gone += [s for s in report.skipped_files if s in old_files]
    if not changed and not gone and manifest is not None:
        return report
    files = {s: old_files[s] for s in report.unchanged_files}
    with atomic.staged_folder(db, "indexing") as staging:
        if manifest is not None:
            shutil.copytree(db, staging, dirs_exist_ok=True)
        with database.client(staging, db) as client:
            collection = _Collection(client, embedder, manifest, settings, db)
            for source in gone:
                report.chunks_removed += old_files[source]["chunks"]
                collection.delete(source)
            for source, (digest, text) in changed.items():
                count = collection.add(source, digest, text)
                files[source] = {"sha256": digest, "chunks": count}
                report.chunks_added += count
            collection.finish()
        database.write_manifest(staging, collection.metadata, files)
    report.written = True
    return report


def get_embedder(embedding, manifest, db):
    """The embedder to use with a database, refusing a different model."""
    stored = manifest["embedding"] if manifest else None
    if embedding is None and stored is not None:
        if not stored["loadable"]:
            raise ValueError(
                f"{db} was indexed with the embedding function "
                f"{stored['name']!r}; pass the same function again."
            )
        embedding = stored["name"]
    if embedding is None or isinstance(embedding, (str, os.PathLike)):
        embedder = embeddings.SentenceEmbedder(embedding)  # resolves only
        if stored is not None and embedder.name != stored["name"]:
            _refuse(db, stored, embedder.name)
        return embedder
    if not callable(embedding):
        raise TypeError(
            "`embedding` must be a model folder or name, or a function from "
            f"a list of texts to an array; got {type(embedding).__name__}."
        )
    name = embeddings.embedder_name(embedding)
    if stored is not None and name != stored["name"]:
        _refuse(db, stored, name)
    return embedding


def _refuse(db, stored, name):
    raise ValueError(
        f"{db} was indexed with the embedding model {stored['name']!r} "
        f"({stored['dimension']} dimensions), not {name!r}: vectors of "
        "different models cannot be compared. Leave --embedding out to use "
        "the database's model, or index into a new --db."
    )


def _read_folder(docs_dir, glob, db):
    """`{source: (sha256, text)}` of the readable files, and a report."""
    docs_dir = pathlib.Path(docs_dir).absolute()
    if not docs_dir.is_dir():
        raise FileNotFoundError(
            f"{docs_dir} is not a folder. Pass the folder of documents to "
            "index."
        )
    globs = [glob] if isinstance(glob, str) else list(glob)
    paths = sorted(
        {
            path
            for pattern in globs
            for path in docs_dir.glob(pattern)
            if _wanted(path, docs_dir, db)
        }
    )
    if not paths:
        if not any(docs_dir.iterdir()):
            raise ValueError(f"{docs_dir} is empty: there is nothing to index.")
        raise ValueError(
            f"No file in {docs_dir} matches {' or '.join(globs)}. Pass "
            "--glob with a pattern that does, e.g. '**/*.rst'."
        )
    report = IndexReport()
    texts = {}
    for path in paths:
        source = path.relative_to(docs_dir).as_posix()
        data = path.read_bytes()
        text, reason = _decode(data)
        if reason:
            warnings.warn(f"Skipped {source}: {reason}.", stacklevel=3)
            report.skipped_files.append(source)
            continue
        texts[source] = (hashlib.sha256(data).hexdigest(), text)
    if not texts:
        raise ValueError(
            f"None of the {len(paths)} files matched in {docs_dir} is UTF-8 "
            "text; nothing was indexed."
        )
    return texts, report


def _wanted(path, docs_dir, db):
    """A file under `docs_dir`, outside `db`, in no hidden folder."""
    parts = path.relative_to(docs_dir).parts
    if any(part.startswith(".") for part in parts):
        return False
    inside_db = os.path.commonpath([str(path), db]) == db
    return path.is_file() and not inside_db


def _decode(data):
    """`(text, None)` for UTF-8 text, else `(None, why it is skipped)`."""
    if b"\0" in data:
        return None, "binary (has NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 ({error.reason} at byte {error.start})"
    return text.replace("\r\n", "\n").replace("\r", "\n"), None


class _Collection:
    """The staging copy's collection, created at the first vectors."""

    def __init__(self, client, embedder, manifest, settings, db):
        self.client = client
        self.embedder = embedder
        self.metadata = {
            "embedding": {
                "name": embeddings.embedder_name(embedder),
                "dimension": manifest and manifest["embedding"]["dimension"],
                "loadable": isinstance(embedder, embeddings.SentenceEmbedder),
            },
            **settings,
        }
        self.collection = None
        if manifest is not None:
            self.collection = database.get_collection(client, manifest, db)
        self.batch_size = client.get_max_batch_size()

    def delete(self, source):
        self.collection.delete(where={"source": source})

    def add(self, source, digest, text):
        """Embeds and adds the chunks of one file; returns their count."""
        chunks = chunking.split_text(
            text, self.metadata["chunk_size"], self.metadata["chunk_overlap"]
        )
        if not chunks:
            return 0
        vectors = embeddings.embed(self.embedder, [c for _, c in chunks])
        self._check_dimension(vectors.shape[1])
        ids = [f"{source}::{digest[:16]}::{i}" for i in range(len(chunks))]
        metadatas = [
            {"source": source, "chunk": i, "start": start, "sha256": digest}
            for i, (start, _) in enumerate(chunks)
        ]
        for first in range(0, len(chunks), self.batch_size):
            rows = slice(first, first + self.batch_size)
            self.collection.add(
                ids=ids[rows],
                embeddings=vectors[rows],
                documents=[c for _, c in chunks[rows]],
                metadatas=metadatas[rows],
            )
        return len(chunks)

    def finish(self):
        """Creates the collection if no file had chunks; syncs metadata."""
        if self.metadata["embedding"]["dimension"] is None:
            probe = embeddings.embed(self.embedder, ["dimension"])
            self._check_dimension(probe.shape[1])
        self.collection.modify(metadata=self._chroma_metadata())

    def _check_dimension(self, dimension):
        stored = self.metadata["embedding"]["dimension"]
        if stored is not None and stored != dimension:
            raise ValueError(
                f"The embedding function returned {dimension}-dimensional "
                f"vectors; the database holds {stored}-dimensional ones."
            )
        self.metadata["embedding"]["dimension"] = dimension
        if self.collection is None:
            self.collection = self.client.create_collection(
                database.COLLECTION,
                metadata=self._chroma_metadata(),
                # 1 - cosine similarity: blind to the vectors' norms, so
                # any embedder's vectors rank as its model intends.
                configuration={"hnsw": {"space": "cosine"}},
                embedding_function=None,  # never Chroma's downloading one
            )

    def _chroma_metadata(self):
        """The manifest's settings, flat, for Chroma's collection metadata."""
        return {
            "embedding_model": self.metadata["embedding"]["name"],
            "embedding_dimension": self.metadata["embedding"]["dimension"],
            "chunk_size": self.metadata["chunk_size"],
            "chunk_overlap": self.metadata["chunk_overlap"],
        }
