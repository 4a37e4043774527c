"""Every `Example:` in a public docstring runs as written."""

import doctest
import inspect
import re

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import architectures
from keras_gemma2 import atomic  # noqa: F401 (keras_gemma2.atomic below)
from keras_gemma2 import distribution
from keras_gemma2 import generation
from keras_gemma2 import h5
from keras_gemma2 import memory
from keras_gemma2 import presets as presets_lib
from keras_gemma2 import rag
from keras_gemma2 import special_tokens
from keras_gemma2.convert import to_peft
from keras_gemma2.layers import attention_masks

PUBLIC = [
    keras_gemma2.Gemma2Backbone,
    presets_lib.RegisteredPresetsMixin.from_preset,
    keras_gemma2.Gemma2CausalLM,
    keras_gemma2.Gemma2CausalLM.generate,
    keras_gemma2.Gemma2CausalLM.compile,
    keras_gemma2.Gemma2CausalLM.score,
    keras_gemma2.Gemma2CausalLM.export_to_transformers,
    keras_gemma2.Gemma2CausalLMPreprocessor,
    keras_gemma2.Gemma2Tokenizer,
    keras_gemma2.Gemma2Attention,
    keras_gemma2.Gemma2DecoderBlock,
    keras_gemma2.Gemma2RMSNormalization,
    keras_gemma2.layers.Gemma2Embedding,
    keras_gemma2.layers.Gemma2EinsumDense,
    memory.abstract_parameter_count,
    keras_gemma2.Gemma2Backbone.get_layout_map,
    distribution.get_layout_map,
    distribution.Gemma2LayoutMap,
    distribution.memory_bytes,
    distribution.kv_cache_bytes,
    keras_gemma2.Gemma2Backbone.cache_capacities,
    keras_gemma2.format_chat,
    keras_gemma2.data.load_instructions,
    keras_gemma2.data.as_chat,
    keras_gemma2.lora.enable,
    keras_gemma2.lora.save_adapters,
    keras_gemma2.lora.load_adapters,
    keras_gemma2.lora.merge,
    keras_gemma2.callbacks.BackupAndRestore,
    to_peft.export_peft,
    keras_gemma2.Gemma2Backbone.quantize,
    keras_gemma2.Gemma2CausalLM.quantize,
    keras_gemma2.data.batches,
    keras_gemma2.Gemma2Distiller,
    keras_gemma2.merging.EMAAnchor,
    keras_gemma2.merging.slerp,
    keras_gemma2.merging.liti,
    keras_gemma2.merging.warp,
    rag.split_text,
    rag.build_prompt,
    rag.SentenceEmbedder,
    rag.index,
    rag.retrieve,
    rag.ask,
    rag.lock.locked,
    keras_gemma2.atomic.staged_folder,
    keras_gemma2.atomic.staged_file,
    keras_gemma2.atomic.check_target,
    h5,
]


def _examples(obj):
    doc = inspect.getdoc(obj) or ""
    return re.findall(r"```python\n(.*?)```", doc, flags=re.S)


def test_every_public_name_has_an_example():
    missing = [obj.__name__ for obj in PUBLIC if not _examples(obj)]
    assert not missing


# keras.distribution has no torch implementation.
DISTRIBUTED = {
    keras_gemma2.Gemma2Backbone.get_layout_map,
    distribution.get_layout_map,
    distribution.Gemma2LayoutMap,
}


@pytest.mark.parametrize(
    "obj", PUBLIC, ids=lambda o: getattr(o, "__qualname__", o.__name__)
)
def test_examples_run(obj):
    if obj in DISTRIBUTED and keras.config.backend() == "torch":
        pytest.skip("keras.distribution has no torch backend")
    for example in _examples(obj):
        namespace = {"keras_gemma2": keras_gemma2, "np": np, "keras": keras}
        exec(compile(example, obj.__name__, "exec"), namespace)


@pytest.mark.parametrize(
    "obj",
    [
        attention_masks.attention_layer_types,
        attention_masks.layer_windows,
        attention_masks.cache_capacity,
        architectures.axis_sizes,
        generation.bucket_length,
        special_tokens,
    ],
    ids=lambda o: o.__name__,
)
def test_doctests(obj):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner()
    module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
    tests = finder.find(obj, obj.__name__, globs=dict(vars(module)))
    assert tests and tests[0].examples
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
