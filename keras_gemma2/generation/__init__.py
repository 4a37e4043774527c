"""Generation: the engine under `generate`, chat, streaming and serving.

- `Engine` and `Sequence` (`engine`): a batch of sequences, each at its own
  position with its own settings, advanced one token per compiled step;
  sequences join and leave between steps.
- `TextStream` (`text`): token ids to text as they come, with stop strings.
- `compiled`: the compiled prefill, step and extension, bucketed lengths.
"""

from keras_gemma2.generation.compiled import bucket_length
from keras_gemma2.generation.compiled import check_token_ids
from keras_gemma2.generation.compiled import compile_function
from keras_gemma2.generation.compiled import decode_step
from keras_gemma2.generation.compiled import is_stop_token
from keras_gemma2.generation.compiled import next_logits
from keras_gemma2.generation.compiled import output_mask
from keras_gemma2.generation.compiled import picks_one_token_per_step
from keras_gemma2.generation.compiled import torch_compiled_step
from keras_gemma2.generation.engine import Engine
from keras_gemma2.generation.engine import GenerationResult
from keras_gemma2.generation.engine import Sequence
from keras_gemma2.generation.engine import decode_and_sample
from keras_gemma2.generation.engine import decode_steps
from keras_gemma2.generation.text import TextStream
from keras_gemma2.generation.text import detokenize

__all__ = [
    "Engine",
    "GenerationResult",
    "Sequence",
    "TextStream",
    "bucket_length",
    "check_token_ids",
    "compile_function",
    "decode_and_sample",
    "decode_steps",
    "decode_step",
    "detokenize",
    "is_stop_token",
    "next_logits",
    "output_mask",
    "picks_one_token_per_step",
    "torch_compiled_step",
]
