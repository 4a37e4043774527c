"""Gemma2CausalLMPreprocessor: strings -> `<bos>` ids, padding mask, labels."""

import keras
from keras_hub.models import CausalLMPreprocessor

from keras_gemma2 import presets as presets_lib
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.tokenizer import Gemma2Tokenizer


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLMPreprocessor(
    presets_lib.RegisteredPresetsMixin, CausalLMPreprocessor
):
    """Tokenizes, adds `<bos>`/`<eos>`, pads, and shifts labels for `fit`.

    For training, `x` strings become `({"token_ids", "padding_mask"}, labels,
    sample_weight)`, where labels are the ids shifted left by one. For
    generation, `generate_preprocess` adds `<bos>` but no `<eos>`.

    Args:
        tokenizer: a `Gemma2Tokenizer`.
        sequence_length: int. Padded length. Defaults to `1024`.
        add_start_token: bool. Prepend `<bos>`. Defaults to `True`.
        add_end_token: bool. Append `<eos>` for training. Defaults to `True`.

    Example:
    ```python
    preprocessor = keras_gemma2.Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_en", sequence_length=16
    )
    x, y, sample_weight = preprocessor(["The tokenizer splits text."])
    ```
    """

    backbone_cls = Gemma2Backbone
    tokenizer_cls = Gemma2Tokenizer
    _preset_takes_dtype = False
