"""WARP merging: SLERP, LITI, warp, the EMA anchor; models and presets."""

import json
import os
import shutil
import tempfile

import keras
import numpy as np

import keras_gemma2
from keras_gemma2 import lora
from keras_gemma2 import merging
from tests import references
from tests.harness import TestCase

SHAPES = {"a": (3, 4, 5), "b": (7,), "c": (6, 2)}


def _random(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: scale * rng.normal(size=s) for k, s in SHAPES.items()}


def _ref_pair(d1, d2, t):
    """SLERP of two task vectors, written out with flat NumPy vectors."""
    v1, v2 = d1.ravel(), d2.ravel()
    cos = v1 @ v2 / (np.linalg.norm(v1) * np.linalg.norm(v2))
    omega = np.arccos(np.clip(cos, -1, 1))
    out = (np.sin((1 - t) * omega) * v1 + np.sin(t * omega) * v2) / np.sin(
        omega
    )
    return out.reshape(d1.shape)


def _ref_slerp(base, models, weights):
    out = {}
    for k in base:
        delta = models[0][k] - base[k]
        total = weights[0]
        for model, w in zip(models[1:], weights[1:]):
            total += w
            delta = _ref_pair(delta, model[k] - base[k], w / total)
        out[k] = base[k] + delta
    return out


def _backbone(seed, **kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_gemma2.Gemma2Backbone(
        **{**references.TINY_KWARGS, **kwargs}, dtype="float32"
    )
    rng = np.random.default_rng(seed)
    for v in backbone.weights:  # norms start at zero: make every weight move
        v.assign(rng.normal(0, 0.1, tuple(v.shape)).astype("float32"))
    return backbone


def _weights(model):
    backbone = getattr(model, "backbone", model)
    return {
        v.path: keras.ops.convert_to_numpy(v).astype("float64")
        for v in backbone.weights
    }


class SlerpArraysTest(TestCase):
    def test_endpoints_are_exact(self):
        base, m1, m2 = _random(0), _random(1), _random(2)
        for t, expected in ((0, m1), (1, m2)):
            merged = merging.slerp(base, [m1, m2], t=t)
            for k in SHAPES:
                np.testing.assert_array_equal(merged[k], expected[k])
        # Weights that pick one model of three.
        m3 = _random(3)
        merged = merging.slerp(base, [m1, m2, m3], t=[0, 1, 0])
        for k in SHAPES:
            np.testing.assert_array_equal(merged[k], m2[k])

    def test_identical_task_vectors_give_their_common_value(self):
        base, m1 = _random(0), _random(1)
        for t in (0.3, 0.5):
            merged = merging.slerp(base, [m1, dict(m1)], t=t)
            for k in SHAPES:
                self.assertAllClose(merged[k], m1[k], atol=1e-12)

    def test_norm_follows_the_spherical_formula(self):
        base = _random(0)
        d1, d2 = _random(1), _random(2, scale=3.0)
        # Equal norms stay on the sphere.
        d2_equal = {
            k: d2[k] * np.linalg.norm(d1[k]) / np.linalg.norm(d2[k])
            for k in SHAPES
        }
        for t in (0.2, 0.5, 0.9):
            for other, equal in ((d2_equal, True), (d2, False)):
                models = [
                    {k: base[k] + d1[k] for k in SHAPES},
                    {k: base[k] + other[k] for k in SHAPES},
                ]
                merged = merging.slerp(base, models, t=t)
                for k in SHAPES:
                    n1 = np.linalg.norm(d1[k])
                    n2 = np.linalg.norm(other[k])
                    cos = (d1[k].ravel() @ other[k].ravel()) / (n1 * n2)
                    omega = np.arccos(cos)
                    a = np.sin((1 - t) * omega) / np.sin(omega)
                    b = np.sin(t * omega) / np.sin(omega)
                    expected = np.sqrt(
                        a * a * n1 * n1
                        + b * b * n2 * n2
                        + 2 * a * b * n1 * n2 * cos
                    )
                    norm = np.linalg.norm(merged[k] - base[k])
                    self.assertAllClose(norm, expected, rtol=1e-10)
                    if equal:
                        self.assertAllClose(norm, n1, rtol=1e-10)

    def test_matches_numpy_reference(self):
        base = _random(0)
        models = [_random(i) for i in (1, 2, 3)]
        merged = merging.slerp(base, models[:2], t=0.3)
        expected = _ref_slerp(base, models[:2], [0.7, 0.3])
        for k in SHAPES:
            self.assertAllClose(merged[k], expected[k], rtol=1e-10)
        # Three models: the iterative pairwise rule, uniform and weighted.
        for t, weights in ((None, [1 / 3] * 3), ([0.5, 0.2, 0.3], None)):
            merged = merging.slerp(base, models, t=t)
            expected = _ref_slerp(base, models, weights or t)
            for k in SHAPES:
                self.assertAllClose(merged[k], expected[k], rtol=1e-10)
        # float32 in, float32 out, close to the float64 reference.
        as32 = [{k: v.astype("float32") for k, v in m.items()} for m in models]
        merged = merging.slerp(as32[0], as32[1:], t=0.3)
        expected = _ref_slerp(as32[0], as32[1:], [0.7, 0.3])
        for k in SHAPES:
            self.assertEqual(merged[k].dtype, np.float32)
            self.assertAllClose(merged[k], expected[k], rtol=1e-4, atol=1e-5)

    def test_zero_task_vector_falls_back_to_linear(self):
        base, m2 = _random(0), _random(2)
        merged = merging.slerp(base, [dict(base), m2], t=0.25)
        for k in SHAPES:
            self.assertAllClose(
                merged[k], base[k] + 0.25 * (m2[k] - base[k]), atol=1e-12
            )


class LitiWarpArraysTest(TestCase):
    def test_liti_endpoints_and_reference(self):
        init, merged = _random(0), _random(1)
        for eta, expected in ((0, init), (1, merged)):
            out = merging.liti(init, merged, eta=eta)
            for k in SHAPES:
                np.testing.assert_array_equal(out[k], expected[k])
        out = merging.liti(init, merged, eta=0.3)
        for k in SHAPES:
            self.assertAllClose(
                out[k], 0.7 * init[k] + 0.3 * merged[k], rtol=1e-12
            )

    def test_warp_is_liti_of_slerp(self):
        init = _random(0)
        models = [_random(i) for i in (1, 2)]
        out = merging.warp(init, models, t=0.4, eta=0.3)
        slerped = _ref_slerp(init, models, [0.6, 0.4])
        for k in SHAPES:
            self.assertAllClose(
                out[k], 0.7 * init[k] + 0.3 * slerped[k], rtol=1e-10
            )
        out = merging.warp(init, models, t=0.4, eta=0)
        for k in SHAPES:
            np.testing.assert_array_equal(out[k], init[k])


class BadInputTest(TestCase):
    def test_t_and_eta_outside_unit_interval(self):
        base, m1, m2 = _random(0), _random(1), _random(2)
        for t in (-0.1, 1.5, [1.2, -0.2]):
            with self.assertRaisesRegex(ValueError, r"`t` must be in \[0, 1\]"):
                merging.slerp(base, [m1, m2], t=t)
        for eta in (-1, 1.01):
            with self.assertRaisesRegex(ValueError, "`eta` must be in"):
                merging.liti(base, m1, eta=eta)
            with self.assertRaisesRegex(ValueError, "`eta` must be in"):
                merging.warp(base, [m1, m2], eta=eta)
        with self.assertRaisesRegex(ValueError, "sum to 1"):
            merging.slerp(base, [m1, m2], t=[0.5, 0.6])
        with self.assertRaisesRegex(ValueError, "single `t` merges two"):
            merging.slerp(base, [m1, m2, m1], t=0.5)

    def test_empty_and_mismatched(self):
        base, m1 = _random(0), _random(1)
        with self.assertRaisesRegex(ValueError, "empty"):
            merging.warp(base, [])
        with self.assertRaisesRegex(ValueError, r"missing \['c'\]"):
            merging.slerp(base, [{k: m1[k] for k in "ab"}])
        with self.assertRaisesRegex(ValueError, "shape"):
            merging.slerp(base, [{**m1, "b": np.zeros(8)}])
        with self.assertRaisesRegex(ValueError, "not float"):
            merging.slerp(base, [{**m1, "b": np.zeros(7, "int32")}])
        with self.assertRaisesRegex(TypeError, "Keras model, a preset"):
            merging.slerp(base, [3])

    def test_different_architectures(self):
        small = _backbone(0)
        deeper = _backbone(1, num_layers=4)
        with self.assertRaisesRegex(ValueError, "'num_layers' is 3"):
            merging.warp(small, [deeper])
        with self.assertRaisesRegex(ValueError, "one kind"):
            merging.slerp(small, [_weights(small)])


class ModelMergeTest(TestCase):
    def test_backbones_and_causal_lm(self):
        init, m1, m2 = _backbone(0), _backbone(1), _backbone(2)
        expected = _ref_slerp(
            _weights(init), [_weights(m1), _weights(m2)], [0.5, 0.5]
        )
        merged = merging.warp(init, [m1, m2], eta=0.4)
        self.assertIsInstance(merged, keras_gemma2.Gemma2Backbone)
        self.assertNotIn(merged, (init, m1, m2))
        got = _weights(merged)
        for k, v in _weights(init).items():
            self.assertAllClose(got[k], 0.6 * v + 0.4 * expected[k], atol=1e-5)
        # A causal LM, written into its base in place.
        lms = [
            keras_gemma2.Gemma2CausalLM(backbone=b, preprocessor=None)
            for b in (init, m1)
        ]
        init_weights = _weights(init)
        out = merging.liti(lms[0], lms[1], eta=0.25, output=lms[0])
        self.assertIs(out, lms[0])
        m1_weights = _weights(m1)
        for k, v in _weights(init).items():
            self.assertAllClose(
                v, 0.75 * init_weights[k] + 0.25 * m1_weights[k], atol=1e-6
            )

    def test_lora_models_merge_their_effective_kernels(self):
        init, tuned = _backbone(0), _backbone(0)
        lora.enable(tuned, rank=2, targets="all")
        rng = np.random.default_rng(5)
        for v in lora.adapter_variables(tuned).values():
            v.assign(rng.normal(0, 0.1, tuple(v.shape)).astype("float32"))
        unmerged = merging.liti(init, tuned, eta=0.5)
        lora.merge(tuned)
        merged = merging.liti(init, tuned, eta=0.5)
        # After `lora.merge` the kernels hold the effective weights.
        effective = {
            k: v for k, v in _weights(tuned).items() if "lora" not in k
        }
        init_weights = _weights(init)
        for out in (unmerged, merged):
            self.assertFalse(lora.adapter_variables(out))
            got = _weights(out)
            self.assertEqual(set(got), set(effective))
            for k in got:
                self.assertAllClose(
                    got[k],
                    0.5 * init_weights[k] + 0.5 * effective[k],
                    atol=1e-6,
                )
        with self.assertRaisesRegex(ValueError, "`output` has LoRA"):
            merging.liti(init, init, eta=0.5, output=tuned)


class PresetMergeTest(TestCase):
    def test_streamed_preset_merge_matches_models(self):
        folder = tempfile.mkdtemp()
        models = [_backbone(i) for i in range(3)]
        paths = [os.path.join(folder, f"m{i}") for i in range(3)]
        for model, path in zip(models, paths):
            model.save_to_preset(path)
        out = os.path.join(folder, "merged")
        result = merging.warp(paths[0], paths[1:], t=0.3, eta=0.6, output=out)
        self.assertEqual(result, out)
        self.assertEqual(sorted(os.listdir(out)), sorted(os.listdir(paths[0])))
        loaded = keras_gemma2.Gemma2Backbone.from_preset(out)
        expected = merging.warp(models[0], models[1:], t=0.3, eta=0.6)
        got, want = _weights(loaded), _weights(expected)
        for k in want:
            self.assertAllClose(got[k], want[k], atol=1e-6)
        # Another architecture on disk: refused, naming the key, and the
        # output folder is left as it was.
        deeper = os.path.join(folder, "deeper")
        shutil.copytree(paths[1], deeper)
        with open(os.path.join(deeper, "config.json")) as f:
            config = json.load(f)
        config["config"]["hidden_dim"] = 32
        with open(os.path.join(deeper, "config.json"), "w") as f:
            json.dump(config, f)
        with self.assertRaisesRegex(ValueError, "'hidden_dim'"):
            merging.slerp(paths[0], [paths[1], deeper], output=out)
        with open(os.path.join(out, "config.json")) as f:
            self.assertEqual(json.load(f)["config"]["hidden_dim"], 24)
        with self.assertRaisesRegex(ValueError, "not a preset"):
            merging.slerp(paths[0], paths[1:], output=folder)
        with self.assertRaisesRegex(ValueError, "pass `output=`"):
            merging.slerp(paths[0], paths[1:])


class EMAAnchorTest(TestCase):
    def test_average_of_the_weights_after_each_batch(self):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        seen = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                seen.append(
                    [
                        keras.ops.convert_to_numpy(v)
                        for v in self.model.trainable_variables
                    ]
                )

        start = [keras.ops.convert_to_numpy(v) for v in model.weights]
        ema = merging.EMAAnchor(decay=0.8)
        x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
        model.fit(
            x,
            x[:, :2],
            batch_size=2,
            epochs=1,
            verbose=0,
            callbacks=[ema, Record()],
        )
        expected = [w.astype("float64") for w in start]
        for weights in seen:
            expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
        anchor = ema.anchor_weights()
        paths = [v.path for v in model.trainable_variables]
        for path, want in zip(paths, expected):
            self.assertAllClose(anchor[path], want, atol=1e-6)
        # The model keeps its trained weights; `apply_to` writes a copy.
        for v, last in zip(model.trainable_variables, seen[-1]):
            self.assertAllClose(keras.ops.convert_to_numpy(v), last)
        copy = keras.models.clone_model(model)
        ema.apply_to(copy)
        for v, want in zip(copy.trainable_variables, expected):
            self.assertAllClose(keras.ops.convert_to_numpy(v), want, atol=1e-6)
        with self.assertRaisesRegex(ValueError, "decay"):
            merging.EMAAnchor(decay=1.0)
