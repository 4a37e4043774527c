"""Training callbacks: a `BackupAndRestore` whose every backup is atomic.

Why not `keras.callbacks.BackupAndRestore` (Keras 3.15) as it is:

- It writes `latest.weights.h5` in place (`h5py.File(path, "w")`
  truncates the previous backup first), then rewrites
  `training_metadata.json` in place. A process killed in between leaves a
  torn weights file (the resume raises `OSError`; without
  `double_checkpoint` nothing can be resumed), or new weights beside the
  old epoch number (the resume trains that epoch twice, silently). Its
  `double_checkpoint` copies (`.bkp`) are written in place too.
- It saves with `model.save_weights`, and `EinsumDense.save_own_variables`
  merges LoRA into the kernel; loading sets both LoRA matrices to zero.
  After a resume the adapters' learning is in the frozen kernel, and with
  both matrices zero their gradients are zero: a resumed LoRA fine-tune
  stops learning.
- No random state: dropout draws differ after a resume (seed generator
  states are not weights; on PyTorch, unseeded dropout draws from torch's
  global generator).
- With an integer `save_freq`, a resumed run records epoch 0 until its
  first epoch ends, and a backup taken at an epoch's last batch makes the
  resume redo the whole epoch.
- A backup of another model half-loads: the layers that match are
  assigned before the error.

Ours writes each backup (every weight as it is, LoRA matrices included,
the optimizer's variables, the random states, the epoch, and the
shape of each variable) into a hidden staging folder, then renames the
folder to `state-<n>`: a folder of that name is complete, and a resume
loads the newest one. The leftovers of a crash are hidden folders, removed
at the next start. A backup of another model (other shapes, LoRA rank or
optimizer) is refused before anything is assigned.

```python
lm = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
keras_gemma2.lora.enable(lm.backbone, rank=4)
lm.compile(optimizer=keras.optimizers.Adam(1e-4))
backup = keras_gemma2.callbacks.BackupAndRestore("backup")
lm.fit(texts, epochs=3, shuffle=False, callbacks=[backup])
# Killed? Run the same lines again: training goes on where it stopped.
```
"""

import json
import os
import re
import shutil
import warnings

import h5py
import keras
from keras.src.utils import file_utils

from keras_gemma2 import atomic
from keras_gemma2 import h5
from keras_gemma2.convert import damaged

_FORMAT = "keras_gemma2.backup/1"
_STATE = re.compile(r"^state-(\d+)$")
_VARIABLES = "variables.h5"
_METADATA = "training_metadata.json"
_WHAT_METADATA = "a keras_gemma2 backup's training_metadata.json"
_WHAT_VARIABLES = "a keras_gemma2 backup's variables.h5"
_KINDS = {
    "model": "weight",
    "optimizer": "optimizer variable",
    "seeds": "random seed state",
}


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with atomic, checked backups.

    Same arguments and behaviour as Keras' callback: the training state is
    backed up at the end of every epoch (or every `save_freq` batches),
    restored when `fit` starts again with the same `backup_dir`, and
    deleted when `fit` completes. What differs:

    - A backup is written into a hidden staging folder and renamed into
      place, so `backup_dir` always holds one complete backup whose
      weights, optimizer state and epoch belong together, whenever the
      process dies. Staging folders left by a crash are removed.
    - Variables are saved as they are: Keras' `save_weights` merges LoRA
      adapters into the frozen kernel and restores them as zeros, which
      stops a resumed LoRA fine-tune from learning.
    - Dropout's random state is backed up too (the seed generators, and on
      PyTorch its global generators, which unseeded dropout draws from):
      with a fixed data order (`shuffle=False`), a resumed run ends with
      the same weights as one that was never interrupted. (On PyTorch each
      Keras DataLoader draws once from the global generator too; for
      in-memory arrays Keras makes one per epoch, so there the resumed
      dropout masks are new ones but not the uninterrupted run's.)
    - A backup from a different model (shapes, LoRA rank, optimizer) raises
      a `ValueError` before any variable is assigned.
    - With an integer `save_freq`, the epoch to restart from is right after
      a resume and at an epoch's last batch. The interrupted epoch restarts
      from its first batch, as in Keras (its earlier batches count twice).

    A `backup_dir` holding only Keras' own backup files is restored with
    Keras' code, so a run started with Keras' callback can go on with this
    one. Local paths only (the atomic switch is an `os.replace`).

    Args:
        backup_dir: str. A folder for this training run's backups only.
        save_freq: `"epoch"` or an int: back up after every epoch, or
            every `save_freq` batches.
        double_checkpoint: bool. Keep the previous backup too, and fall back
            to it if the newest cannot be read.
        delete_checkpoint: bool. Delete `backup_dir` when `fit` completes.

    Example:
    ```python
    import tempfile
    backup_dir = tempfile.mkdtemp()

    class Preempted(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("preempted")

    def new_model():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    x, y = np.ones((8, 4)), np.zeros((8, 1))
    backup = keras_gemma2.callbacks.BackupAndRestore(backup_dir)
    try:
        new_model().fit(
            x, y, epochs=5, callbacks=[backup, Preempted()], verbose=0
        )
    except RuntimeError:
        pass
    # As a restarted process would: a new model, the same backup_dir.
    backup = keras_gemma2.callbacks.BackupAndRestore(backup_dir)
    history = new_model().fit(x, y, epochs=5, callbacks=[backup], verbose=0)
    assert len(history.history["loss"]) == 3  # epochs 2, 3 and 4
    ```
    """

    def __init__(
        self,
        backup_dir,
        save_freq="epoch",
        double_checkpoint=False,
        delete_checkpoint=True,
    ):
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        self._torch_rng = None  # Restored, waiting for the first step.
        if file_utils.is_remote_path(str(backup_dir)):
            raise ValueError(
                "`keras_gemma2.callbacks.BackupAndRestore` needs a local "
                f"`backup_dir`; got {backup_dir!r}."
            )

    # Restoring.

    def on_train_begin(self, logs=None):
        self._remove_leftovers()
        states = self._committed_states()
        if not states:
            if os.path.exists(self._weights_path):
                # Only Keras' own files: restore them with Keras' code.
                self._restore_keras_backup(logs)
                self._current_epoch = self.model._initial_epoch or 0
                return
            # No stale epoch from an earlier restore into this model.
            self.model._initial_epoch = None
            return
        if not self.model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, the model must be "
                "built before `fit()`: call it on a batch of data first."
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        for i, state in enumerate(states):
            try:
                metadata = self._read_metadata(state)
                self._check_matches(metadata, state)
                self._read_variables(state)
                break
            except damaged.DamagedFileError as error:
                # Unreadable: not torn (a state folder is complete when it
                # gets its name), but disks fail. The previous one is whole.
                # Nothing on disk is changed or removed either way.
                if i + 1 == len(states):
                    raise
                warnings.warn(
                    f"Backup {state} is unreadable ({error}); restoring "
                    f"the previous one, {states[i + 1]}."
                )
        self._current_epoch = metadata["epoch"]
        self.model._initial_epoch = metadata["epoch"]

    def _restore_keras_backup(self, logs):
        """Keras' own restore, its damaged files named as ours are."""
        if os.path.exists(self._training_metadata_path):
            with damaged.reading(
                self._training_metadata_path,
                "a Keras backup's training_metadata.json",
                damaged.BACKUP_FIX,
                errors=(KeyError, TypeError),
            ):
                damaged.read_json(
                    self._training_metadata_path,
                    "a Keras backup's training_metadata.json",
                    damaged.BACKUP_FIX,
                )["epoch"]
        # Keras falls back to its `.bkp` copy on an OSError by itself.
        with damaged.reading(
            self._weights_path,
            "a Keras backup's latest.weights.h5",
            damaged.BACKUP_FIX,
            errors=(OSError,),
        ):
            super().on_train_begin(logs)

    def _read_metadata(self, state):
        path = os.path.join(state, _METADATA)
        metadata = damaged.read_json(path, _WHAT_METADATA, damaged.BACKUP_FIX)
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{state} is not a keras_gemma2 backup "
                f"(format {metadata.get('format')!r}, expected {_FORMAT!r})."
            )
        with damaged.reading(
            path, _WHAT_METADATA, damaged.BACKUP_FIX, errors=(KeyError,)
        ):
            metadata["epoch"]
            for group in _groups(self.model):
                metadata["variables"][group]
        return metadata

    def _check_matches(self, metadata, state):
        """Raises, naming the first difference, if `state` is another
        model's backup."""
        problem = None
        for group, variables in _groups(self.model).items():
            saved, here = metadata["variables"][group], _signature(variables)
            kind = _KINDS[group]
            if len(saved) != len(here):
                problem = (
                    f"it holds {len(saved)} {kind}s, this model has {len(here)}"
                )
            else:
                for i, (a, b) in enumerate(zip(saved, here)):
                    if a[1:] != b[1:]:
                        problem = (
                            f"{kind} {i} ({b[0]}) is {tuple(a[1])} {a[2]} "
                            f"in the backup but {tuple(b[1])} {b[2]} here"
                        )
                        break
            if problem:
                raise ValueError(
                    f"The backup in {state} was written for a different "
                    f"model or optimizer: {problem}. Nothing was loaded. "
                    "Resume with the model (LoRA rank and targets included) "
                    "and optimizer that wrote it, or pass a new `backup_dir` "
                    "to start over."
                )

    def _read_variables(self, state):
        path = os.path.join(state, _VARIABLES)
        groups = _groups(self.model)
        # Opening checks the file's length (HDF5 refuses a truncated one),
        # and every dataset's presence and shape is checked against the
        # model before any variable is assigned.
        with damaged.open_h5(path, _WHAT_VARIABLES, damaged.BACKUP_FIX) as f:
            with damaged.reading(path, _WHAT_VARIABLES, damaged.BACKUP_FIX):
                found = {
                    group: [
                        tuple(f[group][str(i)].shape)
                        for i in range(len(f[group]))
                    ]
                    for group in groups
                }
            for group, variables in groups.items():
                if found[group] != [tuple(v.shape) for v in variables]:
                    raise damaged.DamagedFileError(
                        path,
                        f"does not match its {_METADATA}: its {group} "
                        "variables have other shapes",
                        damaged.BACKUP_FIX,
                    )
            # h5py's read errors only: an assign that fails is no damage.
            with damaged.reading(
                path,
                _WHAT_VARIABLES,
                damaged.BACKUP_FIX,
                errors=(OSError, KeyError),
            ):
                for group, variables in groups.items():
                    for i, variable in enumerate(variables):
                        variable.assign(h5.read(f[group][str(i)]))
                if "torch_rng" in f:
                    # Set just before the first step (`on_train_batch_begin`):
                    # a new `fit` first makes a DataLoader, which draws from
                    # it (an uninterrupted run reuses its grain/tf.data one).
                    self._torch_rng = {
                        k: v[()] for k, v in f["torch_rng"].items()
                    }

    # Backing up.

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        if self.save_freq == "epoch":
            self._save_model()

    def on_train_batch_begin(self, batch, logs=None):
        if self._torch_rng is not None:
            _set_torch_rng(self._torch_rng)
            self._torch_rng = None

    def on_train_batch_end(self, batch, logs=None):
        if self._should_save_on_batch(batch):
            steps = (self.params or {}).get("steps")
            if steps and batch + 1 >= steps:
                # The epoch's last batch: a resume starts the next epoch.
                self._save_model(epoch=self._current_epoch + 1, batch=0)
            else:
                self._save_model()

    def _save_model(self, epoch=None, batch=None):
        model = self.model  # On JAX, this syncs the training state.
        metadata = {
            "format": _FORMAT,
            "epoch": self._current_epoch if epoch is None else epoch,
            "batch": self._last_batch_seen if batch is None else batch,
            "variables": {
                group: _signature(variables)
                for group, variables in _groups(model).items()
            },
        }
        backup_dir = os.path.abspath(self.backup_dir)
        states = self._committed_states()
        number = 1 + (_number(states[0]) if states else 0)
        with atomic.staged_folder(
            os.path.join(backup_dir, f"state-{number:08d}")
        ) as staging:
            self._write_variables(staging)
            self._write_metadata(staging, metadata)
            atomic.fsync_path(staging)
        atomic.fsync_path(backup_dir)
        # The new backup is in place: drop the ones it replaces.
        keep = 2 if self.double_checkpoint else 1
        for state in self._committed_states()[keep:]:
            _remove(state)

    def _write_variables(self, folder):
        """Every weight, optimizer variable and seed state, as they are."""
        path = os.path.join(folder, _VARIABLES)
        with h5py.File(path, "w") as f:
            for group, variables in _groups(self.model).items():
                entries = f.create_group(group)
                for i, variable in enumerate(variables):
                    value = keras.ops.convert_to_numpy(variable.value)
                    h5.write(entries, str(i), value)
            if keras.backend.backend() == "torch":
                _write_torch_rng(f.create_group("torch_rng"))
        atomic.fsync_path(path)

    def _write_metadata(self, folder, metadata):
        with open(os.path.join(folder, _METADATA), "w") as f:
            json.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.backup_dir):
            # Each backup goes at once, so none is left half-deleted.
            for state in self._committed_states():
                _remove(state)
            shutil.rmtree(self.backup_dir, ignore_errors=True)
        self.model._initial_epoch = None
        self._torch_rng = None

    # The folder.

    def _committed_states(self):
        """Paths of the complete backups, newest first."""
        if not os.path.isdir(self.backup_dir):
            return []
        names = [n for n in os.listdir(self.backup_dir) if _STATE.match(n)]
        names.sort(key=lambda n: int(_STATE.match(n).group(1)), reverse=True)
        return [
            os.path.join(os.path.abspath(self.backup_dir), n) for n in names
        ]

    def _remove_leftovers(self):
        """Removes staging and half-deleted folders left by a crash."""
        if not os.path.isdir(self.backup_dir):
            return
        for name in os.listdir(self.backup_dir):
            if name.startswith(".state-"):
                shutil.rmtree(
                    os.path.join(self.backup_dir, name), ignore_errors=True
                )


def _seed_generators(model):
    """The seed generators of every layer (dropout's among them), in layer
    order: their states are variables that `save_weights` leaves out."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True):
        for generator in getattr(layer, "_seed_generators", ()):
            if id(generator) not in seen:
                seen.add(id(generator))
                found.append(generator)
    return found


def _groups(model):
    """What a backup holds: the model's weights and its optimizer's
    variables (what Keras' `save_weights` saves, but LoRA matrices as they
    are), and the seed generators' states."""
    optimizer = model.optimizer
    return {
        "model": model.weights,
        "optimizer": optimizer.variables if optimizer is not None else [],
        "seeds": [generator.state for generator in _seed_generators(model)],
    }


def _write_torch_rng(group):
    """PyTorch's global generators: Keras' torch dropout without a seed
    draws from them, not from its seed generator."""
    # torch: an optional dependency, imported on the PyTorch backend only
    import torch

    group["cpu"] = torch.get_rng_state().numpy()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            group[f"cuda_{i}"] = state.cpu().numpy()


def _set_torch_rng(states):
    # torch: an optional dependency, imported on the PyTorch backend only
    import torch

    torch.set_rng_state(torch.from_numpy(states["cpu"]))
    cuda = sorted(
        (k for k in states if k.startswith("cuda_")),
        key=lambda k: int(k[len("cuda_") :]),
    )
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(
                [torch.from_numpy(states[k]) for k in cuda]
            )


def _signature(variables):
    return [[v.path, list(v.shape), str(v.dtype)] for v in variables]


def _number(state):
    return int(_STATE.match(os.path.basename(state)).group(1))


def _remove(path):
    """Renames `path` to a hidden sibling, then deletes it."""
    aside = atomic.new_sibling(path, "deleting")
    os.rmdir(aside)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
