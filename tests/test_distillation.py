"""Gemma2Distiller: a small student learns the tiny preset's distribution."""

import pathlib
import sys

import keras
import keras_hub
import numpy as np

import keras_gemma2
from keras_gemma2 import distillation
from tests.harness import TestCase

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts")
)
import tiny_corpus  # noqa: E402

SEQUENCE_LENGTH = 32


def _paragraphs(documents, count):
    """Up to `count` paragraphs of the documents, one line each."""
    out = []
    for document in documents:
        for paragraph in document.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > 60:
                out.append(paragraph[:200])
            if len(out) == count:
                return out
    return out


def _student(preprocessor, vocabulary_size=4096):
    return keras_gemma2.Gemma2CausalLM(
        keras_gemma2.Gemma2Backbone(
            vocabulary_size=vocabulary_size,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=64,
            intermediate_dim=128,
            head_dim=32,
            sliding_window_size=64,
        ),
        preprocessor,
    )


def _np(value):
    return keras.ops.convert_to_numpy(value)


def _weights(model):
    return [_np(v).copy() for v in model.weights]


class DistillerTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.torch_threads = None
        if keras.config.backend() == "torch":
            import torch

            # On 2 busy cores, torch's intra-op threads and tf.data's
            # preprocessing threads fight: the comparison took 105 s with
            # 2 threads and ~10 s with 1.
            cls.torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        # Only the student's tokenizer runs in tf.data graphs, so the
        # teacher may be made before the autouse seed.
        cls.teacher = keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")

    @classmethod
    def tearDownClass(cls):
        if cls.torch_threads is not None:
            import torch

            torch.set_num_threads(cls.torch_threads)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        # Made after the autouse seed: `keras.utils.set_random_seed` frees
        # an already-made tokenizer's SentencePiece resource for later
        # tf.data graphs.
        self.preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
            "gemma2_tiny_en", sequence_length=SEQUENCE_LENGTH
        )

    def test_distilled_student_is_closer_to_the_teacher_than_ce_alone(self):
        train_documents, held_out_documents = tiny_corpus.split()
        train = _paragraphs(train_documents, 256)
        held_out = _paragraphs(held_out_documents, 64)
        distilled = _student(self.preprocessor)
        plain = _student(self.preprocessor)
        plain.backbone.set_weights(distilled.backbone.get_weights())

        # Same init, data, optimizer and steps (one epoch of 16 batches).
        distiller = keras_gemma2.Gemma2Distiller(
            teacher=self.teacher, student=distilled, alpha=1.0
        )
        distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
        distiller.fit(train, batch_size=16, epochs=1, verbose=0)
        plain.compile(optimizer=keras.optimizers.Adam(3e-3))
        plain.fit(train, batch_size=16, epochs=1, verbose=0)

        x, y, weights = self.preprocessor(held_out)
        weights = _np(weights).astype("float32")
        teacher_logits = self.teacher(x)

        def held_out_numbers(lm):
            logits = lm(x)
            kl = _np(distillation.token_kl(teacher_logits, logits))
            nll = _np(
                keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True
                )
            )
            return (
                float((kl * weights).sum() / weights.sum()),
                float(np.exp((nll * weights).sum() / weights.sum())),
            )

        _, teacher_ppl = held_out_numbers(self.teacher)
        distilled_kl, distilled_ppl = held_out_numbers(distilled)
        plain_kl, plain_ppl = held_out_numbers(plain)
        print(
            f"\nheld-out KL(teacher || student): distilled {distilled_kl:.3f}"
            f", cross-entropy only {plain_kl:.3f}\nheld-out perplexity: "
            f"teacher {teacher_ppl:.1f}, distilled {distilled_ppl:.1f}, "
            f"cross-entropy only {plain_ppl:.1f}"
        )
        self.assertLess(distilled_kl, plain_kl)
        self.assertLess(
            abs(np.log(distilled_ppl / teacher_ppl)),
            abs(np.log(plain_ppl / teacher_ppl)),
        )

    def test_loss_ignores_padding_and_prompt_tokens(self):
        distiller = keras_gemma2.Gemma2Distiller(
            self.teacher, _student(self.preprocessor), alpha=0.5
        )
        x, y, weights = self.preprocessor(
            {
                "prompts": ["Define a list.", "What does the tokenizer do?"],
                "responses": ["A mutable sequence.", "It splits text."],
            }
        )
        x = {k: _np(v) for k, v in x.items()}
        y, weights = _np(y), _np(weights)
        loss = _np(distiller.compute_loss(x, y, sample_weight=weights))

        # Other labels wherever the weight is 0 (the prompt and padding),
        # other tokens in the padding: the loss does not move.
        rng = np.random.default_rng(0)
        other_y = np.where(weights > 0, y, rng.integers(3, 4096, y.shape))
        padding = x["padding_mask"] == 0
        other_x = dict(x)
        other_x["token_ids"] = np.where(
            padding, rng.integers(3, 4096, y.shape), x["token_ids"]
        ).astype("int32")
        self.assertGreater(padding.sum(), 0)
        other = distiller.compute_loss(
            other_x, other_y.astype("int32"), sample_weight=weights
        )
        self.assertAllClose(_np(other), loss, atol=1e-5)

        # The KL term is the mean over the response tokens only.
        distiller.alpha = 1.0
        kl = _np(
            distillation.token_kl(
                self.teacher(x), distiller.student(x), temperature=1.0
            )
        )
        expected = (kl * weights).sum() / weights.sum()
        self.assertAllClose(
            _np(distiller.compute_loss(x, y, sample_weight=weights)),
            expected,
            atol=1e-5,
        )
        everywhere = (kl * x["padding_mask"]).sum() / x["padding_mask"].sum()
        self.assertNotAllClose(expected, everywhere)

    def test_cross_entropy_alone_reports_the_students_own_loss(self):
        # alpha=0 leaves the cross-entropy: the distiller and the student's
        # default loss are both the mean over the response tokens, so they
        # report one number (one batch; across batches both are Keras'
        # mean of batch losses).
        student = _student(self.preprocessor)
        distiller = keras_gemma2.Gemma2Distiller(
            self.teacher, student, alpha=0.0
        )
        pairs = {
            "prompts": ["Define a list.", "What does the tokenizer do?"],
            "responses": ["A mutable sequence.", "It splits text."],
        }
        distiller.compile(
            weighted_metrics=[keras_hub.metrics.Perplexity(from_logits=True)]
        )
        logs = distiller.evaluate(
            pairs, batch_size=2, verbose=0, return_dict=True
        )
        own = student.evaluate(pairs, batch_size=2, verbose=0, return_dict=True)
        self.assertAllClose(logs["loss"], own["loss"], atol=1e-4)
        self.assertAllClose(logs["perplexity"], own["perplexity"], rtol=1e-4)
        # Either over every position would be less than half of it.
        _, _, weights = self.preprocessor(pairs)
        self.assertLess(_np(weights).sum(), 0.5 * _np(weights).size)

    def test_temperature_scales_the_kl_by_its_square(self):
        teacher = np.array([[2.0, 0.0, -1.0]])
        student = np.array([[0.0, 1.0, 0.0]])
        p = np.exp(teacher / 2) / np.exp(teacher / 2).sum()
        q = np.exp(student / 2) / np.exp(student / 2).sum()
        expected = 4 * (p * np.log(p / q)).sum()
        self.assertAllClose(
            _np(distillation.token_kl(teacher, student, 2.0))[0],
            expected,
            atol=1e-5,
        )

    def test_teacher_is_frozen_and_the_student_trains(self):
        student = _student(self.preprocessor)
        distiller = keras_gemma2.Gemma2Distiller(
            self.teacher, student, temperature=2.0, alpha=0.5
        )
        self.assertFalse(self.teacher.trainable)
        trainable = {id(v) for v in distiller.trainable_variables}
        self.assertTrue(
            all(id(v) not in trainable for v in self.teacher.weights)
        )
        self.assertEqual(
            len(distiller.trainable_variables),
            len(student.trainable_variables),
        )
        teacher_before, student_before = (
            _weights(self.teacher),
            _weights(student),
        )
        history = distiller.fit(
            ["The tokenizer splits text.", "A list is a mutable sequence."],
            batch_size=2,
            epochs=2,
            verbose=0,
        )
        self.assertEqual(len(history.history["loss"]), 2)
        self.assertTrue(np.isfinite(history.history["loss"]).all())
        for before, after in zip(teacher_before, _weights(self.teacher)):
            np.testing.assert_array_equal(before, after)
        changed = [
            not np.array_equal(before, after)
            for before, after in zip(student_before, _weights(student))
        ]
        self.assertTrue(any(changed))

    def test_different_vocabularies_are_a_clear_error(self):
        with self.assertRaisesRegex(
            ValueError, "vocabulary_size=4096 and the student's 2048"
        ):
            keras_gemma2.Gemma2Distiller(
                self.teacher, _student(None, vocabulary_size=2048)
            )

    def test_bad_arguments_are_clear_errors(self):
        student = _student(self.preprocessor)
        with self.assertRaisesRegex(ValueError, "temperature"):
            keras_gemma2.Gemma2Distiller(self.teacher, student, temperature=0)
        with self.assertRaisesRegex(ValueError, r"alpha.*\[0, 1\]"):
            keras_gemma2.Gemma2Distiller(self.teacher, student, alpha=1.5)
        with self.assertRaisesRegex(ValueError, "same model"):
            keras_gemma2.Gemma2Distiller(self.teacher, self.teacher)
        with self.assertRaisesRegex(ValueError, "do not pass `loss`"):
            keras_gemma2.Gemma2Distiller(self.teacher, student).compile(
                loss="mse"
            )

    def test_on_policy_trains_on_the_students_own_continuations(self):
        preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
            "gemma2_tiny_en", sequence_length=12
        )
        student = _student(preprocessor)
        distiller = keras_gemma2.Gemma2Distiller(
            self.teacher, student, on_policy=True
        )
        prompts = ["The tokenizer", "A list is a mutable"]
        x, y, weights = distiller.generate_on_policy(prompts)
        # The weights cover exactly the tokens the student generated.
        prompt_lengths = [
            len(_np(preprocessor.tokenizer(p))) + 1 for p in prompts
        ]
        continuations = student.generate(
            prompts, max_length=13, strip_prompt=True
        )
        for row, size in enumerate(prompt_lengths):
            self.assertEqual(weights[row, : size - 1].sum(), 0)
            self.assertEqual(weights[row, size - 1], 1)
            generated = y[row][weights[row] > 0]
            self.assertEqual(
                preprocessor.tokenizer.detokenize(
                    [int(t) for t in generated if t not in (1, 107)]
                ),
                continuations[row],
            )
        np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])

        distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
        before = _weights(student)
        history = distiller.fit(
            {"prompts": prompts}, batch_size=2, epochs=2, verbose=0
        )
        self.assertEqual(len(history.history["loss"]), 2)
        self.assertFalse(
            all(np.array_equal(a, b) for a, b in zip(before, _weights(student)))
        )
        with self.assertRaisesRegex(ValueError, "takes prompts only"):
            distiller.fit(prompts, y=prompts)
        with self.assertRaisesRegex(ValueError, "no room to generate"):
            distiller.fit([" ".join(["tokenizer"] * 20)])
