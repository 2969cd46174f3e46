"""Looking inside a network (a chain of layers, as every network of this course): layer tables,
class maps, activation statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd
from keras import ops

_KINDS = ((keras.layers.InputLayer, "input"), (keras.layers.Conv2D, "conv"),
          ((keras.layers.MaxPooling2D, keras.layers.AveragePooling2D), "pool"),
          ((keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D), "global pool"),
          (keras.layers.Dense, "dense"), (keras.layers.BatchNormalization, "batch norm"))
#: Kinds ``layer_table`` keeps by default: layers with weights or a new spatial size.
MAIN_KINDS = ("conv", "pool", "dense", "global pool")
Layers = Sequence[str | keras.layers.Layer] | None


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape[1:])


def layer_macs(layer: keras.layers.Layer) -> int:
    """Multiply-accumulates of ``layer`` for one input (Conv2D and Dense; 0 for the rest)."""
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        return math.prod(_shape(layer.output)) * kh * kw * _shape(layer.input)[-1] // layer.groups
    if isinstance(layer, keras.layers.Dense):
        return math.prod(_shape(layer.input)) * int(layer.units)
    return 0


def total_macs(model: keras.Model) -> int:
    """Forward multiply-accumulates of ``model`` for one image (Conv2D and Dense layers)."""
    return sum(layer_macs(layer) for layer in model.layers)


def layer_table(model: keras.Model, *, all_layers: bool = False) -> pd.DataFrame:
    """One row per layer (of ``MAIN_KINDS`` unless ``all_layers``): kind, output shape,
    parameters, forward MACs for one image, kernel, stride and, in input pixels, receptive
    field ``r_out = r_in + (k - 1) j_in``, jump ``j_out = j_in s`` (between neighbouring units)
    and the centre of unit (0, 0)'s window (Dumoulin & Visin 2016)."""
    rows, layers = [], list(model.layers)
    rf, jump, centre, side = 1, 1, 0.0, 1  # side: of the last 3-D output (kept by a Flatten)
    for previous, layer in zip([None, *layers], layers, strict=False):
        if previous is not None and layer.input is not previous.output:
            raise ValueError(f"model {model.name!r} is not a chain: {layer.name!r} does not "
                             f"take the output of {previous.name!r}")
        kind = next((k for t, k in _KINDS if isinstance(layer, t)), type(layer).__name__.lower())
        in_shape = _shape(layer.input) if kind != "input" else ()
        kernel, stride, pad = 1, 1, 0
        if kind in ("conv", "pool"):  # square kernels and strides
            dilation = layer.dilation_rate[0] if kind == "conv" else 1
            size = layer.kernel_size if kind == "conv" else layer.pool_size
            kernel, stride = dilation * (size[0] - 1) + 1, layer.strides[0]
            if layer.padding == "same":  # TensorFlow pads the smaller half before
                n = in_shape[0]
                pad = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0) // 2
        elif kind == "global pool" or (kind == "dense" and len(in_shape) == 1):
            kernel = stride = in_shape[0] if kind == "global pool" else side  # the whole map
        centre += ((kernel - 1) / 2 - pad) * jump
        rf += (kernel - 1) * jump
        jump *= stride
        out_shape = _shape(layer.output)
        side = out_shape[0] if len(out_shape) == 3 else (side if kind == "flatten" else 1)
        rows.append({"layer": layer.name, "kind": kind, "output_shape": out_shape,
                     "parameters": int(layer.count_params()), "macs": layer_macs(layer),
                     "kernel": kernel, "stride": stride if kind in ("conv", "pool") else 1,
                     "receptive_field": rf, "jump": jump, "centre": float(centre)})
    rows = [row for row in rows if all_layers or row["kind"] in MAIN_KINDS]
    return pd.DataFrame(rows).set_index("layer")


# --------------------------------------------------------------------------- activations


def class_maps(model: keras.Model, images: np.ndarray, *, layer: str = "relu9") -> np.ndarray:
    """The output of ``layer`` on ``images`` in inference mode, float32; by default relu9's
    class maps, whose spatial means are the class scores before the softmax."""
    probe = keras.Model(model.input, model.get_layer(layer).output)
    images = np.asarray(images, np.float32)
    parts = [ops.convert_to_numpy(probe(images[i:i + 256], training=False))
             for i in range(0, len(images), 256)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def upsample_maps(maps: np.ndarray, size: int = 32) -> np.ndarray:
    """Bilinear resize of ``(N, h, w, C)`` or ``(h, w, C)`` maps to ``size`` pixels square, as
    the class activation maps of Zhou et al. (2016) are brought to the image's size."""
    out = ops.image.resize(np.asarray(maps, np.float32), (size, size), interpolation="bilinear")
    return np.asarray(ops.convert_to_numpy(out), np.float32)


def linear_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The ``Dense`` and ``Conv2D`` layers in forward order (their outputs: pre-activations)."""
    return [la for la in model.layers if isinstance(la, keras.layers.Dense | keras.layers.Conv2D)]


def _select(model: keras.Model, layers: Layers) -> list[keras.layers.Layer]:
    return linear_layers(model) if layers is None else [
        model.get_layer(la) if isinstance(la, str) else la for la in layers]


def activation_statistics(model: keras.Model, images, layers: Layers = None, *,
                          training: bool = False) -> pd.DataFrame:
    """Per layer (default: every ReLU), over ``images``: the outputs' mean and std, the
    fraction that is zero, and the fraction of channels that are zero for every image at every
    position (dead channels). ``training=True`` measures what training sees (batch statistics,
    dropout) and leaves the moving statistics unchanged."""
    chosen = [la for la in model.layers if isinstance(la, keras.layers.ReLU)] \
        if layers is None else _select(model, layers)
    probe = keras.Model(model.input, [layer.output for layer in chosen])
    saved = [ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    outputs = probe(images, training=training)
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    for variable, value in zip(model.non_trainable_variables, saved, strict=True):
        variable.assign(value)  # a training-mode call moves the moving statistics
    rows = {}
    for layer, out in zip(chosen, outputs, strict=True):
        out = np.asarray(ops.convert_to_numpy(out), np.float64)
        rows[layer.name] = {"mean": out.mean(), "std": out.std(),
                            "zero fraction": np.mean(out == 0),
                            "dead channels": np.mean(out.reshape(-1, out.shape[-1]).max(0) <= 0)}
    return pd.DataFrame(rows).T


def activation_stats(model: keras.Model, batch, layers: Layers = None) -> dict[str, float]:
    """The std of each layer's output on ``batch``, in forward order; by default of
    ``linear_layers(model)``: the pre-activations ``y_l`` of He et al."""
    stds = activation_statistics(model, batch, _select(model, layers))["std"]
    return {name: float(value) for name, value in stds.items()}


