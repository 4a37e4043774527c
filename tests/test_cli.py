"""The command line, run as a user runs it: in a subprocess."""

import os
import subprocess
import sys

import keras
import pytest

# The command line's own work, the same on every backend: its error messages
# and flags' plumbing. Each runs once, in the torch pass (the shortest); what
# they call has its own tests on every backend (test_convert.py converts,
# test_generation.py generates).
cli_only = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="the command line's own work; runs once, in the torch pass",
)


def _user_env():
    """The environment of a user who set nothing to quiet the backends."""
    quiet = ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", "GLOG_minloglevel")
    return {k: v for k, v in os.environ.items() if k not in quiet}


def _run(*args, env=None):
    env = env or {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "keras_gemma2", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_generate_prints_the_text_alone():
    import keras_gemma2

    backend = keras.config.backend()
    result = _run(
        "generate",
        "The",
        "--max-new-tokens",
        "8",
        "--backend",
        backend,
        env=_user_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # No start-up lines from TensorFlow, absl, CUDA, oneDNN, SentencePiece.
    assert result.stderr == ""
    # The prompt and its greedy continuation, streamed, then a newline.
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    assert result.stdout == lm.generate("The", max_new_tokens=8) + "\n"


@cli_only
def test_generate_with_max_length():
    backend = keras.config.backend()
    result = _run(
        "generate", "The tokenizer", "--max-length", "16", "--backend", backend
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("The tokenizer")
    assert len(result.stdout.split()) > 3


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="no backend involved; run once"
)
def test_verbose_shows_the_backends_start_up_lines():
    result = _run(
        "generate",
        "The",
        "--max-new-tokens",
        "2",
        "--verbose",
        env=_user_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # TensorFlow (imported by KerasHub on every backend) announces oneDNN
    # on CPUs where it uses it, and absl's or CUDA's start-up lines always.
    markers = ("oneDNN", "absl::InitializeLog", "cuInit", "cuda")
    assert any(marker in result.stderr for marker in markers), result.stderr


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="no backend involved; run once"
)
def test_the_filter_drops_info_lines_and_keeps_warnings_and_errors():
    code = (
        "import os, warnings\n"
        "from keras_gemma2 import log_filter\n"
        "with log_filter.StartupNoiseFilter():\n"
        "    os.write(2, b'I0000 00:00:1796.1 4307 port.cc:153] oneDNN\\n')\n"
        "    os.write(2, b'normalizer.cc(51) LOG(INFO) charsmap\\n')\n"
        "    warnings.warn('a real warning')\n"
        "    os.write(2, b'E0000 00:00:1796.1 4307 x.cc:1] an error\\n')\n"
        "    os.write(2, b'no newline at the end')\n"
        "os.write(2, b'|after')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "oneDNN" not in result.stderr
    assert "LOG(INFO)" not in result.stderr
    assert "UserWarning: a real warning" in result.stderr
    assert "x.cc:1] an error" in result.stderr
    assert result.stderr.endswith("no newline at the end|after")


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="no backend involved; run once"
)
@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["generate", "--help"],
        ["chat", "--help"],
        ["finetune", "--help"],
        ["convert", "--help"],
        ["rag", "--help"],
        ["rag", "index", "--help"],
        ["rag", "ask", "--help"],
    ],
)
def test_help_imports_no_backend(args):
    code = (
        "import sys\n"
        "from keras_gemma2.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = ('tensorflow', 'jax', 'torch', 'keras', 'keras_hub')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: keras-gemma2" in result.stdout
    assert result.stderr.strip() == "[]"


@cli_only
def test_unknown_preset_is_a_clear_error():
    result = _run("generate", "Hi", "--preset", "gemma2_2b_eng")
    assert result.returncode != 0
    assert "Did you mean 'gemma2_2b_en'" in result.stderr
    assert "Traceback" not in result.stderr


@cli_only
def test_bad_max_length_is_a_clear_error():
    result = _run("generate", "Hi", "--max-length", "1")
    assert result.returncode != 0
    assert "--max-length must be at least 2" in result.stderr
    result = _run("generate", "Hi", "--max-new-tokens", "0")
    assert result.returncode != 0
    assert "--max-new-tokens at least 1" in result.stderr
    result = _run(
        "generate", "Hi", "--max-new-tokens", "2", "--max-length", "9"
    )
    assert result.returncode != 0
    assert "not allowed with argument" in result.stderr


@pytest.mark.long
@cli_only
def test_convert_a_hugging_face_checkpoint(tmp_path):
    import numpy as np

    import keras_gemma2
    from tests import references

    hf = references.hf_model(seed=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    backend = keras.config.backend()
    out = tmp_path / "keras"
    result = _run(
        "convert", str(tmp_path / "hf"), str(out), "--backend", backend
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tensor" in result.stdout  # the progress bar
    lm = keras_gemma2.Gemma2CausalLM(
        keras_gemma2.Gemma2Backbone.from_preset(str(out))
    )
    ids = np.array([[2, 7, 9, 13, 21, 34, 55]], "int32")
    logits = keras.ops.convert_to_numpy(
        lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    )
    assert np.abs(logits - references.hf_logits(hf, ids)).max() < 1e-4
    # And on to transformers, from our preset.
    exported = tmp_path / "exported"
    result = _run("convert", str(out), str(exported), "--to", "transformers")
    assert result.returncode == 0, result.stderr[-2000:]
    import transformers

    reloaded = transformers.Gemma2ForCausalLM.from_pretrained(
        exported, attn_implementation="eager"
    )
    assert (
        np.abs(
            references.hf_logits(reloaded, ids) - references.hf_logits(hf, ids)
        ).max()
        < 1e-5
    )
    # A second conversion into the same folder is refused, not merged.
    again = _run("convert", str(tmp_path / "hf"), str(out))
    assert again.returncode != 0
    assert "not empty" in again.stderr


@pytest.mark.long
def test_chat_streams_replies_turn_by_turn():
    import keras_gemma2

    backend = keras.config.backend()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_gemma2",
            "chat",
            "--max-new-tokens",
            "6",
            "--backend",
            backend,
        ],
        input="What is a tokenizer?\n\nAnd a parser?\n/exit\nignored\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The same turns through the library: one reply per user message, the
    # second one seeing the first exchange.
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    messages = [{"role": "user", "content": "What is a tokenizer?"}]
    first = lm.generate(
        keras_gemma2.format_chat(messages), max_new_tokens=6, strip_prompt=True
    )
    messages += [
        {"role": "model", "content": first},
        {"role": "user", "content": "And a parser?"},
    ]
    second = lm.generate(
        keras_gemma2.format_chat(messages), max_new_tokens=6, strip_prompt=True
    )
    assert first and second
    assert result.stdout == f"{first}\n{second}\n"


@pytest.mark.long
def test_finetune_writes_a_preset_and_adapters(tmp_path):
    import json

    import numpy as np

    import keras_gemma2

    path = tmp_path / "train.jsonl"
    rows = [{"q": f"Define word{i}.", "a": f"Meaning {i}."} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    output, adapter = tmp_path / "tuned", tmp_path / "a.safetensors"
    backend = keras.config.backend()
    result = _run(
        "finetune", "--data", str(path), "--prompt-key", "q",
        "--response-key", "a", "--lora-rank", "2", "--epochs", "1",
        "--batch-size", "4", "--sequence-length", "32", "--output",
        str(output), "--adapter", str(adapter), "--backend", backend,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2/2" in result.stdout  # Keras' progress bar
    tuned = keras_gemma2.Gemma2CausalLM.from_preset(str(output))
    assert tuned.generate("Define word1.", max_new_tokens=3)
    base = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    keras_gemma2.lora.load_adapters(base.backbone, str(adapter))
    ids = np.array([[2, 100, 200, 300, 400]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(base(inputs)),
        keras.ops.convert_to_numpy(tuned(inputs)),
        atol=1e-5,
    )


@cli_only
def test_finetune_bad_data_is_a_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "x", "answer": "y"}\n')
    result = _run(
        "finetune", "--data", str(path), "--output", str(tmp_path / "out")
    )
    assert result.returncode != 0
    assert "train.jsonl:1: no 'prompt' or 'response' field" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="The flags' plumbing, once (~1 min); each feature has its own "
    "tests on every backend (test_memory_savers, test_callbacks, test_peft).",
)
def test_finetune_int8_dropout_accumulation_backup_and_peft(tmp_path):
    import json

    import keras_gemma2

    path = tmp_path / "train.jsonl"
    rows = [
        {"prompt": f"Define word{i}.", "response": f"M{i}."} for i in range(8)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    output, peft, backup = (tmp_path / n for n in ("tuned", "peft", "backup"))
    result = _run(
        "finetune", "--data", str(path), "--lora-rank", "2",
        "--lora-dropout", "0.1", "--quantize", "int8",
        "--gradient-accumulation", "2", "--epochs", "2", "--batch-size", "2",
        "--sequence-length", "32", "--backup-dir", str(backup), "--output",
        str(output), "--peft", str(peft), "--seed", "1", "--backend",
        keras.config.backend(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = keras_gemma2.Gemma2CausalLM.from_preset(str(output))
    query = tuned.backbone.transformer_layers[0].attention.query
    assert query.quantization_mode == "int8"
    assert tuned.generate("Define word1.", max_new_tokens=3)
    config = json.loads((peft / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1
    assert (peft / "adapter_model.safetensors").exists()
    # A finished run leaves no backup behind (Keras' behaviour).
    assert not backup.exists() or not any(
        not name.startswith(".") for name in os.listdir(backup)
    )


@cli_only
def test_finetune_quantize_without_lora_is_a_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "x", "response": "y"}\n')
    result = _run(
        "finetune", "--data", str(path), "--lora-rank", "0", "--quantize",
        "int8", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode != 0
    assert "--quantize trains LoRA adapters" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
