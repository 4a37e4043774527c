"""Resuming an interrupted fit: `keras_gemma2.callbacks.BackupAndRestore`."""

import json
import os

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import callbacks
from keras_gemma2 import lora
from tests.harness import TestCase

TEXTS = [
    "The cat sat on the mat.",
    "Dogs bark at night.",
    "Python is a language.",
    "Keras runs on three backends.",
]


class _Interrupt(keras.callbacks.Callback):
    """Raises at the start of `epoch` (and of `batch` in it, if given)."""

    def __init__(self, epoch, batch=None):
        super().__init__()
        self.epoch, self.batch = epoch, batch
        self._epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if epoch == self.epoch and self.batch is None:
            raise RuntimeError("interrupted")

    def on_train_batch_begin(self, batch, logs=None):
        if self._epoch == self.epoch and batch == self.batch:
            raise RuntimeError("interrupted")


class _CrashingBackup(callbacks.BackupAndRestore):
    """Dies writing the backup for `crash_epoch`: after the weights, before
    the metadata and the switch."""

    def __init__(self, backup_dir, crash_epoch, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.crash_epoch = crash_epoch
        self.staged = None

    def _write_metadata(self, folder, metadata):
        if metadata["epoch"] == self.crash_epoch:
            self.staged = sorted(os.listdir(folder))
            raise OSError("No space left on device")
        super()._write_metadata(folder, metadata)


def _lm(rank=2):
    # Seeded before the tokenizer is made (see tests/conftest.py), so that
    # every model starts from the same LoRA matrices and dropout seeds.
    keras.utils.set_random_seed(7)
    lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    lm.preprocessor.sequence_length = 16
    lora.enable(lm.backbone, rank=rank)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3))
    return lm


def _mlp(optimizer="adam", units=4):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(units, activation="relu"),
            # Seeded: on PyTorch an unseeded one draws from torch's global
            # generator, which Keras' per-epoch array DataLoaders draw from
            # too (see the callback's docstring; the LM test covers it).
            keras.layers.Dropout(0.5, seed=1),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


X = np.linspace(-1, 1, 24, dtype="float32").reshape(8, 3)
Y = np.sin(X.sum(axis=1, keepdims=True))


def _fit_mlp(model, epochs, *cbs, batch_size=4):
    return model.fit(
        X,
        Y,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=False,
        callbacks=list(cbs),
        verbose=0,
    )


def _state(model):
    """Weights, optimizer variables and dropout seeds, as numpy."""
    seeds = [g.state for g in callbacks._seed_generators(model)]
    return [
        keras.ops.convert_to_numpy(v)
        for v in model.weights + model.optimizer.variables + seeds
    ]


def _metadata(state_dir):
    with open(os.path.join(state_dir, "training_metadata.json")) as f:
        return json.load(f)


class ResumeTest(TestCase):
    @pytest.mark.long
    def test_interrupted_lora_finetune_resumes_to_the_same_weights(self):
        fit = dict(epochs=3, batch_size=2, shuffle=False, verbose=0)
        reference = _lm()
        reference.fit(TEXTS, **fit)
        expected = _state(reference)

        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        lm = _lm()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            lm.fit(
                TEXTS,
                callbacks=[
                    callbacks.BackupAndRestore(backup_dir),
                    _Interrupt(epoch=2),
                ],
                **fit,
            )
        self.assertEqual(os.listdir(backup_dir), ["state-00000002"])

        # As a restarted process would: a new model, the same backup_dir.
        resumed = _lm()
        history = resumed.fit(
            TEXTS, callbacks=[callbacks.BackupAndRestore(backup_dir)], **fit
        )
        self.assertEqual(len(history.history["loss"]), 1)  # epoch 2 only
        self.assertEqual(int(resumed.optimizer.iterations.numpy()), 6)
        for got, want in zip(_state(resumed), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        self.assertFalse(os.path.exists(backup_dir))  # deleted on completion

    def test_backup_of_another_lora_rank_is_refused_before_loading(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        lm = _lm(rank=2)
        lm.fit(
            TEXTS[:2],
            epochs=1,
            batch_size=2,
            shuffle=False,
            verbose=0,
            callbacks=[
                callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False)
            ],
        )
        other = _lm(rank=4)
        before = [keras.ops.convert_to_numpy(v) for v in other.weights]
        with self.assertRaisesRegex(
            ValueError,
            r"written for a different model or optimizer: .*lora_kernel_a.*"
            r"is \(4, 192, 2\) float32 in the backup but \(4, 192, 4\) "
            r"float32 here\. Nothing was loaded",
        ):
            other.fit(
                TEXTS[:2],
                epochs=2,
                batch_size=2,
                shuffle=False,
                verbose=0,
                callbacks=[callbacks.BackupAndRestore(backup_dir)],
            )
        for v, b in zip(other.weights, before):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), b)


class CrashTest(TestCase):
    def test_crash_while_writing_keeps_the_previous_backup(self):
        reference = _mlp()
        _fit_mlp(reference, 4)
        expected = _state(reference)
        backup_dir = os.path.join(self.get_temp_dir(), "backup")

        crashing = _CrashingBackup(backup_dir, crash_epoch=2)
        with self.assertRaisesRegex(OSError, "No space left"):
            _fit_mlp(_mlp(), 4, crashing)
        # It died with the new weights written and no metadata...
        self.assertEqual(crashing.staged, ["variables.h5"])
        # ... and the previous backup is whole, and the only one.
        self.assertEqual(os.listdir(backup_dir), ["state-00000001"])
        self.assertEqual(_metadata(f"{backup_dir}/state-00000001")["epoch"], 1)

        # A process killed outright leaves its staging folder behind.
        leftover = os.path.join(backup_dir, ".state-00000002.writing-0a1b2c")
        os.mkdir(leftover)
        with open(os.path.join(leftover, "variables.h5"), "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)

        resumed = _mlp()
        history = _fit_mlp(
            resumed,
            4,
            callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
        )
        self.assertEqual(len(history.history["loss"]), 3)  # epochs 1 to 3
        for got, want in zip(_state(resumed), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        self.assertEqual(os.listdir(backup_dir), ["state-00000004"])

    def test_double_checkpoint_falls_back_to_the_previous_backup(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        backup = callbacks.BackupAndRestore(
            backup_dir, double_checkpoint=True, delete_checkpoint=False
        )
        _fit_mlp(_mlp(), 3, backup)
        self.assertEqual(
            sorted(os.listdir(backup_dir)), ["state-00000002", "state-00000003"]
        )
        # The disk fails under the newest backup.
        with open(f"{backup_dir}/state-00000003/variables.h5", "r+b") as f:
            f.truncate(100)
        with self.assertWarnsRegex(UserWarning, "restoring the previous one"):
            history = _fit_mlp(
                _mlp(), 4, callbacks.BackupAndRestore(backup_dir)
            )
        self.assertEqual(len(history.history["loss"]), 2)  # epochs 2 and 3

    def test_another_model_or_optimizer_is_refused(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        keep = dict(delete_checkpoint=False)
        _fit_mlp(_mlp(), 1, callbacks.BackupAndRestore(backup_dir, **keep))
        with self.assertRaisesRegex(
            ValueError, r"weight 0 .* is \(3, 4\) float32 in the backup but "
        ):
            _fit_mlp(_mlp(units=5), 2, callbacks.BackupAndRestore(backup_dir))
        with self.assertRaisesRegex(
            ValueError, r"it holds \d+ optimizer variables, this model has"
        ):
            _fit_mlp(_mlp("sgd"), 2, callbacks.BackupAndRestore(backup_dir))


class BatchLevelTest(TestCase):
    def test_epoch_to_restart_from_is_right(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")

        def backup():
            return callbacks.BackupAndRestore(backup_dir, save_freq=2)

        # 4 batches an epoch, a backup every 2: the last one was taken at
        # epoch 0's last batch, so a resume starts epoch 1 (Keras: 0).
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            _fit_mlp(_mlp(), 3, backup(), _Interrupt(1, 1), batch_size=2)
        self.assertEqual(_metadata(f"{backup_dir}/state-00000002")["epoch"], 1)
        # Resumed at epoch 1, backed up in its middle: epoch 1 (Keras: 0).
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            _fit_mlp(_mlp(), 3, backup(), _Interrupt(1, 3), batch_size=2)
        metadata = _metadata(f"{backup_dir}/state-00000003")
        self.assertEqual((metadata["epoch"], metadata["batch"]), (1, 1))
        history = _fit_mlp(_mlp(), 3, backup(), batch_size=2)
        self.assertEqual(len(history.history["loss"]), 2)  # epochs 1 and 2


def _lora_mlp():
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.Dense(1, dtype="bfloat16"),
        ]
    )
    model.layers[0].enable_lora(2)
    model.compile(optimizer="adam", loss="mse")
    return model


class VariablesTest(TestCase):
    def test_lora_matrices_and_bfloat16_come_back_as_they_were(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        keep = dict(delete_checkpoint=False)
        trained = _lora_mlp()
        _fit_mlp(trained, 2, callbacks.BackupAndRestore(backup_dir, **keep))
        expected = _state(trained)
        restored = _lora_mlp()
        # Nothing left to train: the restore is all that happens.
        _fit_mlp(restored, 2, callbacks.BackupAndRestore(backup_dir, **keep))
        self.assertEqual(restored.layers[1].kernel.dtype, "bfloat16")
        for got, want in zip(_state(restored), expected, strict=True):
            np.testing.assert_array_equal(got, want)
        lora_b = restored.layers[0].lora_kernel_b
        self.assertGreater(np.abs(keras.ops.convert_to_numpy(lora_b)).max(), 0)

    def test_keras_own_backup_zeroes_lora(self):
        # Why we do not use `save_weights`: it merges LoRA into the kernel
        # and loads both LoRA matrices as zeros (their gradients are then
        # zero too).
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        keras_backup = keras.callbacks.BackupAndRestore(
            backup_dir, delete_checkpoint=False
        )
        _fit_mlp(_lora_mlp(), 2, keras_backup)
        restored = _lora_mlp()
        _fit_mlp(restored, 2, keras_backup)
        for variable in (
            restored.layers[0].lora_kernel_a,
            restored.layers[0].lora_kernel_b,
        ):
            self.assertEqual(
                np.abs(keras.ops.convert_to_numpy(variable)).max(), 0
            )


class KerasBackupTest(TestCase):
    def test_a_run_backed_up_by_keras_goes_on(self):
        backup_dir = os.path.join(self.get_temp_dir(), "backup")
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            _fit_mlp(
                _mlp(),
                4,
                keras.callbacks.BackupAndRestore(backup_dir),
                _Interrupt(2),
            )
        history = _fit_mlp(_mlp(), 4, callbacks.BackupAndRestore(backup_dir))
        self.assertEqual(len(history.history["loss"]), 2)
        self.assertFalse(os.path.exists(backup_dir))

    def test_remote_backup_dir_is_refused(self):
        with self.assertRaisesRegex(ValueError, "local"):
            callbacks.BackupAndRestore("gs://bucket/backup")
