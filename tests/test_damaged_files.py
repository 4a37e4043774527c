"""Damaged files get errors that name the file and the fix (issue 16).

Every test damages a copy (of the bundled preset, of a tiny HF checkpoint,
of an adapter file or a backup), then checks the error's type, that its
message names the file (and, where a library raised, that its error is
chained), and that nothing on disk or in a model that was there before
changed.
"""

import hashlib
import json
import os
import shutil
import struct

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import callbacks
from keras_gemma2 import cli
from keras_gemma2 import lora
from keras_gemma2 import merging
from keras_gemma2.convert import damaged
from keras_gemma2.convert import loader
from keras_gemma2.presets import PRESETS_DIR
from tests import references
from tests.harness import TestCase

only_once = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="reads files only, builds no model: the jax pass covers it",
)


def _hashes(folder):
    """`{relative path: sha256}` of every file under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, folder)] = digest
    return found


def _cut(path, length):
    """Truncates `path` to its first `length` bytes."""
    with open(path, "r+b") as f:
        f.truncate(length)


def _write_config(path, change):
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)


def _numpy(weights):
    return [keras.ops.convert_to_numpy(w) for w in weights]


class DamagedTest(TestCase):
    """Shared: copies to damage, and the checks every refusal passes."""

    def copy_preset(self):
        path = os.path.join(self.get_temp_dir(), "preset")
        shutil.copytree(PRESETS_DIR / "gemma2_tiny_en", path)
        return path

    def assert_refused(self, load, path, match, folder):
        """`load()` raises a DamagedFileError naming `path` that matches
        `match`, and leaves `folder`'s files as they were."""
        before = _hashes(folder)
        with pytest.raises(damaged.DamagedFileError, match=match) as info:
            load()
        error = info.value
        self.assertEqual(os.path.abspath(error.path), os.path.abspath(path))
        self.assertIn(str(path), str(error))
        self.assertEqual(_hashes(folder), before)
        return error


class OwnPresetTest(DamagedTest):
    def test_truncated_weights_h5(self):
        preset = self.copy_preset()
        weights = os.path.join(preset, "model.weights.h5")
        _cut(weights, os.path.getsize(weights) // 2)
        for cls in (keras_gemma2.Gemma2Backbone, keras_gemma2.Gemma2CausalLM):
            error = self.assert_refused(
                lambda cls=cls: cls.from_preset(preset),
                weights,
                "is truncated: .*save_to_preset",
                preset,
            )
            self.assertIsInstance(error.__cause__, OSError)  # h5py's
        # The tokenizer alone needs no weights: it still loads.
        keras_gemma2.Gemma2Tokenizer.from_preset(preset)

    def test_config_that_is_not_json(self):
        preset = self.copy_preset()
        config = os.path.join(preset, "config.json")
        with open(config, "r+b") as f:
            f.truncate(os.path.getsize(config) - 5)  # cut short
        error = self.assert_refused(
            lambda: keras_gemma2.Gemma2Backbone.from_preset(preset),
            config,
            "not valid JSON",
            preset,
        )
        self.assertIsInstance(error.__cause__, json.JSONDecodeError)

    def test_damaged_tokenizer_json(self):
        preset = self.copy_preset()
        path = os.path.join(preset, "tokenizer.json")
        with open(path, "w") as f:
            f.write("[1, 2]")
        self.assert_refused(
            lambda: keras_gemma2.Gemma2CausalLM.from_preset(preset),
            path,
            "not an object",
            preset,
        )

    def test_truncated_vocabulary(self):
        preset = self.copy_preset()
        path = os.path.join(preset, "assets", "tokenizer", "vocabulary.spm")
        _cut(path, 1000)
        error = self.assert_refused(
            lambda: keras_gemma2.Gemma2CausalLM.from_preset(preset),
            path,
            "is not a SentencePiece model: SentencePiece cannot parse its "
            "1000 bytes",
            preset,
        )
        self.assertIsInstance(error.__cause__, RuntimeError)

    def test_the_command_line_prints_one_line(self):
        preset = self.copy_preset()
        weights = os.path.join(preset, "model.weights.h5")
        _cut(weights, 100)
        argv = ["generate", "Hi", "--preset", preset, "--max-new-tokens", "1"]
        argv += ["--backend", keras.config.backend()]
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        message = str(info.value.code)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertIn(weights, message)
        self.assertIn("again", message)


class HuggingFaceTest(DamagedTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.hf = references.hf_model(seed=3)

    def folder(self, **kwargs):
        path = os.path.join(self.get_temp_dir(), "hf")
        self.hf.save_pretrained(path, **kwargs)
        return path

    def test_header_that_is_not_json(self):
        path = self.folder()
        weights = os.path.join(path, "model.safetensors")
        with open(weights, "r+b") as f:
            f.seek(8)
            f.write(b"\xff not json")
        error = self.assert_refused(
            lambda: keras_gemma2.Gemma2Backbone.from_preset(path),
            weights,
            "is not a safetensors file: its header is not JSON",
            path,
        )
        self.assertIsInstance(error.__cause__, ValueError)

    def test_config_without_a_field(self):
        path = self.folder()
        config = os.path.join(path, "config.json")
        _write_config(config, lambda c: c.pop("num_hidden_layers"))
        error = self.assert_refused(
            lambda: keras_gemma2.Gemma2CausalLM.from_preset(
                path, preprocessor=None
            ),
            config,
            "lacks num_hidden_layers, which a Gemma 2 config has.*Download",
            path,
        )
        self.assertIsInstance(error.__cause__, KeyError)

    def test_data_cut_short(self):
        path = self.folder()
        weights = os.path.join(path, "model.safetensors")
        _cut(weights, os.path.getsize(weights) - 100)
        self.assert_refused(
            lambda: keras_gemma2.Gemma2Backbone.from_preset(path),
            weights,
            r"is truncated: it has \d+ bytes, but its header places tensor",
            path,
        )

    def test_damaged_index(self):
        path = self.folder(max_shard_size="20KB")
        index = os.path.join(path, "model.safetensors.index.json")
        _write_config(index, lambda c: c.pop("weight_map"))
        self.assert_refused(
            lambda: keras_gemma2.Gemma2Backbone.from_preset(path),
            index,
            "lacks weight_map, which a safetensors index has",
            path,
        )

    def test_a_shard_cut_anywhere_is_refused_before_any_weight(self):
        path = self.folder(max_shard_size="20KB")
        shards = sorted(f for f in os.listdir(path) if f.startswith("model-"))
        self.assertGreater(len(shards), 2)
        # The last shard: its tensors load last, so a loader that checked
        # shards one at a time would have assigned the others' already.
        shard = os.path.join(path, shards[-1])
        with open(shard, "rb") as f:
            whole = f.read()
        (length,) = struct.unpack("<Q", whole[:8])
        cuts = {
            "inside the header length": 4,
            "inside the header": 8 + length // 2,
            "inside the data": (8 + length + len(whole)) // 2,
            "one byte short": len(whole) - 1,
        }
        for where, cut in cuts.items():
            with self.subTest(where):
                with open(shard, "wb") as f:
                    f.write(whole[:cut])
                assigned = []
                self.assert_refused(
                    lambda: loader.load_foreign(
                        keras_gemma2.Gemma2Backbone,
                        path,
                        {},
                        progress=lambda done, total: assigned.append(done),
                    ),
                    shard,
                    "is truncated",
                    path,
                )
                self.assertEqual(assigned, [])
        # Whole again, it loads: the refusals were about the cut only.
        with open(shard, "wb") as f:
            f.write(whole)
        assigned = []
        loader.load_foreign(
            keras_gemma2.Gemma2Backbone,
            path,
            {},
            progress=lambda done, total: assigned.append(done),
        )
        self.assertEqual(len(assigned), assigned[-1])


class KerasHubPresetTest(DamagedTest):
    def test_truncated_weights_h5(self):
        path = os.path.join(self.get_temp_dir(), "kh")
        references.keras_hub_backbone().save_to_preset(path)
        weights = os.path.join(path, "model.weights.h5")
        _cut(weights, os.path.getsize(weights) - 1)
        self.assert_refused(
            lambda: keras_gemma2.Gemma2Backbone.from_preset(path),
            weights,
            "is truncated: .*KerasHub preset again",
            path,
        )


class AdapterFileTest(DamagedTest):
    def test_truncated_adapters_change_nothing(self):
        trained = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        lora.enable(trained, rank=2)
        for variable in lora.adapter_variables(trained).values():
            variable.assign(np.full(variable.shape, 0.5, "float32"))
        folder = os.path.join(self.get_temp_dir(), "adapters")
        path = lora.save_adapters(trained, f"{folder}/adapters.safetensors")
        with open(path, "rb") as f:
            whole = f.read()
        (length,) = struct.unpack("<Q", whole[:8])
        # Onto a model with adapters of its own, and onto one without.
        with_lora = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        lora.enable(with_lora, rank=2)
        plain = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
        before = {id(m): _numpy(m.weights) for m in (with_lora, plain)}
        for cut in (3, 8 + length // 2, (8 + length + len(whole)) // 2):
            with open(path, "wb") as f:
                f.write(whole[:cut])
            for model in (with_lora, plain):
                self.assert_refused(
                    lambda model=model: lora.load_adapters(model, path),
                    path,
                    "is truncated: .*save_adapters",
                    folder,
                )
                for got, want in zip(
                    _numpy(model.weights), before[id(model)], strict=True
                ):
                    np.testing.assert_array_equal(got, want)
            self.assertFalse(getattr(plain, "_lora_enabled_layers", None))


def _mlp():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _fit(model, backup, epochs=1):
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 4), "float32")
    return model.fit(x, y, epochs=epochs, callbacks=[backup], verbose=0)


class BackupTest(DamagedTest):
    def backup(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        _fit(_mlp(), callbacks.BackupAndRestore(backup_dir, **_KEEP))
        (state,) = os.listdir(backup_dir)
        return backup_dir, os.path.join(backup_dir, state)

    def assert_resume_refused(self, backup_dir, path, match):
        model = _mlp()
        before = _numpy(model.weights)
        self.assert_refused(
            lambda: _fit(
                model, callbacks.BackupAndRestore(backup_dir, **_KEEP)
            ),
            path,
            match,
            backup_dir,
        )
        for got, want in zip(_numpy(model.weights), before, strict=True):
            np.testing.assert_array_equal(got, want)

    def test_truncated_variables(self):
        backup_dir, state = self.backup()
        variables = os.path.join(state, "variables.h5")
        _cut(variables, os.path.getsize(variables) // 2)
        self.assert_resume_refused(
            backup_dir, variables, "is truncated: .*new `backup_dir`"
        )

    def test_metadata_that_is_not_json(self):
        backup_dir, state = self.backup()
        metadata = os.path.join(state, "training_metadata.json")
        _cut(metadata, 10)
        self.assert_resume_refused(backup_dir, metadata, "not valid JSON")

    def test_truncated_keras_backup(self):
        backup_dir = os.path.join(self.get_temp_dir(), "keras_backup")
        keras_backup = keras.callbacks.BackupAndRestore(
            backup_dir, delete_checkpoint=False
        )
        _fit(_mlp(), keras_backup)
        weights = os.path.join(backup_dir, "latest.weights.h5")
        _cut(weights, os.path.getsize(weights) // 2)
        self.assert_refused(
            lambda: _fit(
                _mlp(), callbacks.BackupAndRestore(backup_dir, **_KEEP)
            ),
            weights,
            "latest.weights.h5",
            backup_dir,
        )


_KEEP = {"delete_checkpoint": False}


class MergeInputTest(DamagedTest):
    def test_a_truncated_preset_is_refused_before_writing(self):
        base = self.copy_preset()
        tuned = os.path.join(self.get_temp_dir(), "tuned")
        shutil.copytree(base, tuned)
        weights = os.path.join(tuned, "model.weights.h5")
        _cut(weights, os.path.getsize(weights) - 1)
        output = os.path.join(self.get_temp_dir(), "merged")
        self.assert_refused(
            lambda: merging.slerp(base, tuned, output=output),
            weights,
            "is truncated",
            self.get_temp_dir(),
        )
        self.assertFalse(os.path.exists(output))


class SafetensorsHeaderTest(DamagedTest):
    """The header check itself, on hand-written files."""

    def write(self, header, data):
        path = os.path.join(self.get_temp_dir(), "x.safetensors")
        raw = (
            json.dumps(header).encode() if isinstance(header, dict) else header
        )
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + data)
        return path

    def check(self, path):
        return damaged.safetensors_header(path, fix=damaged.HF_FIX)

    @only_once
    def test_a_whole_file_passes(self):
        entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        path = self.write({"a": entry, "__metadata__": {"k": "v"}}, bytes(8))
        header, start = self.check(path)
        self.assertEqual(header["a"], entry)
        self.assertEqual(start, os.path.getsize(path) - 8)

    @only_once
    def test_each_damage_is_named(self):
        f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        cases = {
            "data cut short": (
                {"a": f32},
                bytes(7),
                r"is truncated: it has \d+ bytes, but its header places "
                r"tensor a up to byte",
            ),
            "length larger than the file": (
                b"{}",
                b"",
                None,
            ),
            "offsets that disagree with the shape": (
                {"a": {**f32, "shape": [3]}},
                bytes(8),
                r"spans 8 bytes, but a F32 tensor of shape \(3,\) has 12",
            ),
            "offsets backwards": (
                {"a": {**f32, "data_offsets": [8, 0]}},
                bytes(8),
                "has no valid data_offsets",
            ),
            "a header that is a list": (b"[1]", b"", "not a JSON object"),
            "a header that is not JSON": (b"{oops", b"", "not JSON"),
        }
        for name, (header, data, match) in cases.items():
            with self.subTest(name):
                if match is None:  # a length that points past the end
                    path = os.path.join(self.get_temp_dir(), "y.safetensors")
                    with open(path, "wb") as f:
                        f.write(struct.pack("<Q", 1000) + b"{}")
                    match = "its header is 1000 bytes long, but only 2"
                else:
                    path = self.write(header, data)
                with pytest.raises(damaged.DamagedFileError, match=match):
                    self.check(path)

    @only_once
    def test_not_a_safetensors_file_at_all(self):
        path = os.path.join(self.get_temp_dir(), "notes.safetensors")
        with open(path, "wb") as f:
            f.write(b"these are my notes, not tensors")
        with pytest.raises(damaged.DamagedFileError, match="header length"):
            self.check(path)
        with open(path, "wb") as f:
            f.write(b"short")
        with pytest.raises(damaged.DamagedFileError, match="fewer than the 8"):
            self.check(path)

    @only_once
    def test_missing_files_and_network_errors_are_not_damage(self):
        with pytest.raises(FileNotFoundError):
            self.check(os.path.join(self.get_temp_dir(), "absent"))
        for error in (ConnectionError("offline"), PermissionError("no")):
            with pytest.raises(type(error)):
                with damaged.reading("x", "a file", damaged.COPY_FIX):
                    raise error
        with pytest.raises(damaged.DamagedFileError) as info:
            with damaged.reading("x.json", "a config", damaged.COPY_FIX):
                raise KeyError("vocab_size")
        self.assertEqual(
            str(info.value),
            f"x.json lacks vocab_size, which a config has. {damaged.COPY_FIX}",
        )
        self.assertIsInstance(info.value, ValueError)  # the CLI's one line


class OutOfRangeTokenIdsTest(TestCase):
    """Ids past the vocabulary or negative: JAX's lookup would clamp them."""

    @classmethod
    def setUpClass(cls):
        cls.lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
        cls.size = cls.lm.backbone.vocabulary_size

    def test_generate_dict(self):
        for bad, index in ((self.size, "[1, 2]"), (-1, "[1, 2]")):
            ids = np.array([[2, 5, 7], [2, 9, bad]])
            match = (
                rf"`token_ids` holds {bad} at index \[1, 2\], outside this "
                rf"model's vocabulary of {self.size} ids"
            )
            with pytest.raises(ValueError, match=match):
                self.lm.generate(
                    {"token_ids": ids, "padding_mask": np.ones_like(ids)},
                    max_new_tokens=2,
                )
        # The last valid id passes.
        ids = np.array([[2, 5, self.size - 1]])
        out = self.lm.generate(
            {"token_ids": ids, "padding_mask": np.ones_like(ids)},
            max_new_tokens=1,
        )
        self.assertEqual(out["token_ids"].shape, (1, 4))

    def test_score(self):
        with pytest.raises(ValueError, match=r"`inputs` holds -3 at index"):
            self.lm.score(np.array([[2, -3, 4]]))
        with pytest.raises(ValueError, match=rf"holds {self.size + 7} at"):
            self.lm.score(np.array([[2, 4, self.size + 7]]))

    def test_preprocessor_postprocess(self):
        preprocessor = self.lm.preprocessor
        ids = np.array([[2, 5, self.size]])
        with pytest.raises(ValueError, match=r"at index \[0, 2\]"):
            preprocessor.generate_postprocess(
                {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
            )
        with pytest.raises(ValueError, match=r"`token_ids\[1\]` holds -1 at"):
            preprocessor.generate_postprocess(
                {
                    "token_ids": [[2, 5], [2, 9, -1]],
                    "padding_mask": [[1, 1], [1, 1, 1]],
                }
            )
