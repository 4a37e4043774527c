"""Sharding Gemma 2 over a device mesh, and how many devices each size needs.

The sharding plan lives in `keras_gemma2.sharding`, the parameter and
memory estimates in `keras_gemma2.memory`; this module gathers their public
names, where the README and the notebooks import them from.
"""

from keras_gemma2.memory import abstract_parameter_count
from keras_gemma2.memory import device_table
from keras_gemma2.memory import devices_needed
from keras_gemma2.memory import kv_cache_bytes
from keras_gemma2.memory import kv_cache_table
from keras_gemma2.memory import memory_bytes
from keras_gemma2.sharding import Gemma2LayoutMap
from keras_gemma2.sharding import get_layout_map
from keras_gemma2.sharding import kv_cache_layout
from keras_gemma2.sharding import plan_layouts

__all__ = [
    "Gemma2LayoutMap",
    "abstract_parameter_count",
    "device_table",
    "devices_needed",
    "get_layout_map",
    "kv_cache_bytes",
    "kv_cache_layout",
    "kv_cache_table",
    "memory_bytes",
    "plan_layouts",
]
