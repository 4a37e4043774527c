"""WARP model merging: an EMA anchor, SLERP of task vectors, LITI.

WARP (Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged
Rewarded Policies") fine-tunes several policies from one initialisation
`init` and merges them in three stages:

1. `EMAAnchor`: an exponential moving average of the weights during
   fine-tuning (WARP uses it as the KL anchor of RL fine-tuning).
2. `slerp(init, fine_tuned, t)`: the task vectors `delta_i = theta_i -
   theta_init` are merged along the sphere, tensor by tensor:
   `slerp(d1, d2, t) = sin((1 - t) W) / sin(W) d1 + sin(t W) / sin(W) d2`,
   where `W` is the angle between the flattened `d1` and `d2`; the merged
   model is `theta_init + slerp(...)`.
3. `liti(init, merged, eta) = (1 - eta) theta_init + eta theta_merged`:
   linear interpolation towards the initialisation.

`warp(init, fine_tuned, t, eta)` chains 2 and 3 in one pass over the
weights. For WARP's iterated rounds, the result of one round is the `init`
of the next.

Every function takes (all of one kind):

- Keras models (`Gemma2Backbone` or `Gemma2CausalLM`), matched by weight
  path. LoRA models are merged through their effective kernels (`base +
  alpha / rank * a @ b`, whether `lora.merge`-d or not); the adapter
  matrices themselves are not merged (products of averaged adapters are
  not averaged products). The result is a plain model without LoRA.
  Quantized (int8) models are refused.
- Preset folders (or registered local preset names) saved by this
  package: the weights are streamed tensor by tensor from
  `*.weights.h5`, so only a few tensors are in memory at a time (the
  base's, one fine-tuned model's, the running result), never a whole
  model, and the merged preset folder is written
  atomically (`output=`), with the other files (config, tokenizer) of the
  first argument. Presets saved from LoRA models already hold effective
  kernels.
- Dicts `{name: NumPy array}`, merged into a dict.

```python
init = keras_gemma2.Gemma2Backbone.from_preset("gemma2_tiny_en")
# ... fine-tune copies of init into policy_1 and policy_2 ...
merged = keras_gemma2.merging.warp(init, [policy_1, policy_2], eta=0.5)
```

The package: `anchor` (the EMA callback), `merge` (SLERP, LITI, WARP and
their per-tensor arithmetic), `sources` (models, preset folders and dicts
as tensor sources, and the writers of a merged model or preset).
"""

from keras_gemma2.merging.anchor import EMAAnchor
from keras_gemma2.merging.merge import liti
from keras_gemma2.merging.merge import slerp
from keras_gemma2.merging.merge import warp

__all__ = ["EMAAnchor", "liti", "slerp", "warp"]
