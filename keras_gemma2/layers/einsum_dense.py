"""Gemma2EinsumDense: Keras' `EinsumDense` with int8 products that run on a
PyTorch CPU.

Upstream gap (Keras 3.15, torch backend):
- `ops.einsum` and `ops.matmul` on two int8 tensors cast both to int32 and
  run `torch.einsum` / `torch.matmul`, which have no integer BLAS kernel on
  CPU; `torch._int_mm` is used only on CUDA. A LoRA step on an int8 base of
  the benchmark's small config took 16x a float32 step
  (`benchmarks/finetune_memory.py`). `torch._int_mm` has a CPU kernel
  (oneDNN) and gives the same int32 sums, so the outputs are unchanged.
- The weight-only int8 path (`Int8QuantizationConfig(activation_quantizer=
  None)`) rebinds `kernel_scale` to its dequantization shape in the forward
  pass, and its gradient function then adjusts it a second time: a wrong
  input gradient, so LoRA on a weight-only int8 base did not train.

Everything else (quantizing, saving, LoRA, the other backends) is Keras'
own.
"""

import keras
from keras import ops

from keras_gemma2.layers import direct


class DeletesWithoutCollecting:
    """Drops a variable attribute without Keras' `gc.collect()`.

    Keras' `Layer.__delattr__` runs a full `gc.collect()` for every
    variable it drops, which quantizing does once per matrix: 43 of them
    took 10 s for the tiny preset in a test process, and a 27B has 322.
    Layers with this mixin leave the collection to whoever quantizes
    (`Gemma2Backbone.quantize` and quantizing while loading collect once),
    without replacing `gc.collect` for the whole process.
    """

    def __delattr__(self, name):
        value = getattr(self, name, None)
        if isinstance(value, keras.Variable):
            self._untrack_variable(value)
            # `Layer.__delattr__` minus its collection: what it calls next.
            super(keras.layers.Layer, self).__delattr__(name)
        else:
            super().__delattr__(name)


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2EinsumDense(DeletesWithoutCollecting, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose int8 call is fast on PyTorch.

    Same arguments, variables and outputs as Keras' layer; see the module
    docstring for what differs on PyTorch.

    Example:
    ```python
    dense = keras_gemma2.layers.Gemma2EinsumDense(
        "btd,df->btf", output_shape=(None, 32)
    )
    dense.build((1, 4, 16))
    dense.quantize("int8")
    y = dense(np.random.rand(1, 4, 16).astype("float32"))
    ```
    """

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses (`type(self) is not EinsumDense`) because
        # their `call` may differ; ours only changes how int8 products run.
        super().quantize(mode, type_check=False, config=config)

    def _int8_call(self, inputs, training=None):
        spec = direct.product_spec(self)
        if keras.config.backend() != "torch" or spec is None:
            return super()._int8_call(inputs, training=training)
        _, in_size, out_shape, batch_rank = spec
        # `[out, in]`: a view of the kernel in `direct`'s torch layout.
        kernel_2d = direct.kernel_2d(self)
        out_size = kernel_2d.shape[0]
        kernel_scale = ops.convert_to_tensor(self.kernel_scale)
        layer = self

        @ops.custom_gradient
        def product(inputs, kernel, kernel_scale):
            def dequantized():
                scale = ops.reshape(kernel_scale, (-1, 1))
                return ops.cast(kernel, layer.compute_dtype) / ops.cast(
                    scale, layer.compute_dtype
                )

            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                grad = ops.matmul(
                    ops.reshape(upstream, (-1, out_size)), dequantized()
                )
                return (ops.reshape(grad, ops.shape(inputs)), None, None)

            batch = ops.shape(inputs)[:batch_rank]
            if layer.inputs_quantizer:
                quantized, inputs_scale = layer.inputs_quantizer(
                    inputs, axis=layer.quantization_axis
                )
                inputs_scale = layer._adjust_scale_for_quant(
                    inputs_scale, "input"
                )
                x = int8_matmul(ops.reshape(quantized, (-1, in_size)), kernel)
                x = ops.reshape(x, (*batch, *out_shape))
                x = ops.cast(x, layer.compute_dtype)
                # Keras' `kernel_scale` is already shaped `[1, 1, *out]`.
                x = ops.divide(
                    x,
                    ops.multiply(
                        inputs_scale, ops.reshape(kernel_scale, out_shape)
                    ),
                )
            else:
                x = ops.matmul(
                    ops.reshape(inputs, (-1, in_size)),
                    ops.transpose(dequantized()),
                )
                x = ops.reshape(x, (*batch, *out_shape))
            return x, grad_fn

        x = product(inputs, kernel_2d, kernel_scale)
        if self.lora_enabled:
            lora_x = ops.einsum(self.equation, inputs, self.lora_kernel_a)
            lora_x = ops.matmul(lora_x, self.lora_kernel_b)
            x = ops.add(x, (self.lora_alpha / self.lora_rank) * lora_x)
            x = ops.cast(x, dtype=self.compute_dtype)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


def int8_matmul(x, weight):
    """`x @ weight.T` in exact int32, for int8 `x` `[rows, in]` and int8
    `weight` `[out, in]`, through `torch._int_mm` (PyTorch only)."""
    # torch: an optional dependency, imported on its backend only
    import torch

    x = ops.convert_to_tensor(x)
    weight = ops.convert_to_tensor(weight)
    return torch._int_mm(x.contiguous(), weight.t())
