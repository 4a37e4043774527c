"""WARP's EMA anchor: a moving average of the weights kept beside them."""

import keras


class EMAAnchor(keras.callbacks.Callback):
    """Keeps an exponential moving average of the weights while training.

    After each training batch, `ema = decay * ema + (1 - decay) * weight`
    (WARP's EMA anchor, with update rate `mu = 1 - decay`). The average
    starts from the weights at the first `fit` and continues across `fit`
    calls; it is kept in float32 on the weights' device, and the model's
    own weights are never touched.

    Why not the optimizer's `use_ema=True`: Keras' optimizer EMA is written
    into the model (every `ema_overwrite_frequency` steps and at the end of
    `fit`), replacing the fine-tuned weights. WARP needs both: the
    fine-tuned policy to merge, and the anchor beside it (as the KL
    reference, or as the base of a merge). Here the anchor is readable
    separately (`anchor_weights()`) and written only where asked
    (`apply_to(model)`), with any optimizer.

    With LoRA only the adapters train: the average is of the adapter
    matrices `a` and `b` (`variables="trainable"`), not of their product.

    Args:
        decay: float in [0, 1). WARP's `mu = 0.01` is `decay=0.99`.
        variables: `"trainable"` (the default) or `"all"`: which weights
            to average. Non-trainable weights do not change in training, so
            `"all"` only makes the anchor a whole model.

    Example:
    ```python
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    ema = keras_gemma2.merging.EMAAnchor(decay=0.9)
    x = np.ones((8, 3))
    model.fit(x, x[:, :2], batch_size=2, callbacks=[ema], verbose=0)
    anchor = keras.models.clone_model(model)  # the same weight paths
    ema.apply_to(anchor)  # `model` keeps its fine-tuned weights
    ```
    """

    def __init__(self, decay=0.99, variables="trainable"):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"`decay` must be in [0, 1); got {decay!r}.")
        if variables not in ("trainable", "all"):
            raise ValueError(
                f"`variables` must be 'trainable' or 'all'; got {variables!r}."
            )
        self.decay = float(decay)
        self.variables = variables
        self._ema = None

    def _watched(self):
        model = self.model
        if self.variables == "trainable":
            return list(model.trainable_variables)
        return list(model.weights)

    def on_train_begin(self, logs=None):
        watched = self._watched()
        if self._ema is not None and set(self._ema) == {
            v.path for v in watched
        }:
            return  # a further `fit` of the same model: keep averaging
        # A copy: JAX's training step donates (deletes) the old buffers.
        self._ema = {
            v.path: keras.ops.copy(
                keras.ops.cast(keras.ops.stop_gradient(v.value), "float32")
            )
            for v in watched
        }

    def on_train_batch_end(self, batch, logs=None):
        rate = 1.0 - self.decay
        for variable in self._watched():
            old = self._ema[variable.path]
            new = keras.ops.cast(
                keras.ops.stop_gradient(variable.value), "float32"
            )
            self._ema[variable.path] = old + rate * (new - old)

    def anchor_weights(self):
        """`{weight path: NumPy float32 array}` of the moving average."""
        if self._ema is None:
            raise ValueError("No average yet: train with this callback first.")
        return {
            path: keras.ops.convert_to_numpy(value)
            for path, value in self._ema.items()
        }

    def apply_to(self, model):
        """Assigns the average to `model`'s weights of the same paths.

        Every path and shape is checked before anything is assigned. Use a
        second copy of the model to keep the fine-tuned weights.
        """
        weights = self.anchor_weights()
        variables = {v.path: v for v in model.weights}
        missing = sorted(set(weights) - set(variables))
        if missing:
            raise ValueError(
                f"The model has no weights {missing[:3]} of the average; "
                "apply it to a model of the same architecture (and LoRA)."
            )
        for path, value in weights.items():
            if tuple(variables[path].shape) != value.shape:
                raise ValueError(
                    f"{path}: shape {tuple(variables[path].shape)} in the "
                    f"model, {value.shape} in the average."
                )
        for path, value in weights.items():
            variables[path].assign(value.astype(variables[path].dtype))
        return model
