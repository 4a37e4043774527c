"""English text that ships with Python itself: the corpus of gemma2_tiny_en.

Two sources, both part of every CPython install, no downloads:
- `pydoc_data.topics`: the language reference topics that `help()` shows;
- the docstrings of a fixed list of standard-library modules, their classes
  and functions.
Documents are split into train and held-out sets by a hash of their text, so
the split does not depend on the order of discovery.
"""

import hashlib
import importlib
import inspect
import re

# Pure-Python, import-safe modules with long English docstrings.
MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
)

HELD_OUT_PERCENT = 5


def _docstrings(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from this build of Python
        return []
    docs = [inspect.getdoc(module)]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if callable(member) or isinstance(member, property):
                    docs.append(inspect.getdoc(member))
    return [d for d in docs if d]


def _is_english(text):
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(text) >= 80 and letters / len(text) > 0.75


def documents():
    """All documents, in a fixed order, deduplicated."""
    from pydoc_data import topics

    docs = [topics.topics[key] for key in sorted(topics.topics)]
    for name in MODULES:
        docs.extend(_docstrings(name))
    seen, out = set(), []
    for doc in docs:
        doc = re.sub(r"\n{3,}", "\n\n", doc.strip())
        if doc not in seen and _is_english(doc):
            seen.add(doc)
            out.append(doc)
    return out


def split():
    """`(train_documents, held_out_documents)`."""
    train, held_out = [], []
    for doc in documents():
        digest = hashlib.sha256(doc.encode("utf-8")).digest()
        (held_out if digest[0] % 100 < HELD_OUT_PERCENT else train).append(doc)
    return train, held_out


if __name__ == "__main__":
    train, held_out = split()
    print(
        f"train: {len(train)} documents, {sum(map(len, train))} characters; "
        f"held out: {len(held_out)}, {sum(map(len, held_out))} characters"
    )
