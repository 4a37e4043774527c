"""keras_gemma2: Gemma 2 in Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_gemma2 import architectures
from keras_gemma2 import callbacks
from keras_gemma2 import data
from keras_gemma2 import layers
from keras_gemma2 import lora
from keras_gemma2 import merging
from keras_gemma2 import presets
from keras_gemma2 import rag
from keras_gemma2.backbone import Gemma2Backbone
from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.causal_lm_preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.chat import format_chat
from keras_gemma2.distillation import Gemma2Distiller
from keras_gemma2.layers.attention import Gemma2Attention
from keras_gemma2.layers.decoder_block import Gemma2DecoderBlock
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization
from keras_gemma2.tokenizer import Gemma2Tokenizer

__version__ = "0.1.0"
