"""Gemma 2 layers."""

from keras_gemma2.layers.attention import Gemma2Attention
from keras_gemma2.layers.decoder_block import Gemma2DecoderBlock
from keras_gemma2.layers.einsum_dense import Gemma2EinsumDense
from keras_gemma2.layers.embedding import Gemma2Embedding
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization
