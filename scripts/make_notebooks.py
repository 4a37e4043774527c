"""Writes the notebooks in notebooks/ (run it to regenerate them)."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell
from nbformat.v4 import new_markdown_cell
from nbformat.v4 import new_notebook

ROOT = pathlib.Path(__file__).resolve().parent.parent

QUICKSTART = [
    new_markdown_cell(
        "# keras_gemma2 quickstart\n\n"
        "Load a Gemma 2 preset, generate, score, fine-tune with LoRA, save "
        "and reload. This runs on the bundled `gemma2_tiny_en` preset, offline, "
        "on any backend; swap in `gemma2_2b_en` on a machine with the memory "
        "for it."
    ),
    new_code_cell(
        "import os\n"
        "os.environ.setdefault('KERAS_BACKEND', 'jax')  # or tensorflow, torch\n"
        "\n"
        "import keras\n"
        "import numpy as np\n"
        "import keras_gemma2\n"
        "\n"
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
    new_markdown_cell("## Score: per-token log-probabilities"),
    new_code_cell(
        "fluent = lm.score('A list is a mutable sequence.').sum()\n"
        "scrambled = lm.score('sequence mutable a is list A.').sum()\n"
        "print(f'fluent {fluent:.1f}  scrambled {scrambled:.1f}')\n"
        "assert fluent > scrambled"
    ),
    new_markdown_cell(
        "## LoRA fine-tuning\n\n"
        "`enable_lora` freezes the backbone and adds rank-4 adapters to the "
        "query and value projections; `fit` trains only those."
    ),
    new_code_cell(
        "lm.backbone.enable_lora(rank=4)\n"
        "lm.preprocessor.sequence_length = 32\n"
        "print('trainable:', sum(int(np.prod(w.shape)) for w in lm.trainable_weights),\n"
        "      'of', lm.count_params())\n"
        "data = ['The zorblat module counts purple sheep.'] * 8\n"
        "before = lm.evaluate(data, batch_size=4, verbose=0)\n"
        "lm.compile(optimizer=keras.optimizers.Adam(1e-2))\n"
        "history = lm.fit(data, epochs=4, batch_size=4, verbose=0)\n"
        "after = history.history['loss'][-1]\n"
        "print(f'loss {before[0]:.2f} -> {after:.2f}')\n"
        "assert after < before[0]\n"
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
        "Model parallelism with `keras.distribution` on the JAX backend. "
        "On a TPU slice or a multi-GPU machine, drop the `XLA_FLAGS` line: "
        "`list_devices()` then returns the real accelerators. Here 8 virtual "
        "CPU devices stand in for them, and the bundled tiny preset for the "
        "9B or 27B."
    ),
    new_code_cell(
        "import os\n"
        "# Before JAX is imported: 8 virtual devices on the CPU.\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'\n"
        "os.environ['KERAS_BACKEND'] = 'jax'  # distribution needs JAX\n"
        "\n"
        "import keras\n"
        "import numpy as np\n"
        "import keras_gemma2\n"
        "from keras_gemma2 import distribution\n"
        "\n"
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
        "only), then save the adapters, load them onto a fresh base and "
        "merge them for serving. It runs offline on the tiny preset; swap in "
        "`gemma2_instruct_2b_en` on a GPU."
    ),
    new_code_cell(
        "import os\n"
        "os.environ.setdefault('KERAS_BACKEND', 'jax')  # or tensorflow, torch\n"
        "\n"
        "import keras\n"
        "import numpy as np\n"
        "import tensorflow_datasets as tfds\n"
        "import keras_gemma2\n"
        "import keras_gemma2.datasets  # registers keras_gemma2_instructions\n"
        "from keras_gemma2 import data, lora"
    ),
    new_markdown_cell("## The data"),
    new_code_cell(
        "def pairs(split):\n"
        "    rows = tfds.as_numpy(tfds.load('keras_gemma2_instructions', split=split))\n"
        "    rows = list(rows)\n"
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
        "print('held-out exact match before:', exact_match(lm, test))"
    ),
    new_markdown_cell(
        "## LoRA\n\n"
        "Rank-32 adapters on every linear layer; everything else is frozen. "
        "`fit` reshuffles the examples every epoch. 12 epochs keep this "
        "notebook to about a minute on a laptop CPU and get part of the "
        "held-out answers right; 30 epochs get 80-90% of them "
        "(`tests/test_finetune_e2e.py`)."
    ),
    new_code_cell(
        "lora.enable(lm.backbone, rank=32, alpha=64, targets='all')\n"
        "lm.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0))\n"
        "history = lm.fit(data.as_chat(train), batch_size=16, epochs=12, verbose=0)\n"
        "print('loss', [round(l, 3) for l in history.history['loss']])\n"
        "print('held-out exact match after:', exact_match(lm, test))\n"
        "print(lm.generate(keras_gemma2.format_chat(\n"
        "    [{'role': 'user', 'content': test['prompts'][0]}]), max_new_tokens=4,\n"
        "    strip_prompt=True), '| expected:', test['responses'][0])"
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
        "small.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0))\n"
        "small.fit(data.as_chat(train), batch_size=16, epochs=1)\n"
        "print(small.generate('The tokenizer', max_new_tokens=8))"
    ),
]


def main():
    for name, cells in (
        ("quickstart", QUICKSTART),
        ("distributed", DISTRIBUTED),
        ("finetune_lora", FINETUNE),
    ):
        notebook = new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        path = ROOT / "notebooks" / f"{name}.ipynb"
        nbformat.write(notebook, str(path))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
