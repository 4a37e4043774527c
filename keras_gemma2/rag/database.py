"""A database folder on disk: its manifest, its Chroma file, their checks."""

import contextlib
import json
import os
import pathlib
import sqlite3

COLLECTION = "documents"
# Written last into each new state of the database: what is indexed, how.
MANIFEST = "keras_gemma2_rag.json"
FORMAT = "keras_gemma2.rag/1"
SQLITE = "chroma.sqlite3"  # Chroma's own file: the chunks, ids, metadata
_MANIFEST_KEYS = ("format", "embedding", "chunk_size", "chunk_overlap", "files")


class DamagedDatabaseError(ValueError):
    """A database folder with a manifest but no readable Chroma collection.

    Its message names the folder and the fix: delete it and index again.
    """


def damaged(db, what):
    """A `DamagedDatabaseError` that says what is wrong and how to fix it."""
    return DamagedDatabaseError(
        f"The RAG database {db} is damaged: {what}. Delete the folder and "
        f"index the documents again (`keras-gemma2 rag index DOCS_DIR --db "
        f"{db}`): it holds nothing that indexing does not rebuild."
    )


def read_manifest(db):
    """The database's manifest; `None` for a missing or empty folder."""
    if os.path.exists(db) and not os.path.isdir(db):
        raise ValueError(f"{db} is a file, not a database folder.")
    if not os.path.isdir(db) or not os.listdir(db):
        return None
    path = os.path.join(db, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(
            f"{db} is not empty and is not a keras_gemma2 RAG database (it "
            f"has no {MANIFEST}). Choose a new or empty folder for --db."
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, OSError) as error:  # JSON, UTF-8, or a folder
        raise damaged(db, f"its {MANIFEST} cannot be read ({error})") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise damaged(db, f"its {MANIFEST} is not a manifest")
    if manifest["format"] != FORMAT:
        raise ValueError(
            f"{path} is in format {manifest.get('format')!r}; this version "
            f"of keras_gemma2 reads {FORMAT!r}. Index into a new folder."
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise damaged(db, f"its {MANIFEST} has no {', '.join(missing)}")
    return manifest


def check_database(db):
    """Raises `DamagedDatabaseError` unless Chroma's file has our collection.

    Reads `chroma.sqlite3` with Python's own sqlite3, read-only and
    without Chroma (which rewrites files it opens), so that checking an
    up-to-date database changes nothing and imports nothing heavy.
    """
    path = os.path.join(db, SQLITE)
    if not os.path.isfile(path):
        raise damaged(db, f"its Chroma file {SQLITE} is missing")
    uri = pathlib.Path(path).as_uri() + "?mode=ro&immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            row = connection.execute(
                "SELECT id FROM collections WHERE name = ?", (COLLECTION,)
            ).fetchone()
    except sqlite3.DatabaseError as error:
        what = f"Chroma's {SQLITE} cannot be read ({error})"
        raise damaged(db, what) from None
    if row is None:
        raise damaged(db, f"its Chroma file has no collection {COLLECTION!r}")


def write_manifest(staging, metadata, files):
    """Writes the manifest of a new state, last: it marks the state whole."""
    manifest = {
        "format": FORMAT,
        **metadata,
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


@contextlib.contextmanager
def open_collection(db):
    """Yields `(collection, manifest)` of an existing database."""
    db = os.path.abspath(os.fspath(db))
    if not os.path.isdir(db) or not os.listdir(db):
        raise FileNotFoundError(
            f"No database at {db}. Create it first with `keras-gemma2 rag "
            f"index DOCS_DIR --db {db}` (or `rag.index`)."
        )
    manifest = read_manifest(db)
    check_database(db)
    with client(db, db) as chroma:
        yield get_collection(chroma, manifest, db), manifest


def get_collection(chroma, manifest, db):
    """The database's collection, checked against its manifest."""
    try:
        collection = chroma.get_collection(COLLECTION)
        count = collection.count()
    except Exception as error:  # Chroma's errors have no common base
        raise damaged(db, f"Chroma cannot read it ({error})") from None
    expected = sum(f["chunks"] for f in manifest["files"].values())
    if count != expected:
        raise damaged(
            db,
            f"its collection holds {count} chunks where its {MANIFEST} lists "
            f"{expected}",
        )
    return collection


@contextlib.contextmanager
def client(path, db):
    """A persistent Chroma client on `path` (database `db`), closed on exit."""
    # The rag extra, imported only to open a database: an up-to-date
    # `index` run never pays for it.
    import chromadb
    from chromadb.config import Settings

    # No telemetry: a local database stays local.
    settings = Settings(anonymized_telemetry=False)
    try:
        chroma = chromadb.PersistentClient(path, settings=settings)
    except Exception as error:  # Chroma's errors have no common base
        raise damaged(db, f"Chroma cannot open it ({error})") from None
    with chroma:
        yield chroma
