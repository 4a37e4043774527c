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
from keras_gemma2 import distribution
from keras_gemma2.architectures import ARCHITECTURES
from keras_gemma2.architectures import abstract_parameter_count
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
    for mesh, numbers in report.items():
        assert numbers["logits_diff"] < 1e-5, mesh
        assert numbers["same_generation"], mesh
        assert numbers["loss_diff"] < 1e-5, mesh
        assert numbers["placed_as_planned"], mesh
        assert numbers["sharded_weights"] > 0, mesh
        # 2 key/value heads: the cache splits head_dim over the model axis.
        assert numbers["cache_axes"] == ["batch", None, None, "model"]
