"""Sharding Gemma 2 over a device mesh: which axis of each weight to split.

Layout legend (our kernels): v vocabulary, d hidden_dim, n query heads,
k key/value heads, h head_dim, f FFN width of one gate, r LoRA rank.
"""

import re
import sys

import keras

from keras_gemma2.architectures import ARCHITECTURES
from keras_gemma2.architectures import axis_sizes

# Each weight's candidate placements of the model axis, best first: the
# first whose sharded dimension the model axis divides is used. Heads first
# (no communication inside attention), then head_dim, then the model width.
# fmt: off
_CANDIDATES = (
    ("token_embedding/embeddings", ("v", "d"), ((0,), (1,))),
    ("attention/query/kernel", ("n", "d", "h"), ((0,), (2,), (1,))),
    ("attention/key/kernel", ("k", "d", "h"), ((0,), (2,), (1,))),
    ("attention/value/kernel", ("k", "d", "h"), ((0,), (2,), (1,))),
    ("attention/attention_output/kernel", ("n", "h", "d"),
     ((0,), (1,), (2,))),
    ("ffw_gating/kernel", ("d", "f"), ((1,), (0,))),
    ("ffw_gating_2/kernel", ("d", "f"), ((1,), (0,))),
    ("ffw_linear/kernel", ("f", "d"), ((0,), (1,))),
)
# fmt: on
# Every RMSNorm scale is replicated; so are the LoRA adapters
# `.../lora_kernel_a|b`, which no pattern matches (Keras replicates those).
_REPLICATED = r".*(norm|normalization)/scale$"
# How many callers up `_variable_being_placed` looks for the variable.
_CALLER_DEPTH = 4


def _regex(pattern):
    # Anchored to the end of the path: `query/kernel` must not match
    # `query/lora_kernel_a`.
    return ".*" + pattern + "$"


# regex of a weight's path -> (pattern, axes, candidates)
_RULES = {_regex(c[0]): c for c in _CANDIDATES}


def _sharded_axis(name, pattern, shapes, model_axis_size):
    """The first candidate axis of `pattern` that divides in all `shapes`."""
    _, axes, candidates = _RULES[_regex(pattern)]
    if model_axis_size == 1:
        return None
    for (axis,) in candidates:
        if all(
            axis < len(shape) and shape[axis] % model_axis_size == 0
            for shape in shapes
        ):
            return axis
    sizes = (
        f"shape {shapes[0]}"
        if len(shapes) == 1
        else f"sizes {sorted({size for shape in shapes for size in shape})}"
    )
    raise ValueError(
        f"The model axis has {model_axis_size} devices, which divides "
        f"no dimension of {name} (axes {axes}, {sizes}). "
        "Use a model axis size that divides one of them."
    )


def plan_layouts(architecture, model_axis_size):
    """Our variable path pattern -> which axis of it the model axis shards.

    `architecture` is one kwargs dict or a list of them (a plan valid for
    all). Returns `{pattern: (axes, sharded_axis_or_None)}`; raises a
    ValueError naming the weight and sizes when no axis can be divided.
    `Gemma2LayoutMap` makes the same choice from each variable's shape.
    """
    architectures = (
        [architecture] if isinstance(architecture, dict) else architecture
    )
    all_sizes = [axis_sizes(a) for a in architectures]
    plan = {}
    for pattern, axes, _ in _CANDIDATES:
        shapes = [tuple(s[a] for a in axes) for s in all_sizes]
        axis = _sharded_axis(pattern, pattern, shapes, model_axis_size)
        plan[pattern] = (axes, axis)
    return plan


def _variable_being_placed(path):
    """The variable whose layout Keras is looking up by `path`, if any."""
    # Keras 3.15's `ModelParallel.get_variable_layout(variable)` asks the
    # map for `variable.path` only, and the shape is not in the path: the
    # variable itself is a local of that caller (or of one a few above).
    frame = sys._getframe(2)  # 0: here, 1: the map's lookup, 2: its caller
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        for value in frame.f_locals.values():
            if isinstance(value, keras.Variable) and value.path == path:
                return value
        frame = frame.f_back
    return None


class Gemma2LayoutMap(keras.distribution.LayoutMap):
    """A `LayoutMap` that shards each Gemma 2 weight by its own shape.

    When Keras creates a variable under `ModelParallel`, it asks the map for
    the variable's path; this map finds the variable, so its shape, and
    shards the first candidate axis that the model axis divides: heads, then
    head_dim, then the model width (the FFN by its width, the embedding by
    vocabulary, then width). So one map serves every size, released or not.
    A weight with no divisible axis raises a ValueError naming its path and
    sizes as it is created. A lookup by path alone, with no variable in
    sight, uses `architecture`'s sizes, or failing that one layout valid for
    2B, 9B and 27B alike. Build it with `get_layout_map`.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: string. The mesh axis that shards weights.
        architecture: dict or None. `Gemma2Backbone` kwargs for lookups by
            path alone. Defaults to None.

    Example:
    ```python
    from keras_gemma2.distribution import Gemma2LayoutMap
    # Planning only: the layouts never touch the (named) devices.
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)]
    )
    layout_map = Gemma2LayoutMap(mesh)
    # 2 key/value heads on 4 devices: head_dim 8 is sharded instead.
    layout = layout_map.layout_for("block/attention/key/kernel", (2, 24, 8))
    assert layout.axes == (None, None, "model")
    ```
    """

    def __init__(
        self, device_mesh, model_parallel_dim_name="model", architecture=None
    ):
        super().__init__(device_mesh)
        names = device_mesh.axis_names
        if model_parallel_dim_name not in names:
            raise ValueError(
                f"The device mesh has axes {tuple(names)}, not "
                f"{model_parallel_dim_name!r}; pass `model_parallel_dim_name`."
            )
        self.model_parallel_dim_name = model_parallel_dim_name
        self.model_axis_size = device_mesh.shape[
            names.index(model_parallel_dim_name)
        ]
        self.architecture = architecture
        self._layouts = {}  # axes -> TensorLayout, one per distinct layout
        self[_REPLICATED] = (None,)

    def layout_for(self, path, shape):
        """The `TensorLayout` of the weight at `path` with `shape`.

        None for a path that no Gemma 2 weight pattern matches.
        """
        rule = self._rule(path)
        if rule is None:
            return None
        shapes = [tuple(shape)]
        axis = _sharded_axis(path, rule[0], shapes, self.model_axis_size)
        return self._layout(axis, len(shape))

    def __getitem__(self, key):
        rule = self._rule(key)
        if rule is None:
            return super().__getitem__(key)
        variable = _variable_being_placed(key)
        if variable is not None:
            return self.layout_for(key, variable.shape)
        # By path alone there is no shape: plan from sizes instead.
        pattern, axes, _ = rule
        architectures = (
            [self.architecture]
            if self.architecture
            else list(ARCHITECTURES.values())
        )
        shapes = [tuple(axis_sizes(a)[x] for x in axes) for a in architectures]
        axis = _sharded_axis(key, pattern, shapes, self.model_axis_size)
        return self._layout(axis, len(axes))

    def __iter__(self):
        yield from _RULES
        yield from super().__iter__()

    def __len__(self):
        return len(_RULES) + super().__len__()

    def _rule(self, path):
        """The `_CANDIDATES` entry whose pattern matches `path`, or None."""
        if path in _RULES:  # the pattern itself, as `dict(layout_map)` asks
            return _RULES[path]
        matches = [r for r in _RULES if re.fullmatch(r, path)]
        if matches and any(re.fullmatch(p, path) for p in self._layout_map):
            raise ValueError(
                f"Path '{path}' matches both the Gemma 2 weight pattern "
                f"{matches[0]!r} and a pattern set on this LayoutMap."
            )
        return _RULES[matches[0]] if matches else None

    def _layout(self, axis, rank):
        """A `TensorLayout` sharding `axis` (None: replicated), cached."""
        axes = [None] * rank
        if axis is not None:
            axes[axis] = self.model_parallel_dim_name
        axes = tuple(axes)
        if axes not in self._layouts:
            self._layouts[axes] = keras.distribution.TensorLayout(
                axes, self.device_mesh
            )
        return self._layouts[axes]


def get_layout_map(
    architecture,
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `keras.distribution.LayoutMap` for Gemma 2 of any size.

    Shards along the mesh's model axis, choosing each weight's axis from
    that weight's own shape as Keras creates it (a `Gemma2LayoutMap`): the
    attention projections by heads, the feed-forward matrices by width, the
    embedding by vocabulary. Where the model axis does not divide the heads
    (the 27B's 16 key/value heads on 32 devices, or the tiny 2 on 4), the
    projection is sharded by head_dim instead, and failing that by the model
    width; where it divides no axis, creating the weight raises a ValueError
    naming it and the sizes (KerasHub's layout map raises `IndivisibleError`
    as soon as the key/value heads do not divide, keras-hub#1613). So one
    map serves the tiny preset, 2B, 9B, 27B and any custom size. Norms and
    LoRA adapters are replicated: they are small, and replicated adapters
    keep LoRA's optimizer state on every device. `kv_cache_layout` gives
    the matching cache layout.

    Args:
        architecture: dict, or None. `Gemma2Backbone` kwargs
            (`architectures.GEMMA2_9B`, `backbone.get_config()`). The
            layouts follow the variables' shapes either way; a dict also
            checks the mesh against it now, rather than as weights are
            created, and answers lookups by path alone. `None` answers
            those with one layout valid for 2B, 9B and 27B.
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: string. The mesh axis that shards weights.
        data_parallel_dim_name: string. The mesh axis that shards batches.

    Example:
    ```python
    from keras_gemma2.architectures import GEMMA2_27B
    from keras_gemma2.distribution import get_layout_map
    # Plan for 32 devices from here: a mesh of device names is enough.
    mesh = keras.distribution.DeviceMesh(
        (1, 32), ("batch", "model"), [f"gpu:{i}" for i in range(32)]
    )
    layout_map = get_layout_map(None, mesh)
    # The 27B's 32 query heads divide; its 16 key/value heads do not.
    query = (32, 4608, 128)
    key = (16, 4608, 128)
    assert layout_map.layout_for("attention/query/kernel", query).axes[0]
    assert layout_map.layout_for("attention/key/kernel", key).axes[2]
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(GEMMA2_27B, mesh), batch_dim_name="batch"
    )
    ```
    """
    _check_backend()
    names = device_mesh.axis_names
    for name in (model_parallel_dim_name, data_parallel_dim_name):
        if name not in names:
            raise ValueError(
                f"The device mesh has axes {tuple(names)}, not {name!r}; "
                "pass `model_parallel_dim_name`/`data_parallel_dim_name`."
            )
    if architecture is not None:
        model_size = device_mesh.shape[names.index(model_parallel_dim_name)]
        plan_layouts(architecture, model_size)  # raises if a weight cannot
    return Gemma2LayoutMap(
        device_mesh,
        model_parallel_dim_name=model_parallel_dim_name,
        architecture=architecture,
    )


def _check_backend():
    if keras.config.backend() == "torch":
        raise RuntimeError(
            "keras.distribution has no PyTorch implementation in Keras 3.15. "
            "Set KERAS_BACKEND=jax (or tensorflow) before importing Keras."
        )


def kv_cache_layout(
    architecture,
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """The layout of one layer's cached keys (or values), `[batch, length,
    k, h]`.

    Batch on the data axis; key/value heads on the model axis when it
    divides them, else head_dim, as the key/value projections.
    """
    _check_backend()
    names = device_mesh.axis_names
    model_size = device_mesh.shape[names.index(model_parallel_dim_name)]
    plan = plan_layouts(architecture, model_size)
    _, sharded = plan["attention/key/kernel"]
    layout = [data_parallel_dim_name, None, None, None]
    if sharded == 0:
        layout[2] = model_parallel_dim_name
    elif sharded == 2:
        layout[3] = model_parallel_dim_name
    return keras.distribution.TensorLayout(tuple(layout), device_mesh)
