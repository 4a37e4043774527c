"""Sharding plans, memory estimates, and model parallelism on 8 CPU devices."""

import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import deferred
from keras_gemma2 import distribution
from keras_gemma2.architectures import ARCHITECTURES
from keras_gemma2.memory import abstract_parameter_count
from tests import references
from tests.harness import TestCase

ROOT = pathlib.Path(__file__).resolve().parent.parent


NO_DISTRIBUTION = pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="keras.distribution has no torch backend",
)


class PlanTest(TestCase):
    def test_heads_first_then_head_dim(self):
        plan = distribution.plan_layouts(ARCHITECTURES["9b"], 8)
        self.assertEqual(plan["attention/key/kernel"][1], 0)  # 8 kv heads
        # The 27B's 16 key/value heads on 32 devices: head_dim 128 instead.
        plan = distribution.plan_layouts(ARCHITECTURES["27b"], 32)
        self.assertEqual(plan["attention/key/kernel"][1], 2)
        self.assertEqual(plan["attention/query/kernel"][1], 0)  # 32 heads
        self.assertEqual(plan["ffw_gating/kernel"][1], 1)

    def test_one_map_for_every_released_size(self):
        # 4, 8 and 16 key/value heads: 8 devices divide only head_dim 256
        # and 128 for all three.
        plan = distribution.plan_layouts(list(ARCHITECTURES.values()), 8)
        self.assertEqual(plan["attention/key/kernel"][1], 2)
        self.assertEqual(plan["attention/query/kernel"][1], 0)

    @NO_DISTRIBUTION
    def test_kv_cache_follows_the_key_projection(self):
        devices = keras.distribution.list_devices()[:1]
        mesh = keras.distribution.DeviceMesh(
            (1, 1), ("batch", "model"), devices
        )
        layout = distribution.kv_cache_layout(references.TINY_KWARGS, mesh)
        self.assertEqual(tuple(layout.axes), ("batch", None, None, None))
        # Sizes only: 4 devices divide the tiny head_dim 8, not its 2 heads.
        plan = distribution.plan_layouts(references.TINY_KWARGS, 4)
        self.assertEqual(plan["attention/key/kernel"][1], 2)

    def test_undividable_mesh_names_weight_and_sizes(self):
        with pytest.raises(
            ValueError,
            match=r"7 devices, which divides no dimension of token_embedding",
        ):
            distribution.plan_layouts(references.TINY_KWARGS, 7)

    @NO_DISTRIBUTION
    def test_unknown_mesh_axis(self):
        devices = keras.distribution.list_devices()[:1]
        mesh = keras.distribution.DeviceMesh((1, 1), ("data", "model"), devices)
        with pytest.raises(ValueError, match="not 'batch'"):
            distribution.get_layout_map(references.TINY_KWARGS, mesh)


def _mesh(model, batch=1):
    # A mesh of device names: layouts are planned without touching devices,
    # so one CPU can plan for 32 accelerators.
    return keras.distribution.DeviceMesh(
        (batch, model),
        ("batch", "model"),
        [f"cpu:{i}" for i in range(batch * model)],
    )


def _abstract_weights(kwargs):
    """(variable, ...) of a backbone built as shapes only: nothing allocated."""
    with deferred.deferred_variables():
        backbone = keras_gemma2.Gemma2Backbone(**kwargs)
    return backbone.weights


def _matrices(weights):
    return [w for w in weights if len(w.shape) >= 2 and "lora" not in w.path]


@NO_DISTRIBUTION
class ShapeDrivenMapTest(TestCase):
    """`get_layout_map(mesh)` with no architecture: the KerasHub call."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Each released size at its own widths, built abstractly. Every
        # layer of a size has the same shapes, so two layers (one local, one
        # global) hold every distinct weight; all 46 of the 27B took a
        # minute on two CPU cores.
        cls.released = {
            size: _abstract_weights({**a, "num_layers": 2})
            for size, a in ARCHITECTURES.items()
        }

    def _placed(self, layout_map, weights):
        """What Keras's own lookup gives each variable: path -> axes."""
        parallel = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        return {
            w.path: tuple(parallel.get_variable_layout(w).axes) for w in weights
        }

    def test_every_released_matrix_is_sharded_and_divisible(self):
        for size, weights in self.released.items():
            matrices = _matrices(weights)
            self.assertEqual(len(matrices), 1 + 7 * 2)  # embedding, kernels
            for model in (2, 4, 8, 16, 32):
                layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(
                    _mesh(model)
                )
                placed = self._placed(layout_map, matrices)
                for w in matrices:
                    axes = placed[w.path]
                    self.assertEqual(axes.count("model"), 1, (size, w.path))
                    dim = w.shape[axes.index("model")]
                    self.assertEqual(dim % model, 0, (size, model, w.path))

    def test_released_sizes_shard_as_their_own_plans(self):
        # Known placements: 9B on 8 by heads everywhere; the 27B's 16
        # key/value heads on 32 devices by head_dim, its 32 query heads by
        # heads; the 2B's 4 key/value heads on 8 by head_dim.
        expected = {
            ("9b", 8, "decoder_block_0/attention/key/kernel"): 0,
            ("9b", 8, "decoder_block_0/attention/query/kernel"): 0,
            ("27b", 32, "decoder_block_1/attention/key/kernel"): 2,
            ("27b", 32, "decoder_block_1/attention/query/kernel"): 0,
            ("27b", 32, "decoder_block_1/ffw_linear/kernel"): 0,
            ("2b", 8, "decoder_block_1/attention/value/kernel"): 2,
            ("2b", 8, "token_embedding/embeddings"): 0,
        }
        for (size, model, path), axis in expected.items():
            layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(
                _mesh(model)
            )
            placed = self._placed(layout_map, self.released[size])
            self.assertEqual(placed[path].index("model"), axis, path)
        # And every matrix as the single-size plan `kv_cache_layout` uses.
        for size, weights in self.released.items():
            plan = distribution.plan_layouts(ARCHITECTURES[size], 32)
            placed = self._placed(
                keras_gemma2.Gemma2Backbone.get_layout_map(_mesh(32)), weights
            )
            for w in _matrices(weights):
                (pattern,) = [p for p in plan if w.path.endswith(p)]
                self.assertEqual(
                    placed[w.path].index("model"), plan[pattern][1], w.path
                )

    def test_tiny_two_kv_heads_on_four_shard_head_dim(self):
        # The keras-hub#1613 case: a plan shared by the released sizes
        # shards the key projection by its heads (4, 8, 16 on 4 devices),
        # which the tiny model's 2 do not divide.
        layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(_mesh(4, 2))
        key = "decoder_block_0/attention/key/kernel"
        self.assertEqual(layout_map[key].axes, ("model", None, None))
        placed = self._placed(
            layout_map, _abstract_weights(references.TINY_KWARGS)
        )
        self.assertEqual(placed[key], (None, None, "model"))  # head_dim 8
        self.assertEqual(
            placed["token_embedding/embeddings"], (None, "model")
        )  # vocabulary 97 is prime: width 24
        self.assertEqual(
            placed["decoder_block_0/attention/query/kernel"],
            ("model", None, None),
        )
        ffw = placed["decoder_block_0/ffw_linear/kernel"]
        self.assertEqual(ffw, ("model", None))  # FFN width 40
        self.assertEqual(
            placed["decoder_block_0/pre_attention_norm/scale"], (None,)
        )

    def test_custom_size_by_width_when_no_head_axis_divides(self):
        kwargs = {**references.TINY_KWARGS, "head_dim": 6}  # 4, 2, 6 on 4
        placed = self._placed(
            keras_gemma2.Gemma2Backbone.get_layout_map(_mesh(4)),
            _abstract_weights(kwargs),
        )
        # key [k=2, d=24, h=6]: neither heads nor head_dim, so the width.
        key = placed["decoder_block_1/attention/key/kernel"]
        self.assertEqual(key, (None, "model", None))

    def test_lora_adapters_stay_replicated(self):
        with deferred.deferred_variables():
            backbone = keras_gemma2.Gemma2Backbone(**references.TINY_KWARGS)
            backbone.enable_lora(rank=2)
        adapters = [w for w in backbone.weights if "lora_kernel" in w.path]
        self.assertTrue(adapters)
        layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(_mesh(4))
        for axes in self._placed(layout_map, adapters).values():
            self.assertEqual(set(axes), {None})

    def test_undividable_weight_names_its_path_and_shape(self):
        layout_map = keras_gemma2.Gemma2Backbone.get_layout_map(_mesh(7))
        with pytest.raises(
            ValueError,
            match=r"7 devices, which divides no dimension of "
            r"token_embedding/embeddings \(axes \('v', 'd'\), "
            r"shape \(97, 24\)",
        ):
            layout_map.layout_for("token_embedding/embeddings", (97, 24))

    def test_explicit_architecture_checks_the_mesh_up_front(self):
        with pytest.raises(ValueError, match="7 devices"):
            distribution.get_layout_map(references.TINY_KWARGS, _mesh(7))
        layout_map = distribution.get_layout_map(
            references.TINY_KWARGS, _mesh(4)
        )
        key = "decoder_block_0/attention/key/kernel"
        self.assertEqual(layout_map[key].axes, (None, None, "model"))


class TorchTest(TestCase):
    @pytest.mark.skipif(keras.config.backend() != "torch", reason="torch only")
    def test_clear_error_on_torch(self):
        with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
            distribution.get_layout_map(references.TINY_KWARGS, None)


class MemoryTest(TestCase):
    def test_generate_is_weights_plus_a_window_sized_local_cache(self):
        a = ARCHITECTURES["9b"]
        weights = abstract_parameter_count(a) * 2
        # 21 local layers keep 4096 positions, 21 global ones 8192.
        positions = 21 * 4096 + 21 * 8192
        cache = 2 * positions * a["num_key_value_heads"] * 256 * 2
        self.assertEqual(
            distribution.memory_bytes(a, "generate"), weights + cache
        )

    def test_27b_cache_at_8k_is_three_quarters_of_full_length(self):
        a = ARCHITECTURES["27b"]
        ours = distribution.kv_cache_bytes(a, 8192)
        full = distribution.kv_cache_bytes(a, 8192, ring=False)
        self.assertEqual(ours / full, 0.75)
        # Below the window the two are the same.
        self.assertEqual(
            distribution.kv_cache_bytes(a, 4096),
            distribution.kv_cache_bytes(a, 4096, ring=False),
        )

    def test_cache_bytes_are_what_generation_allocates(self):
        backbone = keras_gemma2.Gemma2Backbone(
            **references.TINY_KWARGS, dtype="float32"
        )
        cache = backbone.init_cache(3, 10)
        allocated = sum(
            int(np.prod(keras.ops.shape(t))) * 4 for pair in cache for t in pair
        )
        self.assertEqual(
            allocated,
            distribution.kv_cache_bytes(
                references.TINY_KWARGS, 10, batch_size=3, dtype="float32"
            ),
        )

    def test_readme_cache_table_is_the_computed_one(self):
        readme = (ROOT / "README.md").read_text()
        self.assertIn(distribution.kv_cache_table(), readme)

    def test_devices_needed_is_the_ceiling(self):
        a = ARCHITECTURES["27b"]
        need = distribution.memory_bytes(a, "generate")
        self.assertEqual(
            distribution.devices_needed(a, 16),
            math.ceil(need / (16 * 2**30 * 0.9)),
        )

    def test_readme_table_is_the_computed_one(self):
        readme = (ROOT / "README.md").read_text()
        self.assertIn(distribution.device_table(), readme)


@pytest.mark.long
@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="a JAX subprocess; run once"
)
def test_model_parallel_matches_one_device():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "distributed_check.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("data_parallel")["loss_diff"] < 1e-5
    # Created on a 7-device model axis: our error, not JAX's IndivisibleError.
    error = report.pop("undividable")
    assert error["type"] == "ValueError", error
    assert "divides no dimension of token_embedding" in error["message"]
    for mesh, numbers in report.items():
        assert numbers["logits_diff"] < 1e-5, mesh
        assert numbers["same_generation"], mesh
        assert numbers["loss_diff"] < 1e-5, mesh
        assert numbers["placed_as_planned"], mesh
        assert numbers["sharded_weights"] > 0, mesh
        assert numbers["unsharded_matrices"] == [], mesh
        # 2 key/value heads: the cache splits head_dim over the model axis.
        assert numbers["cache_axes"] == ["batch", None, None, "model"]
