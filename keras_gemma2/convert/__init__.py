"""Converters between keras_gemma2 and the other Gemma 2 formats."""
