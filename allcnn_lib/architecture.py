"""What a network costs and what it sees: per-layer output shapes, parameters, multiply-accumulates
(MACs) and receptive fields; class maps.
Notebooks 01 (global average pooling) and 05 (architectures) are built on it.

- **Parameters**: ``layer.count_params()``, as ``model.summary()`` counts them.
- **MACs**: one forward pass for one image, ``Conv2D`` (``H_out W_out C_out k_h k_w C_in``) and
  ``Dense`` only. One MAC is two FLOPs; training costs about three forward passes, so training
  FLOPs per image ~= ``2 * 3 * MACs``.
- **Receptive field** ``r`` (Dumoulin & Visin 2016): ``r_out = r_in + (k - 1) j_in`` and
  ``j_out = j_in s`` for kernel side ``k`` and stride ``s``; the *jump* ``j`` is the distance in
  input pixels between neighbouring units, ``centre`` the input pixel at the centre of unit
  (0, 0)'s window. A global pooling is one window over the whole map.

The models must be chains (each layer feeding the next), as all networks of this course are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields

import keras
import numpy as np
import pandas as pd

#: The paper's parameter counts (Springenberg et al. 2014, Table 3, rounded there).
PAPER_TABLE3_PARAMS: dict[str, str] = {"modelc": "≈ 1.3 M", "strided": "≈ 1.3 M",
                                       "allcnn": "≈ 1.4 M"}

_KINDS = ((keras.layers.InputLayer, "input"), (keras.layers.Conv2D, "conv"),
          ((keras.layers.MaxPooling2D, keras.layers.AveragePooling2D), "pool"),
          ((keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D), "global pool"),
          (keras.layers.Dense, "dense"), (keras.layers.BatchNormalization, "batch norm"),
          (keras.layers.Dropout, "dropout"), (keras.layers.ReLU, "relu"),
          (keras.layers.Activation, "activation"), (keras.layers.Flatten, "flatten"))
#: Kinds ``layer_table(..., layers="main")`` keeps: layers with weights or a new spatial size.
MAIN_KINDS = ("conv", "pool", "dense", "global pool")


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``layer_table`` (``receptive_field``, ``jump``, ``centre`` in input pixels)."""

    layer: str
    kind: str
    output_shape: tuple[int, ...]
    parameters: int
    macs: int
    kernel: int
    stride: int
    receptive_field: int
    jump: int
    centre: float


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape[1:])


def _square(value, what: str, layer: keras.layers.Layer) -> int:
    values = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(set(values)) != 1:
        raise ValueError(f"layer {layer.name!r}: only square {what}s are supported, got {values}")
    return int(values[0])


def layer_macs(layer: keras.layers.Layer) -> int:
    """Multiply-accumulates of ``layer`` for one input (Conv2D and Dense; 0 for the rest)."""
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        groups = int(getattr(layer, "groups", 1) or 1)
        return math.prod(_shape(layer.output)) * kh * kw * _shape(layer.input)[-1] // groups
    if isinstance(layer, keras.layers.Dense):
        in_shape = _shape(layer.input)
        return math.prod(in_shape[:-1]) * in_shape[-1] * int(layer.units)
    return 0


def layer_info(model: keras.Model) -> list[LayerInfo]:
    """One ``LayerInfo`` per layer of the chain ``model``, in forward order (input first)."""
    rows: list[LayerInfo] = []
    rf, jump, centre, side = 1, 1, 0.0, 1  # side: of the last 3-D output (kept by a Flatten)
    layers = list(model.layers)
    for previous, layer in zip([None, *layers], layers, strict=False):
        if previous is not None and layer.input is not previous.output:
            raise ValueError(f"model {model.name!r} is not a chain: {layer.name!r} does not "
                             f"take the output of {previous.name!r}")
        kind = next((k for t, k in _KINDS if isinstance(layer, t)), type(layer).__name__.lower())
        in_shape = _shape(layer.input) if kind != "input" else ()
        kernel, stride, pad = 1, 1, 0
        if kind in ("conv", "pool"):
            size = layer.kernel_size if kind == "conv" else layer.pool_size
            dilation = _square(layer.dilation_rate, "dilation", layer) if kind == "conv" else 1
            kernel = dilation * (_square(size, "kernel", layer) - 1) + 1
            stride = _square(layer.strides, "stride", layer)
            if layer.padding == "same":  # TensorFlow pads the smaller half before
                n = in_shape[0]
                pad = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0) // 2
        elif kind == "global pool" or (kind == "dense" and len(in_shape) == 1):
            kernel = stride = in_shape[0] if kind == "global pool" else side
        centre += ((kernel - 1) / 2 - pad) * jump
        rf += (kernel - 1) * jump
        jump *= stride
        stride = 1 if kind not in ("conv", "pool") else stride
        out_shape = _shape(layer.output)
        side = out_shape[0] if len(out_shape) == 3 else (side if kind == "flatten" else 1)
        rows.append(LayerInfo(layer.name, kind, out_shape, int(layer.count_params()),
                              layer_macs(layer), kernel, stride, rf, jump, float(centre)))
    return rows


def layer_table(model: keras.Model, *, layers: str = "main") -> pd.DataFrame:
    """``layer_info`` as a table indexed by layer name. ``layers="main"`` keeps ``MAIN_KINDS``;
    ``"all"`` keeps every layer (ReLU, dropout and the input included)."""
    if layers not in ("main", "all"):
        raise ValueError(f"layers must be 'main' or 'all', got {layers!r}")
    rows = [r for r in layer_info(model) if layers == "all" or r.kind in MAIN_KINDS]
    table = pd.DataFrame([astuple(r) for r in rows], columns=[f.name for f in fields(LayerInfo)])
    table = table.set_index("layer")
    table.attrs["model"] = model.name
    return table


def receptive_fields(model: keras.Model) -> dict[str, int]:
    """Receptive field side (input pixels) of every layer's output units, by layer name."""
    return {r.layer: r.receptive_field for r in layer_info(model)}


def total_macs(model: keras.Model) -> int:
    """Forward multiply-accumulates of ``model`` for one image (Conv2D and Dense layers)."""
    return sum(layer_macs(layer) for layer in model.layers)


def architecture_summary(models: Mapping[str, keras.Model], *,
                         last_conv: str = "conv9") -> pd.DataFrame:
    """One row per model (label -> model): parameters, forward MACs (millions), training GFLOP
    per image, receptive field of ``last_conv`` and the size of the averaged class map."""
    rows = []
    for label, model in models.items():
        conv = next(r for r in layer_info(model) if r.layer == last_conv)
        macs = total_macs(model)
        rows.append({"network": label, "parameters": int(model.count_params()),
                     "forward MMAC": round(macs / 1e6, 1),
                     "training GFLOP": round(6 * macs / 1e9, 2),
                     f"{last_conv} receptive field (px)": conv.receptive_field,
                     "class map": "x".join(map(str, conv.output_shape[:2]))})
    return pd.DataFrame(rows).set_index("network")


def variant_differences(first: keras.Model, second: keras.Model, *,
                        labels: tuple[str, str] = ("paper", "seed")) -> pd.DataFrame:
    """The layers in which two builds of one network differ (present in one only, or another
    output shape, parameter or MAC count), with each build's values; ``"absent"`` where a
    build lacks the layer."""
    a = {r.layer: r for r in layer_info(first)}
    b = {r.layer: r for r in layer_info(second)}
    columns = {"output": "output_shape", "parameters": "parameters", "MACs": "macs"}
    rows = []
    for name in list(a) + [n for n in b if n not in a]:
        pair = (a.get(name), b.get(name))
        values = {f"{label} {what}": getattr(r, field) if r else "absent"
                  for what, field in columns.items() for label, r in zip(labels, pair, strict=True)}
        if None in pair or any(values[f"{labels[0]} {w}"] != values[f"{labels[1]} {w}"]
                               for w in columns):
            rows.append({"layer": name, "kind": (pair[0] or pair[1]).kind, **values})
    heads = ["layer", "kind"] + [f"{label} {w}" for w in columns for label in labels]
    return pd.DataFrame(rows, columns=heads).set_index("layer")


# --------------------------------------------------------------------------- class maps


def class_maps(model: keras.Model, images: np.ndarray, *, layer: str = "relu9",
               batch_size: int = 256) -> np.ndarray:
    """The output of ``layer`` (default relu9: one map per class, whose spatial mean is the
    class score before the softmax) for preprocessed ``images``, float32 ``(N, h, w, C)``."""
    probe = keras.Model(model.input, model.get_layer(layer).output)
    images = np.asarray(images)
    parts = [keras.ops.convert_to_numpy(probe(images[i:i + batch_size], training=False))
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def upsample_maps(maps: np.ndarray, size: int | tuple[int, int] = 32) -> np.ndarray:
    """Bilinear resize of ``(N, h, w, C)`` or ``(h, w, C)`` maps to ``size`` pixels, as the
    class activation maps of Zhou et al. (2016) are brought to the image's size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    out = keras.ops.image.resize(np.asarray(maps, np.float32), size, interpolation="bilinear",
                                 antialias=False)
    return np.asarray(keras.ops.convert_to_numpy(out), np.float32)
