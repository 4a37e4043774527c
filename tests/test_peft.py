"""export_peft: our LoRA adapters, loaded by transformers + PEFT.

The reference is PEFT itself: the exported folder is loaded with
`peft.PeftModel.from_pretrained` onto the original (un-merged) random HF
model our twin was copied from, and must give our LoRA model's logits.
"""

import json
import os
import shutil
import tempfile

import keras
import numpy as np

import keras_gemma2
from keras_gemma2 import lora
from keras_gemma2.convert.to_peft import export_peft
from tests import references
from tests.harness import TestCase


def _tmp(test):
    folder = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _train_adapters(backbone, seed=0):
    """Stands in for training: random values in every adapter matrix,
    large enough to move the logits visibly."""
    rng = np.random.default_rng(seed)
    for variable in lora.adapter_variables(backbone).values():
        variable.assign(
            rng.normal(0, 0.2, tuple(variable.shape)).astype("float32")
        )


def _our_logits(backbone, token_ids):
    lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor=None)
    logits = lm(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    )
    return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))


def _small_backbone(**lora_kwargs):
    backbone = keras_gemma2.Gemma2Backbone(
        **references.TINY_KWARGS, dtype="float32"
    )
    if lora_kwargs:
        lora.enable(backbone, **lora_kwargs)
    return backbone


class PeftParityTest(TestCase):
    def _export_and_load(self, rank, alpha, targets):
        import peft

        hf = references.hf_model()
        backbone = references.our_twin(hf)
        lora.enable(backbone, rank=rank, alpha=alpha, targets=targets)
        _train_adapters(backbone)
        token_ids = references.random_token_ids()
        ours = _our_logits(backbone, token_ids)
        base = references.hf_logits(hf, token_ids)
        path = export_peft(backbone, os.path.join(_tmp(self), "adapter"))
        # The original HF model, adapters not merged into it.
        model = peft.PeftModel.from_pretrained(hf, path).eval()
        theirs = references.hf_logits(model, token_ids)
        # The adapters matter, so a dropped or misplaced one would show.
        self.assertGreater(np.abs(ours - base).max(), 0.5)
        self.assertLess(np.abs(theirs - ours).max(), 1e-4)
        with open(os.path.join(path, "adapter_config.json")) as f:
            return model, json.load(f)

    def test_all_targets_with_grouped_query_attention(self):
        # 4 query / 2 kv heads: q's per-head adapters are a rank-8 PEFT
        # LoRA, k's and v's rank 4; alpha 3 at rank 2 is a scale of 1.5.
        model, config = self._export_and_load(2, 3, "all")
        self.assertEqual(config["r"], 2)
        self.assertEqual(config["lora_alpha"], 3)
        self.assertEqual(
            config["target_modules"],
            sorted(
                [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ]
            ),
        )
        self.assertEqual(
            config["rank_pattern"], {"q_proj": 8, "k_proj": 4, "v_proj": 4}
        )
        self.assertEqual(
            config["alpha_pattern"], {"q_proj": 12, "k_proj": 6, "v_proj": 6}
        )
        block = model.base_model.model.model.layers[2]
        for module in (block.self_attn.q_proj, block.mlp.down_proj):
            self.assertAlmostEqual(module.scaling["default"], 1.5)

    def test_default_targets(self):
        model, config = self._export_and_load(3, None, lora.DEFAULT_TARGETS)
        self.assertEqual(config["target_modules"], ["q_proj", "v_proj"])
        self.assertEqual(config["rank_pattern"], {"q_proj": 12, "v_proj": 6})
        attention = model.base_model.model.model.layers[0].self_attn
        self.assertEqual(
            tuple(attention.q_proj.lora_A["default"].weight.shape), (12, 24)
        )
        self.assertEqual(
            tuple(attention.v_proj.lora_B["default"].weight.shape), (16, 6)
        )
        self.assertFalse(hasattr(attention.o_proj, "lora_A"))


class ExportPeftTest(TestCase):
    def test_folder_layout_and_keys(self):
        backbone = _small_backbone(rank=2, targets=("query", "ffw_linear"))
        lm = keras_gemma2.Gemma2CausalLM(backbone, preprocessor=None)
        path = export_peft(
            lm,  # a CausalLM is taken for its backbone
            os.path.join(_tmp(self), "adapter"),
            base_model_name_or_path="google/gemma-2-2b",
        )
        self.assertEqual(
            sorted(os.listdir(path)),
            ["adapter_config.json", "adapter_model.safetensors"],
        )
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
        self.assertEqual(config["peft_type"], "LORA")
        self.assertEqual(config["task_type"], "CAUSAL_LM")
        self.assertEqual(config["base_model_name_or_path"], "google/gemma-2-2b")
        self.assertEqual(config["lora_dropout"], 0.0)
        self.assertEqual(config["bias"], "none")
        from safetensors import safe_open

        with safe_open(
            os.path.join(path, "adapter_model.safetensors"), "np"
        ) as f:
            shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        prefix = "base_model.model.model.layers.1."
        self.assertEqual(len(shapes), 3 * 2 * 2)
        self.assertEqual(
            shapes[prefix + "self_attn.q_proj.lora_A.weight"], (8, 24)
        )
        self.assertEqual(
            shapes[prefix + "self_attn.q_proj.lora_B.weight"], (32, 8)
        )
        self.assertEqual(
            shapes[prefix + "mlp.down_proj.lora_A.weight"], (2, 40)
        )
        self.assertEqual(
            shapes[prefix + "mlp.down_proj.lora_B.weight"], (24, 2)
        )

    def test_no_lora(self):
        path = os.path.join(_tmp(self), "adapter")
        with self.assertRaisesRegex(ValueError, "no LoRA adapters"):
            export_peft(_small_backbone(), path)
        self.assertFalse(os.path.exists(path))

    def test_merged_adapters_are_refused(self):
        backbone = _small_backbone(rank=2)
        lora.merge(backbone)
        path = os.path.join(_tmp(self), "adapter")
        with self.assertRaisesRegex(ValueError, "lora.unmerge"):
            export_peft(backbone, path)
        self.assertFalse(os.path.exists(path))
        lora.unmerge(backbone)
        export_peft(backbone, path)
        self.assertTrue(os.path.isdir(path))

    def test_non_empty_folder_needs_overwrite(self):
        backbone = _small_backbone(rank=2)
        path = os.path.join(_tmp(self), "adapter")
        os.makedirs(path)
        with open(os.path.join(path, "old.txt"), "w") as f:
            f.write("keep")
        with self.assertRaisesRegex(ValueError, "overwrite=True"):
            export_peft(backbone, path)
        self.assertEqual(os.listdir(path), ["old.txt"])
        export_peft(backbone, path, overwrite=True)
        self.assertEqual(
            sorted(os.listdir(path)),
            ["adapter_config.json", "adapter_model.safetensors"],
        )
        # Nothing is left beside it by the staging.
        self.assertEqual(os.listdir(os.path.dirname(path)), ["adapter"])
