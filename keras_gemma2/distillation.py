"""Knowledge distillation: a student Gemma 2 learns a teacher's distribution.

Keras' own `keras.distillation.Distiller` takes `sample_weight` in
`compute_loss` but never uses it (Keras 3.15,
`keras/src/distillation/distiller.py` lines 418-427, `Distiller.compute_loss`:
"sample_weight: Sample weights (currently unused)"), and its
`LogitsDistillation` takes a plain mean over every position
(`distillation_loss.py` line 362). For a
language model that means training on padding, and on prompt tokens of
prompt/response data. `Gemma2Distiller` weights the per-token losses by the
preprocessor's `sample_weight` instead.
"""

import keras
import numpy as np
from keras import ops

from keras_gemma2 import data


class Gemma2Distiller(keras.Model):
    """Trains a student `Gemma2CausalLM` on a teacher's next-token distribution.

    `fit` runs both models over the same tokens and minimizes, per token,
    `alpha * T**2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels,
    student)`, where `teacher_T` and `student_T` are the softmax of each
    model's (soft-capped) logits divided by the temperature `T`. Both terms
    are weighted by the preprocessor's `sample_weight` and divided by its
    sum over the batch: the loss is the mean over target tokens, as
    `Gemma2CausalLM`'s default loss (with `alpha=0` the two are one
    number). Padding never counts, and for `{"prompts", "responses"}` data
    the prompt does not either (Keras' `keras.distillation.Distiller`
    ignores `sample_weight`). `evaluate` reports the same loss on held-out
    data; over several batches, `fit` and `evaluate` report Keras' mean of
    the batch losses, weighted by examples per batch. Pass
    `weighted_metrics=[keras_hub.metrics.Perplexity(from_logits=True)]` to
    `compile` for the student's perplexity of the labels.

    The teacher is frozen (`teacher.trainable` is set to `False`) and may be
    larger than the student; the two must share the vocabulary (checked:
    `vocabulary_size` of both backbones, and of both tokenizers when both
    have a preprocessor, with the same special-token ids). Strings are
    tokenized by the student's preprocessor; a dict with `token_ids` and
    `padding_mask` (with labels `y` and `sample_weight`) is taken as already
    preprocessed. `fit` and `evaluate` take in-memory data (reshuffled every
    epoch by `fit`, like `Gemma2CausalLM.fit`) or a batched `tf.data`
    dataset (preprocessed batch by batch, not shuffled).

    With `on_policy=True`, `fit` takes prompts only (a list of strings, or a
    dict with `"prompts"`; other keys are ignored). At the start of every
    epoch the student continues each prompt with `student.generate` (its
    own sampler: greedy unless `student.compile(sampler=...)` says
    otherwise), up to the preprocessor's `sequence_length` or a stop token,
    and the epoch trains on those token ids, scored by the teacher, with the
    loss on the generated tokens only. Limits: the sequences are
    regenerated once per epoch, not per step (use several short epochs to
    stay close to the student's current distribution); each epoch is its
    own `keras.Model.fit` call, so callbacks see `on_train_begin` and
    `on_train_end` every epoch (the returned `History` holds every epoch);
    `validation_data`, if given, is fixed text scored as in off-policy
    mode; `validation_split` is not supported.

    The distiller itself is not saved: save or export `distiller.student`.

    Args:
        teacher: a `Gemma2CausalLM`, frozen.
        student: a `Gemma2CausalLM` with the same vocabulary; its
            preprocessor tokenizes string inputs.
        temperature: float > 0. Both distributions are softened by it; the
            KL is scaled by `temperature**2` so its gradients keep their
            size. Defaults to `1.0`.
        alpha: float in [0, 1]. Weight of the KL term; `1 - alpha` weighs
            the cross-entropy with the data's labels. Defaults to `1.0`
            (pure distillation: the teacher's distribution holds the
            labels' information and more).
        on_policy: bool. Train on continuations the student generates.
            Defaults to `False`.

    Example:
    ```python
    teacher = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")
    preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_en", sequence_length=16
    )
    student = keras_gemma2.Gemma2CausalLM(
        keras_gemma2.Gemma2Backbone(
            vocabulary_size=4096, num_layers=1, num_query_heads=2,
            num_key_value_heads=1, hidden_dim=32, intermediate_dim=64,
            head_dim=16,
        ),
        preprocessor,
    )
    distiller = keras_gemma2.Gemma2Distiller(
        teacher=teacher, student=student, temperature=2.0, alpha=0.5
    )
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    distiller.fit(["The tokenizer splits text.", "A list is a sequence."],
                  batch_size=2, epochs=1)
    distiller.fit({"prompts": ["Say hi."], "responses": ["Hi!"]},
                  batch_size=1)
    student.generate("The tokenizer", max_new_tokens=4)
    on_policy = keras_gemma2.Gemma2Distiller(teacher, student, on_policy=True)
    on_policy.compile(optimizer=keras.optimizers.Adam(1e-3))
    on_policy.fit(["The tokenizer", "A list"], batch_size=2, epochs=2)
    ```
    """

    def __init__(
        self,
        teacher,
        student,
        temperature=1.0,
        alpha=1.0,
        on_policy=False,
        **kwargs,
    ):
        _check_compatible(teacher, student)
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(
                f"`temperature` must be a number > 0; got {temperature!r}."
            )
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(
                "`alpha` (the weight of the KL term; 1 - alpha weighs the "
                f"cross-entropy) must be in [0, 1]; got {alpha!r}."
            )
        if on_policy and student.preprocessor is None:
            raise ValueError(
                "`on_policy=True` generates from string prompts, which needs "
                "the student's preprocessor; the student has none."
            )
        super().__init__(**kwargs)
        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.on_policy = bool(on_policy)
        self.built = True
        # Like KerasHub's tasks: usable without a compile call.
        self.compile()

    @property
    def preprocessor(self):
        """The student's preprocessor, which tokenizes `fit` inputs."""
        return self.student.preprocessor

    def preprocess_samples(self, x, y=None, sample_weight=None):
        if self.preprocessor is None or (
            isinstance(x, dict) and "token_ids" in x
        ):
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        return self.preprocessor(x, y=y, sample_weight=sample_weight)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compile(self, optimizer="auto", **kwargs):
        """`keras.Model.compile`; the loss is the distiller's own.

        Args:
            optimizer: a `keras.Optimizer` or name; `"auto"` is Adam at
                `2e-5`, as for `Gemma2CausalLM` (the distiller is compiled
                so at construction).
            **kwargs: as for `keras.Model.compile`, without `loss` (the
                loss is the mean over target tokens; see the class).
        """
        if kwargs.get("loss") is not None:
            raise ValueError(
                "Gemma2Distiller computes its own loss (KL to the teacher "
                "and cross-entropy, weighted by `alpha`); do not pass `loss`."
            )
        kwargs.pop("loss", None)
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        super().compile(optimizer=optimizer, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y_pred is None:
            y_pred = self(x, training=training)
        if sample_weight is None:
            sample_weight = x["padding_mask"]
        weights = ops.cast(sample_weight, "float32")
        total = ops.maximum(ops.sum(weights), 1e-9)
        student_logits = ops.cast(y_pred, "float32")
        loss = ops.convert_to_tensor(0.0, "float32")
        if self.alpha > 0:
            teacher_logits = self.teacher(x, training=False)
            teacher_logits = ops.stop_gradient(
                ops.cast(teacher_logits, "float32")
            )
            kl = token_kl(teacher_logits, student_logits, self.temperature)
            loss = loss + self.alpha * ops.sum(kl * weights) / total
        if self.alpha < 1:
            if y is None:
                raise ValueError(
                    "`alpha` < 1 mixes in the cross-entropy with the labels, "
                    "but the batch has none (`y` is None)."
                )
            ce = keras.losses.sparse_categorical_crossentropy(
                y, student_logits, from_logits=True
            )
            loss = loss + (1 - self.alpha) * ops.sum(ce * weights) / total
        if self.losses:
            loss = loss + ops.sum(ops.stack(self.losses))
        return loss

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        sample_weight=None,
        shuffle=True,
        **kwargs,
    ):
        """Trains the student; see the class docstring for the inputs."""
        if self.on_policy:
            if y is not None or sample_weight is not None:
                raise ValueError(
                    "On-policy distillation takes prompts only: the student "
                    "writes the continuations and the teacher scores them. "
                    "Pass no `y` or `sample_weight`."
                )
            return self._fit_on_policy(x, batch_size, shuffle, **kwargs)
        return self._fit(x, y, batch_size, sample_weight, shuffle, **kwargs)

    def _fit(
        self,
        x,
        y,
        batch_size,
        sample_weight,
        shuffle,
        validation_data=None,
        **kwargs,
    ):
        if kwargs.get("validation_split"):
            raise ValueError(
                "`validation_split` is not supported; pass `validation_data`."
            )
        x = self._dataset(x, y, sample_weight, batch_size, shuffle)
        if validation_data is not None:
            if not _is_tf_dataset(validation_data) and isinstance(
                validation_data, tuple
            ):
                validation_data = self._dataset(
                    *validation_data, batch_size=batch_size
                )
            else:
                validation_data = self._dataset(
                    validation_data, batch_size=batch_size
                )
        # Shuffled above, or not wanted; Keras warns when told to shuffle
        # a dataset.
        return super().fit(
            x, validation_data=validation_data, shuffle=False, **kwargs
        )

    def evaluate(
        self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs
    ):
        """The distillation loss on data given as for `fit` (in order)."""
        x = self._dataset(x, y, sample_weight, batch_size)
        return super().evaluate(x, **kwargs)

    def _dataset(
        self, x, y=None, sample_weight=None, batch_size=None, shuffle=False
    ):
        """A `tf.data` pipeline of preprocessed batches.

        KerasHub's `PipelineModel` does this for `Task`s, but it cannot be
        subclassed by a model that is not functional: its constructor
        resets the base class that Keras swaps for functional models, which
        breaks every `Gemma2CausalLM` made before.
        """
        # TensorFlow only for the tf.data pipeline of in-memory inputs
        import tensorflow as tf

        if _is_tf_dataset(x):
            if y is not None or sample_weight is not None:
                raise ValueError(
                    "A tf.data dataset carries its own labels; pass no `y` "
                    "or `sample_weight` with it."
                )
        else:
            x = data.batches(
                x,
                y,
                sample_weight,
                batch_size=batch_size or 32,
                shuffle=shuffle,
            )
        return x.map(
            self._preprocess_batch, num_parallel_calls=tf.data.AUTOTUNE
        ).prefetch(tf.data.AUTOTUNE)

    def _preprocess_batch(self, *batch):
        return self.preprocess_samples(*batch)

    def _fit_on_policy(
        self, x, batch_size, shuffle, epochs=1, initial_epoch=0, **kwargs
    ):
        if kwargs.get("validation_split"):
            raise ValueError(
                "`validation_split` is not supported with `on_policy=True`; "
                "pass `validation_data` (text, scored off-policy)."
            )
        prompts = _prompts(x)
        batch_size = batch_size or 32
        history = None
        logs = {}
        for epoch in range(initial_epoch, epochs):
            x, y, sample_weight = self.generate_on_policy(
                prompts, batch_size=batch_size
            )
            history = self._fit(
                x,
                y,
                sample_weight=sample_weight,
                batch_size=batch_size,
                shuffle=shuffle,
                epochs=epoch + 1,
                initial_epoch=epoch,
                **kwargs,
            )
            for key, values in history.history.items():
                logs.setdefault(key, []).extend(values)
        if history is not None:
            history.history = logs
            history.epoch = list(range(initial_epoch, epochs))
        return history

    def generate_on_policy(self, prompts, batch_size=32):
        """The student's continuations of `prompts`, as training data.

        Args:
            prompts: a list of strings.
            batch_size: int. Prompts generated at once.

        Returns:
            `(x, y, sample_weight)` numpy arrays as the preprocessor makes
            them: `x` holds `token_ids` and `padding_mask` (prompt and
            continuation), `y` the next tokens, and `sample_weight` is 1 on
            the generated tokens (up to and including a stop token) only.
        """
        prompts = _prompts(prompts)
        preprocessor = self.student.preprocessor
        length = preprocessor.sequence_length
        # One position more than the inputs: labels are shifted by one.
        batch = preprocessor.generate_preprocess(
            prompts, sequence_length=length + 1
        )
        token_ids = ops.convert_to_numpy(batch["token_ids"]).astype("int32")
        prompt_mask = ops.convert_to_numpy(batch["padding_mask"]).astype(bool)
        too_long = np.flatnonzero(prompt_mask.sum(axis=-1) >= length)
        if too_long.size:
            row = int(too_long[0])
            raise ValueError(
                f"Prompt {row} has {int(prompt_mask[row].sum())} tokens (with "
                f"<bos>), which leaves no room to generate in the "
                f"preprocessor's sequence_length={length}. Shorten it or "
                "raise `student.preprocessor.sequence_length`."
            )
        outputs = {"token_ids": [], "padding_mask": []}
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            out = self.student.generate(
                {
                    "token_ids": token_ids[rows],
                    "padding_mask": prompt_mask[rows],
                }
            )
            for key in outputs:
                outputs[key].append(np.asarray(out[key]))
        token_ids = np.concatenate(outputs["token_ids"]).astype("int32")
        mask = np.concatenate(outputs["padding_mask"]).astype(bool)
        generated = mask & ~prompt_mask
        token_ids = np.where(mask, token_ids, 0).astype("int32")
        x = {
            "token_ids": token_ids[:, :-1],
            "padding_mask": mask[:, :-1].astype("int32"),
        }
        return x, token_ids[:, 1:], generated[:, 1:].astype("float32")


def token_kl(teacher_logits, student_logits, temperature=1.0):
    """Per-token `T**2 * KL(softmax(teacher / T) || softmax(student / T))`.

    Args:
        teacher_logits, student_logits: `[..., vocabulary]` logits.
        temperature: float > 0.

    Returns:
        `[...]` float32 tensor.
    """
    t = ops.cast(teacher_logits, "float32") / temperature
    s = ops.cast(student_logits, "float32") / temperature
    log_p = ops.log_softmax(t, axis=-1)
    log_q = ops.log_softmax(s, axis=-1)
    kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    return kl * (temperature * temperature)


def _is_tf_dataset(x):
    # TensorFlow may be absent: then `x` is no tf.data.Dataset
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return isinstance(x, tf.data.Dataset)


def _prompts(x):
    if isinstance(x, dict):
        if "prompts" not in x:
            raise ValueError(
                "On-policy distillation takes prompts: a list of strings or "
                f"a dict with 'prompts'; got a dict with keys {sorted(x)}."
            )
        x = x["prompts"]
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, str):
        x = [x]
    if isinstance(x, (list, tuple)) and x:
        x = [p.decode("utf-8") if isinstance(p, bytes) else p for p in x]
        if all(isinstance(p, str) for p in x):
            return x
    raise ValueError(
        "On-policy distillation takes prompts as a non-empty list of strings "
        "(or a dict with 'prompts'); datasets are not supported, since the "
        f"student regenerates the data every epoch. Got {type(x).__name__}."
    )


def _check_compatible(teacher, student):
    """Raises a ValueError unless teacher and student share a vocabulary."""
    for name, lm in (("teacher", teacher), ("student", student)):
        if not hasattr(lm, "backbone") or not hasattr(
            lm.backbone, "vocabulary_size"
        ):
            raise ValueError(
                f"The {name} must be a `Gemma2CausalLM`; got "
                f"{type(lm).__name__}."
            )
    if teacher is student:
        raise ValueError("The teacher and the student are the same model.")
    sizes = (teacher.backbone.vocabulary_size, student.backbone.vocabulary_size)
    if sizes[0] != sizes[1]:
        raise ValueError(
            "Distillation matches the teacher's and the student's "
            "distributions over one vocabulary, but the teacher's backbone "
            f"has vocabulary_size={sizes[0]} and the student's "
            f"{sizes[1]}. Give the student the teacher's tokenizer and "
            f"vocabulary_size={sizes[0]}."
        )
    if teacher.preprocessor is None or student.preprocessor is None:
        return
    tokenizers = (
        teacher.preprocessor.tokenizer,
        student.preprocessor.tokenizer,
    )
    sizes = tuple(t.vocabulary_size() for t in tokenizers)
    if sizes[0] != sizes[1]:
        raise ValueError(
            "The teacher's and the student's tokenizers differ: the "
            f"teacher's has {sizes[0]} tokens, the student's {sizes[1]}. "
            "Distillation needs one tokenizer for both."
        )
    for attribute in ("start_token_id", "end_token_id", "pad_token_id"):
        ids = tuple(getattr(t, attribute, None) for t in tokenizers)
        if ids[0] != ids[1]:
            raise ValueError(
                "The teacher's and the student's tokenizers differ: "
                f"{attribute} is {ids[0]} for the teacher and {ids[1]} for "
                "the student. Distillation needs one tokenizer for both."
            )
    probe = [int(i) for i in np.linspace(0, sizes[0] - 1, 16)]
    pieces = tuple([t.id_to_token(i) for i in probe] for t in tokenizers)
    if pieces[0] != pieces[1]:
        raise ValueError(
            "The teacher's and the student's tokenizers have the same size "
            "but map ids to different tokens (e.g. id "
            f"{probe[[a != b for a, b in zip(*pieces)].index(True)]}). "
            "Distillation needs one tokenizer for both."
        )
