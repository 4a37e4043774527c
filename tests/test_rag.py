"""keras_gemma2.rag: chunking, embeddings, incremental atomic indexing.

Everything runs for real: a Chroma database on disk, the bundled
all-MiniLM-L6-v2, the tiny preset. Only `ask` depends on the Keras backend,
so the rest runs once, in the JAX pass.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_gemma2 import cli
from keras_gemma2 import datasets
from keras_gemma2 import rag
from keras_gemma2.rag import database
from keras_gemma2.rag import lock
from keras_gemma2.rag import pipeline

chromadb = pytest.importorskip("chromadb")

jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Backend-independent (no Keras): runs once, in the JAX pass.",
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # On 2 busy cores torch's two intra-op threads spin against the other
    # work: indexing the corpus took 18-24 s with 2 threads, 3.4 s with 1.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedder():
    return rag.SentenceEmbedder()


@pytest.fixture(scope="module")
def corpus_db(tmp_path_factory, embedder):
    db = tmp_path_factory.mktemp("rag") / "corpus_db"
    report = rag.index(datasets.rag_docs_path(), db, embedding=embedder)
    assert len(report.added_files) == 36 and not report.skipped_files
    return db


def _write(folder, files):
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.unlink()
        elif isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")


def _snapshot(folder):
    """`{relative path: (mtime_ns, sha256)}` of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            files[os.path.relpath(path, folder)] = (
                os.stat(path).st_mtime_ns,
                digest,
            )
    return files


def _contents(db):
    """`{chunk id: (source, document, embedding)}` of a database."""
    with database.open_collection(db) as (collection, _):
        got = collection.get(include=["metadatas", "documents", "embeddings"])
    return {
        i: (m["source"], d, np.asarray(e).tolist())
        for i, m, d, e in zip(
            got["ids"], got["metadatas"], got["documents"], got["embeddings"]
        )
    }


DOCS = {
    "cats.md": "# Cats\n\nCats sleep for most of the day, up to sixteen "
    "hours.\n\nThey purr when content.",
    "notes/tides.txt": "The moon's pull raises the tides twice a day.",
    "notes/bread.md": "Knead the dough for ten minutes, then let it rise "
    "in a warm place until doubled.",
}
DOCS_Z = "Kneading bread dough takes one hour."


@jax_only
class TestSplitText:
    def test_separators_in_order(self):
        text = (
            "Alpha beta.\n\n"  # a paragraph that fits
            "Gamma delta epsilon.\nZeta eta.\n\n"  # cut at its line break
            "Theta iota kappa lambda mu"  # cut at spaces
        )
        chunks = rag.split_text(text, chunk_size=22, chunk_overlap=6)
        assert [c for _, c in chunks] == [
            "Alpha beta.",
            "Gamma delta epsilon.",
            "Zeta eta.",
            "Theta iota kappa",
            "kappa lambda mu",
        ]
        assert all(text[s : s + len(c)] == c for s, c in chunks)

    def test_paragraphs_before_lines(self):
        # Cut at lines first, "Intro." and "Line one." would share a chunk.
        text = "Intro.\n\nLine one.\nLine two is long."
        chunks = rag.split_text(text, chunk_size=20, chunk_overlap=0)
        assert chunks == [(0, "Intro."), (8, "Line one."), (18, text[18:])]

    def test_a_word_longer_than_a_chunk_is_cut_between_characters(self):
        chunks = rag.split_text("abcdefghij", chunk_size=4, chunk_overlap=1)
        assert [c for _, c in chunks] == ["abcd", "defg", "ghij"]

    def test_invariants_on_random_text(self):
        rng = random.Random(0)
        words = ["a", "bb", "lorem", "ipsum", "x" * 9, "y" * 30]
        gaps = [" ", " ", "\n", "\n\n", "  "]
        for _ in range(200):
            text = "".join(
                rng.choice(words) + rng.choice(gaps)
                for _ in range(rng.randint(0, 60))
            )
            size = rng.randint(2, 50)
            overlap = rng.randint(0, size - 1)
            chunks = rag.split_text(text, size, overlap)
            covered = np.zeros(len(text), bool)
            for start, chunk in chunks:
                assert 0 < len(chunk) <= size
                assert chunk == chunk.strip()
                assert text[start : start + len(chunk)] == chunk
                covered[start : start + len(chunk)] = True
            # Every non-space character is in some chunk, in order.
            assert all(covered[i] for i, c in enumerate(text) if c.strip())
            starts = [s for s, _ in chunks]
            assert starts == sorted(starts)
            for (s0, c0), (s1, _) in zip(chunks, chunks[1:]):
                assert s0 + len(c0) - s1 <= overlap

    def test_overlap_must_be_below_the_size(self):
        with pytest.raises(ValueError, match="less than chunk_size"):
            rag.split_text("text", chunk_size=10, chunk_overlap=10)
        with pytest.raises(ValueError, match="chunk_size"):
            rag.split_text("text", chunk_size=0, chunk_overlap=0)


@jax_only
class TestEmbeddings:
    def test_matches_sentence_transformers(self, embedder):
        st = pytest.importorskip("sentence_transformers")
        texts = ["A cat sat on the mat.", "Tides rise twice a day." * 60, ""]
        ours = embedder(texts)
        reference = st.SentenceTransformer(embedder.path, device="cpu")
        theirs = reference.encode(texts, convert_to_numpy=True)
        assert ours.shape == (3, 384)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)

    def test_similar_sentences_are_nearer(self, embedder):
        a, b, c = embedder(
            ["How long do cats sleep?", "Cats doze sixteen hours a day.", "Tax"]
        )
        assert a @ b > a @ c + 0.3

    def test_unknown_models_are_refused_offline(self):
        with pytest.raises(ValueError, match="nomic-embed-text-v1.5.*Ollama"):
            rag.SentenceEmbedder("nomic-embed-text")
        with pytest.raises(ValueError, match="mixedbread-ai/mxbai-embed-large"):
            rag.SentenceEmbedder("mxbai-embed-large")
        with pytest.raises(ValueError, match="never downloads"):
            rag.SentenceEmbedder("someone/no-such-model")


@jax_only
class TestIndex:
    def test_incremental(self, tmp_path, embedder):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        report = rag.index(docs, db, chunk_size=60, chunk_overlap=10)
        assert report.added_files == sorted(DOCS) and report.written
        first = _contents(db)
        assert {s for s, _, _ in first.values()} == set(DOCS)
        assert report.chunks_added == len(first) > len(DOCS)

        # Unchanged: not a byte written, the model not even needed.
        before = _snapshot(db)
        again = rag.index(docs, db, chunk_size=60, chunk_overlap=10)
        assert not again.written and again.chunks_added == 0
        assert again.chunks_removed == 0
        assert again.unchanged_files == sorted(DOCS)
        assert _snapshot(db) == before

        # One file edited: only its chunks are replaced.
        _write(docs, {"notes/tides.txt": "Tides follow the moon."})
        edited = rag.index(docs, db, chunk_size=60, chunk_overlap=10)
        assert edited.updated_files == ["notes/tides.txt"]
        assert edited.unchanged_files == ["cats.md", "notes/bread.md"]
        second = _contents(db)
        old_tides = {i for i, v in first.items() if v[0] == "notes/tides.txt"}
        kept = {i: v for i, v in first.items() if i not in old_tides}
        assert {i: second[i] for i in kept} == kept  # same ids and vectors
        new = set(second) - set(kept)
        assert [second[i][1] for i in new] == ["Tides follow the moon."]
        assert edited.chunks_removed == len(old_tides)
        assert edited.chunks_added == 1

        # One file deleted: its chunks go.
        _write(docs, {"cats.md": None})
        removed = rag.index(docs, db, chunk_size=60, chunk_overlap=10)
        assert removed.removed_files == ["cats.md"]
        third = _contents(db)
        assert "cats.md" not in {s for s, _, _ in third.values()}
        assert {i: third[i] for i in third} == {
            i: v for i, v in second.items() if v[0] != "cats.md"
        }

        # New chunking settings: every file is split again.
        resplit = rag.index(docs, db, chunk_size=500, chunk_overlap=0)
        assert resplit.updated_files == ["notes/bread.md", "notes/tides.txt"]
        assert len(_contents(db)) == 2

    def test_interrupted_run_leaves_the_previous_database(
        self, tmp_path, embedder
    ):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        rag.index(docs, db, embedding=embedder)
        question = "How long should the dough be kneaded?"
        hits = rag.retrieve(question, db, k=3)
        before = _snapshot(db)

        class Interrupted(embedder.__class__):
            """The real model, stopped (Ctrl-C) at its second call."""

            calls = 0

            def __call__(self, texts):
                Interrupted.calls += 1
                if Interrupted.calls == 2:
                    raise KeyboardInterrupt
                return super().__call__(texts)

        _write(
            docs,
            {
                "cats.md": "Dogs bark.",
                "notes/bread.md": None,
                "z.md": DOCS_Z,
            },
        )
        with pytest.raises(KeyboardInterrupt):
            rag.index(docs, db, embedding=Interrupted())
        assert Interrupted.calls == 2  # it stopped midway through the files
        assert _snapshot(db) == before
        assert sorted(os.listdir(tmp_path)) == ["db", "docs"]  # no staging
        assert rag.retrieve(question, db, k=3) == hits

        report = rag.index(docs, db)
        assert report.added_files == ["z.md"]
        assert report.updated_files == ["cats.md"]
        assert report.removed_files == ["notes/bread.md"]
        top = rag.retrieve(question, db, k=1)[0]
        assert (top.source, top.text) == ("z.md", DOCS_Z)

    def test_undecodable_files_are_skipped(self, tmp_path):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(
            docs,
            {
                "good.md": "Readable text.",
                "image.md": b"\x89PNG\r\n\x1a\n\x00\x00",
                "latin1.txt": "café".encode("latin-1"),
                ".hidden/secret.md": "Not indexed.",
                "notes.rst": "Not matched.",
            },
        )
        with pytest.warns(UserWarning) as caught:
            report = rag.index(docs, db)
        messages = sorted(str(w.message) for w in caught)
        assert messages[0].startswith("Skipped image.md: binary")
        assert messages[1].startswith("Skipped latin1.txt: not UTF-8")
        assert report.added_files == ["good.md"]
        assert report.skipped_files == ["image.md", "latin1.txt"]
        assert {s for s, _, _ in _contents(db).values()} == {"good.md"}

    def test_bad_folders(self, tmp_path):
        db = tmp_path / "db"
        with pytest.raises(FileNotFoundError, match="is not a folder"):
            rag.index(tmp_path / "missing", db)
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="is empty"):
            rag.index(tmp_path / "empty", db)
        _write(tmp_path / "docs", {"a.pdf": b"%PDF", "b.md": b"\xff\xfe\x00"})
        with pytest.raises(ValueError, match=r"matches \*\*/\*.rst"):
            rag.index(tmp_path / "docs", db, glob="**/*.rst")
        with pytest.warns(UserWarning), pytest.raises(ValueError, match="UTF"):
            rag.index(tmp_path / "docs", db)
        with pytest.raises(ValueError, match="less than chunk_size"):
            rag.index(tmp_path / "docs", db, chunk_size=100, chunk_overlap=100)
        _write(tmp_path / "mine", {"thesis.tex": "Years of work."})
        with pytest.raises(ValueError, match="not a keras_gemma2 RAG database"):
            rag.index(tmp_path / "docs", tmp_path / "mine")
        assert not db.exists()
        assert os.listdir(tmp_path / "mine") == ["thesis.tex"]

    def test_missing_and_empty_databases(self, tmp_path):
        missing = tmp_path / "missing_db"
        with pytest.raises(FileNotFoundError, match="rag index DOCS_DIR"):
            rag.retrieve("Anything?", missing)
        assert not missing.exists()  # not created empty
        _write(tmp_path / "docs", {"blank.md": "\n\n   \n"})
        report = rag.index(tmp_path / "docs", tmp_path / "db")
        assert report.added_files == ["blank.md"] and report.chunks_added == 0
        with pytest.raises(ValueError, match="holds no chunks"):
            rag.retrieve("Anything?", tmp_path / "db")

    def test_pluggable_embedder_and_a_different_model_is_refused(
        self, tmp_path
    ):
        def letters(texts):
            """Counts of a-z: a toy embedding."""
            vectors = np.zeros((len(texts), 26), "float32")
            for row, text in enumerate(texts):
                for char in text.lower():
                    if "a" <= char <= "z":
                        vectors[row, ord(char) - ord("a")] += 1
            return vectors + 1e-3

        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, {"a.md": "aaaa aaa", "z.md": "zzz zzzz"})
        rag.index(docs, db, embedding=letters)
        hit = rag.retrieve("zz", db, k=1, embedding=letters)[0]
        assert hit.source == "z.md" and hit.distance < 0.01
        with pytest.raises(ValueError, match="pass the same function"):
            rag.retrieve("zz", db)
        with pytest.raises(ValueError, match="cannot be compared"):
            rag.index(docs, db, embedding=rag.DEFAULT_EMBEDDING)
        with pytest.raises(ValueError, match="cannot be compared"):
            rag.retrieve("zz", db, embedding=rag.SentenceEmbedder())


@jax_only
def test_recall_at_3_on_the_bundled_corpus(corpus_db, embedder):
    questions = datasets.load_rag_questions()
    hits = rag.retrieve([q["question"] for q in questions], corpus_db, k=3)
    found = [
        q["source"] in [h.source for h in row]
        for q, row in zip(questions, hits)
    ]
    # Measured: 72/72 at 3 (and 66/72 at 1).
    assert np.mean(found) >= 0.9, np.mean(found)
    # One question alone gets the hits it got in the batch (padded there).
    alone = rag.retrieve(questions[0]["question"], corpus_db, k=3)
    assert [(h.source, h.chunk) for h in alone] == [
        (h.source, h.chunk) for h in hits[0]
    ]
    np.testing.assert_allclose(
        [h.distance for h in alone], [h.distance for h in hits[0]], atol=1e-5
    )


@jax_only
def test_chat_format_follows_the_preset_name():
    names = {
        "gemma2_instruct_2b_en": True,
        "gemma2_2b_en": False,
        "/models/gemma-2-2b-it/": True,
        "gemma2_tiny_en": False,
        "my_italian_preset": False,
    }
    assert {n: pipeline.is_instruction_tuned(n) for n in names} == names


def test_ask_prompts_with_the_retrieved_chunks(corpus_db):
    import keras_gemma2

    question = datasets.load_rag_questions()[0]["question"]
    hits = rag.retrieve(question, corpus_db, k=3)
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    answer = rag.ask(question, corpus_db, k=3, lm=lm, max_new_tokens=4)
    assert answer.sources == hits
    assert answer.prompt == rag.build_prompt(question, hits)
    for hit in hits:
        assert hit.text in answer.prompt
    assert isinstance(answer.text, str)
    # Same k: the chat prompt falls in the same compiled length bucket.
    chat = rag.ask(question, corpus_db, lm=lm, max_new_tokens=4, chat=True)
    assert chat.prompt == keras_gemma2.format_chat(
        [{"role": "user", "content": answer.prompt}]
    )


@jax_only
def test_cli(tmp_path, corpus_db, capsys):
    docs, db = tmp_path / "docs", tmp_path / "db"
    _write(docs, {**DOCS, "bad.txt": b"\x00"})
    cli.main(["rag", "index", str(docs), "--db", str(db)])
    out, err = capsys.readouterr()
    assert "3 added" in out and "1 skipped" in out
    assert "warning: Skipped bad.txt: binary" in err
    cli.main(["rag", "index", str(docs), "--db", str(db)])
    assert "nothing written" in capsys.readouterr().out

    question = datasets.load_rag_questions()[0]["question"]
    argv = ["rag", "ask", question, "--db", str(corpus_db), "--k", "3"]
    cli.main([*argv, "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    printed = [
        line.strip() for line in out.split("\nSources:\n")[1].splitlines()
    ]
    hits = rag.retrieve(question, corpus_db, k=3)
    assert printed == [
        f"[{n}] {h.source}, chunk {h.chunk} (distance {h.distance:.3f})"
        for n, h in enumerate(hits, 1)
    ]

    with pytest.raises(SystemExit, match="No database at .*rag index"):
        cli.main(["rag", "ask", "Hi?", "--db", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit, match="less than chunk_size"):
        cli.main(
            [
                "rag",
                "index",
                str(docs),
                "--db",
                str(db),
                "--chunk-size",
                "5",
                "--chunk-overlap",
                "5",
            ]
        )


def _python(*args, **kwargs):
    """Runs this interpreter in a fresh process, as a user would."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", 300),
        env=env,
        **kwargs,
    )


def _wait_for(condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


FIX = "Delete the folder and index the documents again"


def _drop_collection(db):
    with chromadb.PersistentClient(str(db)) as client:
        client.delete_collection(database.COLLECTION)


@jax_only
class TestMisuse:
    @pytest.mark.parametrize(
        "damage, why",
        [
            (lambda db: (db / database.SQLITE).unlink(), "sqlite3 is missing"),
            (
                lambda db: (db / database.SQLITE).write_bytes(b"\x93" * 4096),
                "cannot be read \\(file is not a database\\)",
            ),
            (_drop_collection, "has no collection 'documents'"),
        ],
        ids=["sqlite_deleted", "sqlite_garbage", "collection_dropped"],
    )
    def test_a_damaged_database_names_the_folder_and_the_fix(
        self, tmp_path, embedder, damage, why
    ):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        rag.index(docs, db, embedding=embedder)
        damage(db)
        before = _snapshot(db)
        folder = re.escape(str(db))
        message = f"The RAG database {folder} is damaged: .*{why}.*{FIX}"
        with pytest.raises(rag.DamagedDatabaseError, match=message):
            rag.index(docs, db)
        with pytest.raises(rag.DamagedDatabaseError, match=message):
            rag.retrieve("How long do cats sleep?", db)
        assert _snapshot(db) == before  # not repaired, not made worse
        assert sorted(os.listdir(tmp_path)) == ["db", "docs"]

        # The command line: one line on stderr, and a failing exit status.
        result = _python(
            "-m", "keras_gemma2", "rag", "index", str(docs), "--db", str(db)
        )
        assert result.returncode == 1, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(db) in lines[0] and FIX in lines[0]
        assert "Traceback" not in result.stderr

        # The fix the message gives works.
        shutil.rmtree(db)
        assert rag.index(docs, db).added_files == sorted(DOCS)

    def test_a_collection_emptied_behind_its_manifest_is_refused(
        self, tmp_path
    ):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        rag.index(docs, db)
        with chromadb.PersistentClient(str(db)) as client:
            client.get_collection(database.COLLECTION).delete(
                where={"source": "cats.md"}
            )
        _write(docs, {"z.md": DOCS_Z})  # a change: the write path runs
        with pytest.raises(rag.DamagedDatabaseError, match="chunks where"):
            rag.index(docs, db)
        with pytest.raises(rag.DamagedDatabaseError, match=FIX):
            rag.retrieve("Bread?", db)

    def test_an_unreadable_manifest_is_damage(self, tmp_path):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        rag.index(docs, db)
        manifest = db / database.MANIFEST
        manifest.write_text(manifest.read_text()[:40])  # cut short
        with pytest.raises(rag.DamagedDatabaseError, match=f"cannot be.*{FIX}"):
            rag.index(docs, db)
        manifest.write_text(json.dumps({"format": database.FORMAT}))
        with pytest.raises(rag.DamagedDatabaseError, match="has no embedding"):
            rag.retrieve("Bread?", db)

    def test_two_indexers_at_once_take_turns(self, tmp_path):
        # Two real processes on one database. The first stops in its
        # embedding function (holding the lock) until the test lets it go;
        # meanwhile a file is added and the second starts. Unserialized,
        # the second would index both files from the empty database and
        # the first, renaming last, would throw the second file away.
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, {"a.md": "aaaa aaa"})
        driver = tmp_path / "index_slowly.py"
        driver.write_text(
            textwrap.dedent(
                """
                import os, sys, time
                import numpy as np
                from keras_gemma2 import rag

                docs, db, pause = sys.argv[1:]

                def letters(texts):
                    if pause != "-":  # signal, then wait to be let go
                        open(pause, "w").close()
                        while not os.path.exists(pause + ".go"):
                            time.sleep(0.05)
                    vectors = np.full((len(texts), 26), 1e-3, "float32")
                    for row, text in enumerate(texts):
                        for char in text:
                            if "a" <= char <= "z":
                                vectors[row, ord(char) - ord("a")] += 1
                    return vectors

                report = rag.index(docs, db, embedding=letters)
                print(report.added_files, report.removed_files)
                """
            )
        )
        pause = tmp_path / "first_is_embedding"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        args = [sys.executable, str(driver), str(docs), str(db)]
        first = subprocess.Popen(
            [*args, str(pause)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            _wait_for(pause.exists, "the first indexer to start embedding")
            _write(docs, {"b.md": "bbb bbbb"})
            with open(tmp_path / "second.err", "w") as err:
                second = subprocess.Popen(
                    [*args, "-"], stdout=subprocess.PIPE, stderr=err, env=env
                )
            try:
                _wait_for(
                    lambda: (
                        "Waiting for another `rag index`"
                        in (tmp_path / "second.err").read_text()
                        or second.poll() is not None
                    ),
                    "the second indexer to wait",
                )
                assert second.poll() is None, "the second did not wait"
                assert str(db) in (tmp_path / "second.err").read_text()
                (tmp_path / "first_is_embedding.go").touch()
                first_out = first.communicate(timeout=180)[0]
                second_out = second.communicate(timeout=180)[0].decode()
            finally:
                second.kill()
        finally:
            first.kill()
        assert first.returncode == second.returncode == 0
        assert first_out.strip() == "['a.md'] []"
        assert second_out.strip() == "['b.md'] []"
        sources = {source for source, _, _ in _contents(db).values()}
        assert sources == {"a.md", "b.md"}
        manifest = json.loads((db / database.MANIFEST).read_text())
        assert sorted(manifest["files"]) == ["a.md", "b.md"]
        # The lock file went with its last holder; no staging copy is left.
        left = {"db", "docs", driver.name, "second.err", pause.name}
        assert set(os.listdir(tmp_path)) == left | {pause.name + ".go"}

    def test_a_held_lock_times_out_with_a_message(self, tmp_path, caplog):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        with lock.locked(db):  # another open file: flock blocks us too
            with pytest.raises(
                rag.DatabaseBusyError,
                match=f"Another `rag index` \\(process {os.getpid()}\\) has "
                f"been writing {re.escape(str(db))} for over 0.3 s",
            ):
                rag.index(docs, db, lock_timeout=0.3)
        assert f"Waiting for another `rag index` (process {os.getpid()})" in (
            caplog.text
        )
        assert not db.exists()
        assert rag.index(docs, db).added_files == sorted(DOCS)

    def test_a_killed_holder_releases_the_lock(self, tmp_path):
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from keras_gemma2.rag import lock\n"
                "with lock.locked(sys.argv[1]):\n"
                "    print('held', flush=True)\n"
                "    time.sleep(300)\n",
                str(db),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline() == "held\n"
        finally:
            holder.send_signal(signal.SIGKILL)  # no cleanup runs
            holder.wait(timeout=60)
        assert os.path.exists(lock.lock_path(db))  # left behind, unlocked
        report = rag.index(docs, db, lock_timeout=5)
        assert report.added_files == sorted(DOCS)
        assert not os.path.exists(lock.lock_path(db))

    def test_an_up_to_date_index_loads_no_backend(self, tmp_path):
        # The command a user runs after every edit (or from a cron job):
        # with nothing changed it must not pay for Keras, a backend or the
        # embedding model.
        docs, db = tmp_path / "docs", tmp_path / "db"
        _write(docs, DOCS)
        rag.index(docs, db)
        driver = textwrap.dedent(
            """
            import sys
            from keras_gemma2 import cli

            cli.main(["rag", "index", sys.argv[1], "--db", sys.argv[2]])
            heavy = ("keras", "keras_hub", "tensorflow", "jax", "torch",
                     "transformers")
            print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
            """
        )
        result = _python("-c", driver, str(docs), str(db))
        assert result.returncode == 0, result.stderr[-2000:]
        out = result.stdout.splitlines()
        assert "up to date" in out[0] and "nothing written" in out[0]
        assert out[1] == "[]"


@jax_only
class TestAtomicWrites:
    def test_files_and_folders_reach_the_disk_before_and_after_the_rename(
        self, tmp_path
    ):
        # strace records the real system calls: every staged file and
        # folder is fsynced before the rename, the parent folder after it.
        # The staging also holds a FIFO and links, which must be skipped
        # (opening a FIFO to fsync it would block forever).
        if shutil.which("strace") is None:
            pytest.skip("needs strace")
        target = tmp_path / "out"
        driver = textwrap.dedent(
            """
            import os, sys
            from keras_gemma2 import atomic

            target = sys.argv[1]
            for version in ("old", "new"):  # a new folder, then a swap
                with atomic.staged_folder(target, "saving") as staging:
                    os.mkdir(os.path.join(staging, "sub"))
                    for name in ("a.txt", "sub/b.txt"):
                        with open(os.path.join(staging, name), "w") as f:
                            f.write(version)
                    os.chmod(os.path.join(staging, "a.txt"), 0o444)
                    os.mkfifo(os.path.join(staging, "fifo"))
                    os.symlink("fifo", os.path.join(staging, "link"))
                    os.symlink("/nonexistent", os.path.join(staging, "dead"))
            """
        )
        log = tmp_path / "strace.log"
        result = subprocess.run(
            [
                *("strace", "-f", "-y", "-o", str(log)),
                *("-e", "trace=fsync,rename,renameat,renameat2"),
                *(sys.executable, "-c", driver, str(target)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0 and "ptrace" in result.stderr:
            pytest.skip(f"strace cannot trace here: {result.stderr[-300:]}")
        assert result.returncode == 0, result.stderr[-2000:]
        assert (target / "a.txt").read_text() == "new"
        assert sorted(os.listdir(tmp_path)) == ["out", "strace.log"]

        calls = []  # ("fsync", path) and ("rename", source, destination)
        for line in log.read_text().splitlines():
            if fsync := re.search(r" fsync\(\d+<([^>]*)>\)", line):
                calls.append(("fsync", fsync.group(1)))
            elif re.search(r" rename(at2?)?\(", line):
                calls.append(("rename", *re.findall(r'"([^"]*)"', line)))
        swaps = [i for i, c in enumerate(calls) if c[-1] == str(target)]
        assert len(swaps) == 2, calls
        start = 0
        for swap in swaps:
            staging = calls[swap][1]
            expected = {
                staging,
                os.path.join(staging, "a.txt"),
                os.path.join(staging, "sub"),
                os.path.join(staging, "sub", "b.txt"),
            }
            synced = {c[1] for c in calls[start:swap] if c[0] == "fsync"}
            assert synced >= expected, calls
            skipped = {os.path.join(staging, n) for n in ("fifo", "link")}
            assert not synced & (skipped | {os.path.join(staging, "dead")})
            assert calls[swap + 1] == ("fsync", str(tmp_path)), calls
            start = swap + 1
