"""Looking inside a network (a chain of layers, as every network of this course): layer tables,
class maps, activation and gradient statistics (He et al. 2015, Section 2.2), batch norm folded
into the convs, and the input-gradient maps of Springenberg et al. (2014), Section 4."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import pandas as pd
from keras import ops

from allcnn_lib.initializers import get_initializer

#: The paper's parameter counts (Springenberg et al. 2014, Table 3, rounded there).
PAPER_TABLE3_PARAMS = {"modelc": "≈ 1.3 M", "strided": "≈ 1.3 M", "allcnn": "≈ 1.4 M"}
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


def architecture_summary(models: Mapping[str, keras.Model]) -> pd.DataFrame:
    """One row per model (label -> model): parameters, forward MACs (millions), training GFLOP
    per image (forward and backward: 2 FLOPs x 3 MACs), conv9's receptive field and map size."""
    rows = {}
    for label, model in models.items():
        conv, macs = layer_table(model).loc["conv9"], total_macs(model)
        rows[label] = {"parameters": int(model.count_params()),
                       "forward MMAC": round(macs / 1e6, 1),
                       "training GFLOP": round(6 * macs / 1e9, 2),
                       "conv9 receptive field (px)": int(conv["receptive_field"]),
                       "class map": "x".join(map(str, conv["output_shape"][:2]))}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("network")


def variant_differences(paper: keras.Model, seed: keras.Model) -> pd.DataFrame:
    """The layers in which two builds of one network differ (present in one only, or another
    output shape, parameter or MAC count), each build's values side by side (``"absent"``)."""
    columns = {"output": "output_shape", "parameters": "parameters", "MACs": "macs"}
    heads = [f"{label} {what}" for what in columns for label in ("paper", "seed")]
    tables = [layer_table(model, all_layers=True) for model in (paper, seed)]
    rows = []
    for name in dict.fromkeys([*tables[0].index, *tables[1].index]):
        pair = [table.loc[name] if name in table.index else None for table in tables]
        values = [row[column] if row is not None else "absent"
                  for column in columns.values() for row in pair]
        if "absent" in values or values[0::2] != values[1::2]:
            kind = next(row["kind"] for row in pair if row is not None)
            rows.append([name, kind, *values])
    return pd.DataFrame(rows, columns=["layer", "kind", *heads]).set_index("layer")


def receptive_field_box(table: pd.DataFrame, layer: str, row: int, col: int
                        ) -> tuple[float, float, int]:
    """``(top, left, side)`` in input pixels of the window that unit ``(row, col)`` of
    ``layer`` sees, from ``layer_table``; it may reach into the zero padding."""
    rf, jump, centre = (table.loc[layer, c] for c in ("receptive_field", "jump", "centre"))
    half = (rf - 1) / 2
    return centre + row * jump - half, centre + col * jump - half, int(rf)


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


def class_score_summary(model: keras.Model, images: np.ndarray,
                        labels: np.ndarray) -> dict[str, float]:
    """How alive the class scores (``global_average_pooling``) are: the accuracy, the number
    of distinct predicted classes and the scores' std over the images, averaged over classes."""
    scores = class_maps(model, images, layer="global_average_pooling").astype(np.float64)
    predicted = scores.argmax(axis=1)
    return {"accuracy": float(np.mean(predicted == np.asarray(labels))),
            "classes predicted": len(np.unique(predicted)),
            "score spread": float(scores.std(axis=0).mean())}


def deep_relu_stack(depth: int, width: int,
                    initializer: str | keras.initializers.Initializer = "he_normal", *,
                    kind: str = "dense", seed: int = 0) -> keras.Model:
    """For a CIFAR-10 image, ``depth`` linear layers of ``width`` units, each followed by a
    ReLU, then a linear ``classifier`` and a softmax; no batch norm, dropout or skips.
    ``kind="dense"`` flattens the image; ``kind="conv"`` uses 3x3 convs, a 1x1 classifier and
    global average pooling. Layer k's initializer (a name or a Keras one) is seeded seed + k."""
    if depth < 1 or width < 1 or kind not in ("dense", "conv"):
        raise ValueError(f"need depth >= 1, width >= 1 and kind 'dense' or 'conv', got "
                         f"depth={depth}, width={width}, kind={kind!r}")

    def linear(units: int, k: int, name: str) -> keras.layers.Layer:
        if isinstance(initializer, str):
            init = get_initializer(initializer, seed=seed + k)
        else:  # a copy with its own seed: equal-shaped layers must not start identical
            config = initializer.get_config()
            if isinstance(config.get("seed"), int):
                config["seed"] += k
            init = type(initializer).from_config(config)
        if kind == "dense":
            return keras.layers.Dense(units, kernel_initializer=init, name=name)
        return keras.layers.Conv2D(units, 3 if k <= depth else 1, padding="same",
                                   kernel_initializer=init, name=name)

    x = inputs = keras.Input(shape=(32, 32, 3), name="image")
    if kind == "dense":
        x = keras.layers.Flatten(name="flatten")(x)
    for k in range(1, depth + 1):
        x = keras.layers.ReLU(name=f"relu{k}")(linear(width, k, f"{kind}{k}")(x))
    x = linear(10, depth + 1, "classifier")(x)
    if kind == "conv":
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name=f"relu_stack_{kind}{depth}x{width}")


def sample_kernel(initializer: str | keras.initializers.Initializer, shape: Sequence[int],
                  *, seed: int = 0) -> np.ndarray:
    """The float32 kernel of ``shape`` that ``initializer`` (a course name, seeded ``seed``,
    or a Keras initializer) draws."""
    init = get_initializer(initializer, seed=seed)
    return np.asarray(ops.convert_to_numpy(init(tuple(map(int, shape)), dtype="float32")))


def predicted_preactivation_std(weight_stds: Sequence[float], fan_ins: Sequence[int],
                                input_mean_square: float) -> np.ndarray:
    """The pre-activation stds of He et al.'s recursion: ``Var(y_1) = n_1 Var(w_1) E[x_1^2]``
    (the image is no ReLU output), then ``Var(y_l) = n_l Var(w_l) Var(y_{l-1}) / 2`` (Eq. 9);
    ``input_mean_square`` is ``E[x_1^2]``, biases are zero."""
    factors = np.asarray(fan_ins, np.float64) * np.asarray(weight_stds, np.float64) ** 2
    factors[1:] /= 2.0
    return np.sqrt(input_mean_square * np.cumprod(factors))


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


def _gradients(model: keras.Model, layers: list, batch, labels, wrt: str) -> list:
    """d(summed cross-entropy)/d(each layer's output or kernel), inference mode."""
    probe = keras.Model(model.input, [la.output for la in layers] + [model.output])
    labels = ops.convert_to_tensor(labels)

    def loss(probabilities):
        return ops.sum(keras.losses.sparse_categorical_crossentropy(labels, probabilities))

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outputs = probe(batch, training=False)
            tape.watch(outputs[:-1])
            total = loss(outputs[-1])
        return tape.gradient(total, outputs[:-1] if wrt == "output" else
                             [la.kernel for la in layers])
    if backend == "torch":
        for variable in model.trainable_variables:
            variable.value.grad = None
        outputs = probe(batch, training=False)
        for out in outputs[:-1]:
            out.retain_grad()
        loss(outputs[-1]).backward()
        return [out.grad for out in outputs[:-1]] if wrt == "output" else [
            la.kernel.value.grad for la in layers]
    if backend == "jax" and wrt == "kernel":
        import jax

        variables, fixed = model.trainable_variables, model.non_trainable_variables
        grads = jax.grad(lambda values: loss(model.stateless_call(
            values, [v.value for v in fixed], batch)[0]))([v.value for v in variables])
        by_path = {v.path: g for v, g in zip(variables, grads, strict=True)}
        return [by_path[la.kernel.path] for la in layers]
    raise NotImplementedError(f"gradient_stats(wrt={wrt!r}) does not run on the {backend} "
                              f"backend; wrt='kernel' runs on tensorflow, jax and torch")


def gradient_stats(model: keras.Model, batch, labels, layers: Layers = None, *,
                   wrt: str = "kernel") -> dict[str, float]:
    """The std of a gradient of the cross-entropy (integer ``labels``, inference mode), per
    layer (default ``linear_layers``). ``wrt="kernel"``: of the batch's *mean* loss with
    respect to each kernel, what SGD sees. ``wrt="output"``: of the *summed* loss with respect
    to each layer's output, He et al.'s ``dL/dy_l`` of each example (not on JAX)."""
    if wrt not in ("kernel", "output"):
        raise ValueError(f"unknown wrt {wrt!r}; choose one of kernel, output")
    chosen = _select(model, layers)
    scale = len(labels) if wrt == "kernel" else 1  # summed loss -> mean loss
    grads = _gradients(model, chosen, batch, labels, wrt)
    return {la.name: float(np.std(ops.convert_to_numpy(g), dtype=np.float64)) / scale
            for la, g in zip(chosen, grads, strict=True)}


def propagation_stats(model: keras.Model, batch, labels, layers: Layers = None
                      ) -> dict[str, dict[str, float]]:
    """``activation_stats`` and both ``gradient_stats`` of the same layers, by name."""
    chosen = _select(model, layers)
    return {"activation": activation_stats(model, batch, chosen),
            "output_gradient": gradient_stats(model, batch, labels, chosen, wrt="output"),
            "kernel_gradient": gradient_stats(model, batch, labels, chosen)}


def std_ratio(stats: Mapping[str, float]) -> float:
    """Last layer's value over the first layer's: how much the statistic changed with depth."""
    values = list(stats.values())
    return values[-1] / values[0] if values and values[0] and math.isfinite(values[0]) else math.nan


# --------------------------------------------------------------------------- batch norm


def _folded_conv(conv: keras.layers.Conv2D, bn: keras.layers.BatchNormalization):
    """The kernel and bias of one conv that computes ``bn(conv(x))`` in inference mode."""
    gamma, beta, mean, variance = (ops.convert_to_numpy(w) for w in
                                   (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    scale = gamma / np.sqrt(variance + bn.epsilon)  # one factor per output channel
    bias = ops.convert_to_numpy(conv.bias) if conv.use_bias else 0.0
    kernel = ops.convert_to_numpy(conv.kernel) * scale  # broadcasts over the last axis
    return kernel, beta + (bias - mean) * scale


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of a chain ``model`` without its batch norm layers: each ``Conv2D`` followed by
    a ``BatchNormalization`` becomes one ``Conv2D`` with a bias, kernel ``W * s`` and bias
    ``beta + (b - mean) * s``, where ``s = gamma / sqrt(moving_variance + epsilon)``. Equal to
    ``model`` in inference mode."""
    layers = model.layers[1:]  # a chain: each layer feeds the next
    x = inputs = keras.Input(model.input_shape[1:], name=model.layers[0].name)
    for layer, after in zip(layers, layers[1:] + [None], strict=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        config = layer.get_config()
        fold = isinstance(layer, keras.layers.Conv2D) and isinstance(
            after, keras.layers.BatchNormalization)
        if fold:
            config["use_bias"] = True
        copy = type(layer).from_config(config)
        x = copy(x)
        copy.set_weights(_folded_conv(layer, after) if fold else layer.get_weights())
    return keras.Model(inputs, x, name=f"{model.name}_folded")


def inference_speed(model: keras.Model, images: np.ndarray, *, batch_size: int = 256) -> float:
    """Images per second of ``model`` in inference mode (one ``tf.function``), the median of
    three timed passes over ``images`` after one untimed pass that traces it."""
    import tensorflow as tf

    predict = tf.function(lambda batch: model(batch, training=False))
    batches = [tf.constant(images[i:i + batch_size], tf.float32)
               for i in range(0, len(images), batch_size)]
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        ops.convert_to_numpy([predict(batch) for batch in batches][-1])
        seconds.append(time.perf_counter() - start)
    return len(images) / float(np.median(seconds[1:]))


# --------------------------------------------------------------------------- saliency

#: The ReLU backward rules of Springenberg et al. (2014), Section 4, by name.
RELU_BACKWARD_METHODS = ("gradient", "deconvnet", "guided")


def _method(method: str) -> str:
    if method not in RELU_BACKWARD_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of "
                         f"{', '.join(RELU_BACKWARD_METHODS)}")
    return method


def relu_backward(x, upstream, method: str):
    """What a ReLU sends back to its input ``x`` given ``upstream = dL/dy``, by ``method``:
    ``"gradient"`` keeps it where ``x > 0`` (backpropagation), ``"deconvnet"`` where
    ``upstream > 0`` (Zeiler & Fergus 2014), ``"guided"`` where both hold."""
    forward_mask = ops.cast(x > 0, upstream.dtype)  # where the ReLU let the signal through
    backward_mask = ops.cast(upstream > 0, upstream.dtype)  # where the signal from above is > 0
    masks = {"gradient": forward_mask, "deconvnet": backward_mask,
             "guided": forward_mask * backward_mask}
    return upstream * masks[_method(method)]


def relu_with_backward(method: str) -> Callable:
    """``max(x, 0)`` forward, ``relu_backward(x, upstream, method)`` backward (TensorFlow)."""
    import tensorflow as tf

    _method(method)

    @tf.custom_gradient
    def relu(x):
        def backward(upstream):
            return relu_backward(x, upstream, method)

        return tf.nn.relu(x), backward

    return relu


class BackwardRuleReLU(keras.layers.Layer):
    """A ReLU layer whose backward pass follows one of ``RELU_BACKWARD_METHODS``."""

    def __init__(self, method: str = "guided", **kwargs) -> None:
        super().__init__(**kwargs)
        self.method, self.relu = method, relu_with_backward(method)

    def call(self, inputs):
        return self.relu(inputs)


def with_relu_backward(model: keras.Model, method: str) -> keras.Model:
    """A copy of ``model`` in which every ``keras.layers.ReLU`` is a ``BackwardRuleReLU`` of
    the same name; every other layer is shared with ``model``, trained weights included."""

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.ReLU):  # the course's ReLUs are plain max(x, 0)
            return BackwardRuleReLU(method, name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=swap)


def input_gradients(model: keras.Model, images: np.ndarray, layer: str,
                    method: str = "guided", channel: int | Sequence[int] | None = None,
                    position: tuple[int, int] | None = None) -> np.ndarray:
    """For each image, the derivative of one unit of ``layer``'s output with respect to the
    image, through ReLUs that follow ``method``. The unit is the strongest one (the largest
    output) of the layer, or of one ``channel`` (an int, or one per image, e.g. the predicted
    classes at ``global_average_pooling``), or at one ``(row, col)`` position of a map.
    Inference mode; the result has the shape of ``images``."""
    import tensorflow as tf

    probe = with_relu_backward(keras.Model(model.input, model.get_layer(layer).output), method)
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = probe(x, training=False)
        if position is not None:
            outputs = outputs[:, position[0], position[1]]
        if channel is not None:  # outputs[i, ..., channel[i]]
            channels = np.broadcast_to(np.asarray(channel), (len(images),))
            one_hot = ops.one_hot(channels, int(outputs.shape[-1]), dtype=outputs.dtype)
            shape = (len(images),) + (1,) * (len(outputs.shape) - 2) + (-1,)
            outputs = ops.sum(outputs * ops.reshape(one_hot, shape), axis=-1)
        strongest = ops.sum(ops.max(ops.reshape(outputs, (len(images), -1)), axis=1))
    return ops.convert_to_numpy(tape.gradient(strongest, x))


def strongest_units(model: keras.Model, images: np.ndarray, layer: str) -> np.ndarray:
    """``(row, col, channel)`` of the largest output of a 4-D ``layer`` for each image, in
    inference mode: the unit ``input_gradients`` starts from by default."""
    outputs = class_maps(model, images, layer=layer)
    flat = outputs.reshape(len(outputs), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, outputs.shape[1:]), axis=1)


def gradient_image(gradient: np.ndarray) -> np.ndarray:
    """An input-gradient map as an image in [0, 1]: zero is mid-grey, and the 99th percentile
    of the absolute values (per image) maps to black and white; larger values are clipped."""
    gradient = np.asarray(gradient, np.float64)
    axes = tuple(range(1, gradient.ndim)) if gradient.ndim == 4 else None
    scale = np.percentile(np.abs(gradient), 99, axis=axes, keepdims=True)
    return np.clip(0.5 + 0.5 * gradient / np.maximum(scale, 1e-12), 0.0, 1.0)


def kernel_images(kernel: np.ndarray) -> np.ndarray:
    """A ``(k, k, 3, filters)`` first-layer kernel as ``filters`` RGB images in [0, 1], each
    scaled on its own so that zero is mid-grey and its largest weight black or white."""
    filters = np.moveaxis(np.asarray(kernel, np.float64), -1, 0)
    scale = np.abs(filters).max(axis=(1, 2, 3), keepdims=True)
    return 0.5 + 0.5 * filters / np.maximum(scale, 1e-12)
