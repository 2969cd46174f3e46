"""What a network costs and what it sees: per-layer output shapes, parameters, multiply-accumulates
(MACs) and receptive fields of the Keras models in ``allcnn_lib.models``; fully connected versus
global-average-pooling classifier heads; class activation maps. Notebooks 01 (global average
pooling) and 05 (architectures) are built on it.

Definitions used throughout:

- **Parameters**: ``layer.count_params()``, trainable or not (batch norm's moving mean and
  variance count), the number Keras' ``model.summary()`` prints.
- **MACs**: the multiply-accumulates of one forward pass for one image, counted for ``Conv2D``
  (``H_out * W_out * C_out * k_h * k_w * C_in / groups``) and ``Dense`` layers only. Bias
  additions, activations, batch norm, pooling and the global average are left out (they are a
  fraction of a percent here). One MAC is two floating-point operations (FLOPs); training costs
  about three forward passes (forward, gradient with respect to the activations, gradient with
  respect to the weights), so ``training FLOPs per image ~= 2 * 3 * MACs``.
- **Receptive field**: the side, in input pixels, of the square window that one unit of a
  layer's output can see, with the standard recursion (Dumoulin & Visin 2016, Araujo et al.
  2019) ``r_out = r_in + (k - 1) * j_in`` and ``j_out = j_in * s``, where ``k`` is the kernel
  side, ``s`` the stride and ``j`` the *jump*, the distance in input pixels between two
  neighbouring units of the layer. Padding does not change ``r``; it shifts the window, which
  ``centre`` tracks: the input pixel (from 0) at the centre of the window of unit (0, 0). The
  global average pooling is treated as one window over the whole map, so its receptive field can
  exceed the image (the part outside is zero padding): it sees every pixel.

The models must be chains (each layer feeding the next), as all networks of this course are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields

import keras
import numpy as np
import pandas as pd

__all__ = [
    "LayerInfo", "layer_info", "layer_table", "receptive_fields", "layer_macs", "total_macs",
    "architecture_summary", "variant_differences", "fc_head_params", "gap_head_params",
    "build_head", "HEADS", "PAPER_TABLE3_PARAMS", "head_comparison", "class_maps",
    "upsample_maps",
    "plot_layer_costs", "plot_receptive_fields", "plot_class_maps", "plot_cams",
]

#: The paper's parameter counts (Springenberg et al. 2014, Table 3, rounded there).
PAPER_TABLE3_PARAMS: dict[str, str] = {
    "modelc": "≈ 1.3 M",
    "strided": "≈ 1.3 M",
    "allcnn": "≈ 1.4 M",
}

#: Layer kinds kept by ``layer_table(..., layers="main")``: the layers that have weights or
#: change the spatial size.
MAIN_KINDS = ("conv", "pool", "dense", "global pool")

_POOLS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
_GLOBAL_POOLS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


# --------------------------------------------------------------------------- per-layer counts


@dataclass(frozen=True)
class LayerInfo:
    """One layer's row of ``layer_table``; ``receptive_field``, ``jump`` and ``centre`` are in
    input pixels, ``output_shape`` leaves out the batch axis."""

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


def _kind(layer: keras.layers.Layer) -> str:
    if isinstance(layer, keras.layers.InputLayer):
        return "input"
    if isinstance(layer, keras.layers.Conv2D):
        return "conv"
    if isinstance(layer, _POOLS):
        return "pool"
    if isinstance(layer, _GLOBAL_POOLS):
        return "global pool"
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch norm"
    if isinstance(layer, keras.layers.Dropout):
        return "dropout"
    if isinstance(layer, keras.layers.ReLU):
        return "relu"
    if isinstance(layer, keras.layers.Activation):
        return "activation"
    if isinstance(layer, keras.layers.Flatten):
        return "flatten"
    return type(layer).__name__.lower()


def _square(value, what: str, layer: keras.layers.Layer) -> int:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(set(values)) != 1:
        raise ValueError(f"layer {layer.name!r}: only square {what}s are supported, got {values}")
    return int(values[0])


def _pad_before(size: int, kernel: int, stride: int, padding: str) -> int:
    """Padding added before the first row by TensorFlow/Keras ``"same"`` (the smaller half)."""
    if padding != "same":
        return 0
    out = math.ceil(size / stride)
    return max((out - 1) * stride + kernel - size, 0) // 2


def layer_macs(layer: keras.layers.Layer) -> int:
    """Multiply-accumulates of ``layer`` for one input (Conv2D and Dense; 0 for the rest)."""
    if isinstance(layer, keras.layers.Conv2D):
        out = _shape(layer.output)
        c_in = _shape(layer.input)[-1]
        kh, kw = layer.kernel_size
        groups = int(getattr(layer, "groups", 1) or 1)
        return int(np.prod(out)) * kh * kw * c_in // groups
    if isinstance(layer, keras.layers.Dense):
        in_shape = _shape(layer.input)
        positions = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 1
        return positions * in_shape[-1] * int(layer.units)
    return 0


def _chain(model: keras.Model) -> list[keras.layers.Layer]:
    layers = list(model.layers)
    for previous, layer in zip(layers, layers[1:], strict=False):
        if layer.input is not previous.output:
            raise ValueError(f"model {model.name!r} is not a chain: {layer.name!r} does not "
                             f"take the output of {previous.name!r}")
    return layers


def layer_info(model: keras.Model) -> list[LayerInfo]:
    """One ``LayerInfo`` per layer of ``model``, in forward order (the input layer first)."""
    rows: list[LayerInfo] = []
    rf, jump, centre = 1, 1, 0.0
    side = 1  # spatial side of the last 3-D output (a flattened map keeps it for the Dense)
    for layer in _chain(model):
        kind = _kind(layer)
        kernel, stride = 1, 1
        in_shape = _shape(layer.input) if kind != "input" else ()
        window = 0  # side of a window over the whole map (global pooling, FC after flatten)
        if kind in ("conv", "pool"):
            if kind == "conv":
                kernel = _square(layer.kernel_size, "kernel", layer)
                dilation = _square(layer.dilation_rate, "dilation", layer)
            else:
                kernel = _square(layer.pool_size, "pool size", layer)
                dilation = 1
            stride = _square(layer.strides, "stride", layer)
            kernel = dilation * (kernel - 1) + 1
            pad = _pad_before(in_shape[0], kernel, stride, layer.padding)
            centre += ((kernel - 1) / 2 - pad) * jump
            rf += (kernel - 1) * jump
            jump *= stride
        elif kind == "global pool":
            window = in_shape[0]
        elif kind == "dense" and len(in_shape) == 1:
            window = side
        if window > 1:
            kernel = window
            centre += (window - 1) / 2 * jump
            rf += (window - 1) * jump
            jump *= window
        out_shape = _shape(layer.output)
        side = out_shape[0] if len(out_shape) == 3 else (side if kind == "flatten" else 1)
        rows.append(LayerInfo(layer=layer.name, kind=kind, output_shape=out_shape,
                              parameters=int(layer.count_params()), macs=layer_macs(layer),
                              kernel=kernel, stride=stride, receptive_field=rf, jump=jump,
                              centre=float(centre)))
    return rows


def layer_table(model: keras.Model, *, layers: str = "main") -> pd.DataFrame:
    """A table of ``model``'s layers: output shape, parameters, MACs, kernel, stride, receptive
    field, jump and centre (see the module's docstring), indexed by layer name.

    ``layers="main"`` keeps the layers with weights or a new spatial size (conv, pooling, dense,
    global pooling); ``"all"`` keeps every layer, ReLU, dropout and the input included.
    """
    if layers not in ("main", "all"):
        raise ValueError(f"layers must be 'main' or 'all', got {layers!r}")
    rows = layer_info(model)
    if layers == "main":
        rows = [r for r in rows if r.kind in MAIN_KINDS]
    columns = [f.name for f in fields(LayerInfo)]
    table = pd.DataFrame([astuple(r) for r in rows], columns=columns).set_index("layer")
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
    """One row per model: parameters, forward MACs (millions), training GFLOP per image
    (``2 * 3 * MACs``), receptive field of ``last_conv`` and the size of the map that the global
    average pooling averages. ``models`` maps a row label to a model."""
    rows = []
    for label, model in models.items():
        info = {r.layer: r for r in layer_info(model)}
        macs = total_macs(model)
        conv = info[last_conv]
        rows.append({
            "network": label,
            "parameters": int(model.count_params()),
            "forward MMAC": round(macs / 1e6, 1),
            "training GFLOP": round(6 * macs / 1e9, 2),
            f"{last_conv} receptive field (px)": conv.receptive_field,
            "class map": "x".join(map(str, conv.output_shape[:2])),
        })
    return pd.DataFrame(rows).set_index("network")


def variant_differences(first: keras.Model, second: keras.Model, *,
                        labels: tuple[str, str] = ("paper", "seed")) -> pd.DataFrame:
    """The layers in which two builds of one network differ: present in only one of them, or
    with another output shape, parameter count or MAC count. One row per such layer (in the
    forward order of ``first``, then the layers only ``second`` has), with each build's output
    shape, parameters and MACs; ``"absent"`` where a build lacks the layer."""
    a = {r.layer: r for r in layer_info(first)}
    b = {r.layer: r for r in layer_info(second)}
    names = list(a) + [n for n in b if n not in a]
    rows = []
    for name in names:
        ra, rb = a.get(name), b.get(name)
        if ra and rb and (ra.output_shape, ra.parameters, ra.macs) == (
                rb.output_shape, rb.parameters, rb.macs):
            continue
        row: dict[str, object] = {"layer": name, "kind": (ra or rb).kind}
        for label, r in zip(labels, (ra, rb), strict=True):
            row[f"{label} output"] = r.output_shape if r else "absent"
        for label, r in zip(labels, (ra, rb), strict=True):
            row[f"{label} parameters"] = r.parameters if r else "absent"
        for label, r in zip(labels, (ra, rb), strict=True):
            row[f"{label} MACs"] = r.macs if r else "absent"
        rows.append(row)
    columns = ["layer", "kind"] + [f"{label} {what}" for what in ("output", "parameters", "MACs")
                                   for label in labels]
    return pd.DataFrame(rows, columns=columns).set_index("layer")


# --------------------------------------------------------------------------- classifier heads


def fc_head_params(input_shape: Sequence[int] = (6, 6, 192), hidden: Sequence[int] = (1024,),
                   num_classes: int = 10) -> int:
    """Parameters of a classic head: flatten ``input_shape``, fully connected layers of
    ``hidden`` units, then ``num_classes`` outputs (weights plus biases), counted by hand."""
    total, fan_in = 0, int(np.prod(input_shape))
    for units in (*hidden, num_classes):
        total += fan_in * units + units
        fan_in = units
    return total


def gap_head_params(input_shape: Sequence[int] = (6, 6, 192), hidden: Sequence[int] = (),
                    num_classes: int = 10) -> int:
    """Parameters of a Network-in-Network head: 1x1 convolutions with ``hidden`` filters, a 1x1
    convolution with ``num_classes`` filters, then global average pooling (no weights). Unlike
    ``fc_head_params`` it does not depend on the spatial size of ``input_shape``."""
    total, fan_in = 0, int(input_shape[-1])
    for filters in (*hidden, num_classes):
        total += fan_in * filters + filters
        fan_in = filters
    return total


#: The heads ``build_head`` knows, with the description ``head_comparison`` prints.
HEADS: dict[str, str] = {
    "fc1024": "flatten -> FC 1024 -> FC classes (classic)",
    "fc": "flatten -> FC classes",
    "nin": "1x1 conv classes -> GAP (Network in Network)",
    "allcnn": "1x1 conv 192 -> 1x1 conv classes -> GAP (All-CNN-C conv8, conv9)",
    "gap_fc": "GAP -> FC classes",
}


def build_head(kind: str, input_shape: Sequence[int] = (6, 6, 192),
               num_classes: int = 10) -> keras.Model:
    """A Keras model of classifier head ``kind`` (a key of ``HEADS``) on a feature map of
    ``input_shape``; it ends in class scores before the softmax."""
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = inputs
    if kind in ("fc1024", "fc"):
        x = keras.layers.Flatten(name="flatten")(x)
        if kind == "fc1024":
            x = keras.layers.Dense(1024, activation="relu", name="fc1")(x)
        x = keras.layers.Dense(num_classes, name="fc_out")(x)
    elif kind in ("nin", "allcnn"):
        if kind == "allcnn":
            x = keras.layers.Conv2D(192, 1, activation="relu", name="conv8")(x)
        x = keras.layers.Conv2D(num_classes, 1, activation="relu", name="conv9")(x)
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
    elif kind == "gap_fc":
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
        x = keras.layers.Dense(num_classes, name="fc_out")(x)
    else:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return keras.Model(inputs, x, name=f"head_{kind}")


def head_comparison(input_shape: Sequence[int] = (6, 6, 192), num_classes: int = 10,
                    heads: Sequence[str] = tuple(HEADS)) -> pd.DataFrame:
    """Parameters (counted by Keras on ``build_head``) and forward MACs of classifier heads on a
    feature map of ``input_shape``, one row per head."""
    rows = []
    for kind in heads:
        head = build_head(kind, input_shape, num_classes)
        rows.append({"head": HEADS[kind], "parameters": int(head.count_params()),
                     "MACs": total_macs(head)})
    return pd.DataFrame(rows).set_index("head")


# --------------------------------------------------------------------------- class maps


def class_maps(model: keras.Model, images: np.ndarray, *, layer: str = "relu9",
               batch_size: int = 256) -> np.ndarray:
    """The class maps that the global average pooling averages: the output of ``layer``
    (default relu9: one ``h x w`` map per class) for preprocessed ``images``, as float32
    ``(N, h, w, classes)``. Their spatial mean is the class score before the softmax."""
    probe = keras.Model(model.input, model.get_layer(layer).output, name=f"{model.name}_maps")
    images = np.asarray(images)
    # Direct (eager) calls in inference mode: no tf.function to trace for a few images.
    parts = [keras.ops.convert_to_numpy(probe(images[i:i + batch_size], training=False))
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def upsample_maps(maps: np.ndarray, size: int | tuple[int, int] = 32) -> np.ndarray:
    """Bilinear resize of ``(N, h, w, C)`` (or ``(h, w, C)``) maps to ``size`` pixels, as the
    class activation maps of Zhou et al. (2016) are brought to the image's size."""
    maps = np.asarray(maps, np.float32)
    single = maps.ndim == 3
    if single:
        maps = maps[None]
    size = (size, size) if isinstance(size, int) else tuple(size)
    out = keras.ops.image.resize(maps, size, interpolation="bilinear", antialias=False)
    out = np.asarray(keras.ops.convert_to_numpy(out), np.float32)
    return out[0] if single else out


# =========================================================================== figures
# Figure helpers for notebooks 01 and 05 (kept here, next to what they draw). Each returns the
# Figure, with a title and labelled axes.

#: The nine layer slots of Tables 1 and 2: All-CNN-C's conv3 and conv6 stand where Model-C pools.
LAYER_SLOTS: tuple[tuple[str, ...], ...] = (
    ("conv1",), ("conv2",), ("conv3", "pool1"), ("conv4",), ("conv5",), ("conv6", "pool2"),
    ("conv7",), ("conv8",), ("conv9",),
)


def _slot_labels() -> list[str]:
    return [" / ".join(slot) for slot in LAYER_SLOTS]


def _slot_values(table: pd.DataFrame, column: str) -> list[float]:
    values = []
    for slot in LAYER_SLOTS:
        names = [n for n in slot if n in table.index]
        values.append(float(table.loc[names[0], column]) if names else np.nan)
    return values


def plot_layer_costs(tables: Mapping[str, pd.DataFrame], *,
                     title: str = "Parameters and multiply-accumulates per layer"):
    """Grouped bars, one group per layer slot (conv1 ... conv9) and one bar per network:
    parameters (top) and forward MACs per image (bottom). ``tables``: label -> ``layer_table``.
    A missing bar means the network has no such layer (Strided-CNN-C has no conv3/conv6)."""
    import matplotlib.pyplot as plt

    labels = _slot_labels()
    x = np.arange(len(labels))
    width = 0.8 / max(len(tables), 1)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
    for i, (name, table) in enumerate(tables.items()):
        offset = (i - (len(tables) - 1) / 2) * width
        params = np.array(_slot_values(table, "parameters")) / 1e3
        macs = np.array(_slot_values(table, "macs")) / 1e6
        axes[0].bar(x + offset, np.nan_to_num(params), width, label=name)
        axes[1].bar(x + offset, np.nan_to_num(macs), width, label=name)
    axes[0].set_ylabel("parameters (thousands)")
    axes[0].set_title("Parameters per layer")
    axes[1].set_ylabel("forward MACs per image (millions)")
    axes[1].set_title("Multiply-accumulates per layer (one 32 x 32 image)")
    axes[1].set_xticks(x, labels, rotation=20)
    axes[1].set_xlabel("layer (All-CNN-C numbering; Model-C pools at conv3 and conv6)")
    axes[0].legend(title="network", loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_receptive_fields(tables: Mapping[str, pd.DataFrame], *, image_size: int = 32,
                          title: str = "Receptive field and feature-map size through the network"):
    """Left: receptive field side (pixels) after each layer slot, per network, with the image
    side dashed. Right: the side of each layer's feature map."""
    import matplotlib.pyplot as plt

    labels = _slot_labels()
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    # Networks often share a curve (Model-C and All-CNN-C do): the first is drawn wide and
    # pale, the later ones thinner and dashed on top of it, so every curve stays visible.
    styles = ({"lw": 6, "ms": 12, "alpha": 0.45, "marker": "o"},
              {"lw": 2.2, "ms": 7, "marker": "s"},
              {"lw": 1.6, "ms": 5, "ls": "--", "marker": "D"},
              {"lw": 1.2, "ms": 4, "ls": ":", "marker": "^"})
    for i, (name, table) in enumerate(tables.items()):
        rf = np.array(_slot_values(table, "receptive_field"))
        side = np.array([shape[0] if isinstance(shape, tuple) else np.nan
                         for shape in _slot_objects(table, "output_shape")], float)
        keep = ~np.isnan(rf)
        style = styles[i % len(styles)]
        axes[0].plot(x[keep], rf[keep], label=name, **style)
        axes[1].plot(x[keep], side[keep], label=name, **style)
    axes[0].axhline(image_size, color="0.4", ls="--", lw=1)
    axes[0].text(0, image_size - 0.6, f"image side ({image_size} px)", color="0.3", fontsize=9,
                 va="top")
    axes[0].set_ylabel("receptive field side (pixels)")
    axes[0].set_title("Receptive field of one unit")
    axes[1].set_ylabel("feature-map side (units)")
    axes[1].set_title("Spatial size of the output")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=35, ha="right")
        ax.set_xlabel("layer")
        ax.legend(title="network")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _slot_objects(table: pd.DataFrame, column: str) -> list[object]:
    out: list[object] = []
    for slot in LAYER_SLOTS:
        names = [n for n in slot if n in table.index]
        out.append(table.loc[names[0], column] if names else None)
    return out


def plot_class_maps(maps: np.ndarray, class_names: Sequence[str], *,
                    title: str = "Class maps and their global averages"):
    """One small heat map per channel of an ``(h, w, classes)`` map, its mean in the caption:
    what the global average pooling turns into class scores."""
    import matplotlib.pyplot as plt

    maps = np.asarray(maps, np.float64)
    n = maps.shape[-1]
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 0.8, 2.3 * rows), squeeze=False)
    vmin, vmax = float(maps.min()), float(maps.max())
    image = None
    for c, ax in enumerate(axes.flat):
        ax.grid(False)
        ax.set_xticks([])
        ax.set_yticks([])
        if c >= n:
            ax.axis("off")
            continue
        image = ax.imshow(maps[..., c], cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(f"{c}: {class_names[c]}", fontsize=9)
        ax.set_xlabel(f"mean {maps[..., c].mean():.4f}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if image is not None:
        cax = fig.add_axes((0.91, 0.15, 0.015, 0.7))
        fig.colorbar(image, cax=cax, label="map value")
    return fig


def plot_cams(images: np.ndarray, cams: np.ndarray, true_labels: Sequence[int],
              predicted: Sequence[int], class_names: Sequence[str], *, alpha: float = 0.5,
              title: str = "Class activation maps of the predicted class"):
    """Top row: the images; bottom row: each image with the class activation map of its
    predicted class on top (``cams``: ``(N, H, W)`` at the image's size, scaled to [0, 1]
    per image for display). Captions give the predicted and the true class (red when wrong)."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.55 * n + 0.9, 4.0), squeeze=False)
    shown = None
    for i in range(n):
        cam = np.asarray(cams[i], np.float64)
        span = cam.max() - cam.min()
        cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
        for row in (0, 1):
            ax = axes[row, i]
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        shown = axes[1, i].imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1,
                                  interpolation="bilinear")
        right = int(predicted[i]) == int(true_labels[i])
        axes[0, i].set_title(f"true: {class_names[int(true_labels[i])]}", fontsize=9)
        axes[1, i].set_xlabel(f"pred: {class_names[int(predicted[i])]}", fontsize=9,
                              color="k" if right else "r")
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("CAM of\npredicted class", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    if shown is not None:
        cax = fig.add_axes((0.94, 0.1, 0.012, 0.36))
        fig.colorbar(shown, cax=cax, label="CAM (0-1 per image)")
    return fig
