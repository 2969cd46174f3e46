"""Looking inside a trained network (notebooks 11 and 12, TensorFlow backend): batch norm folded
into the convs, and the input-gradient maps of Springenberg et al. (2014), Section 4.

The three maps differ only in what a ReLU ``y = max(x, 0)`` sends back to its input, given the
gradient ``g = dL/dy`` from above: ``"gradient"`` ``g * (x > 0)`` (plain backpropagation),
``"deconvnet"`` ``g * (g > 0)`` (Zeiler & Fergus 2014) and ``"guided"`` ``g * (x > 0) * (g > 0)``
(guided backpropagation). A copy of the model whose ReLUs follow one rule
(``with_relu_backward``) and ``tf.GradientTape`` give each map.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import ops

from allcnn_lib.signal_propagation import activation_statistics  # noqa: F401 (notebook 11)

#: The ReLU backward rules of Section 4, by name (see the module's docstring).
RELU_BACKWARD_METHODS = ("gradient", "deconvnet", "guided")


def relu_backward(x, upstream, method: str):
    """What a ReLU sends back to its input ``x`` given ``upstream = dL/dy``, by ``method``:
    ``"gradient"`` keeps it where ``x > 0``, ``"deconvnet"`` where ``upstream > 0``,
    ``"guided"`` where both hold (Springenberg et al. 2014, Section 4)."""
    forward_mask = ops.cast(x > 0, upstream.dtype)  # where the ReLU let the signal through
    backward_mask = ops.cast(upstream > 0, upstream.dtype)  # where the signal from above is > 0
    if method == "gradient":
        return upstream * forward_mask
    if method == "deconvnet":
        return upstream * backward_mask
    if method == "guided":
        return upstream * forward_mask * backward_mask
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{', '.join(RELU_BACKWARD_METHODS)}")


def relu_with_backward(method: str) -> Callable:
    """``max(x, 0)`` forward, ``relu_backward(x, upstream, method)`` backward."""

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
        if method not in RELU_BACKWARD_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of "
                             f"{', '.join(RELU_BACKWARD_METHODS)}")
        self.method = method
        self.relu = relu_with_backward(method)

    def call(self, inputs):
        return self.relu(inputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "method": self.method}


def with_relu_backward(model: keras.Model, method: str) -> keras.Model:
    """A copy of ``model`` in which every ``keras.layers.ReLU`` is a ``BackwardRuleReLU`` of
    the same name; every other layer is shared with ``model``, trained weights included."""

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if not isinstance(layer, keras.layers.ReLU):
            return layer
        if layer.max_value is not None or layer.negative_slope or layer.threshold:
            raise ValueError(f"{layer.name}: only plain ReLUs max(x, 0) can be swapped")
        return BackwardRuleReLU(method, name=layer.name)

    return keras.models.clone_model(model, clone_function=swap)


def input_gradients(model: keras.Model, images: np.ndarray, layer: str,
                    method: str = "guided", channel: int | Sequence[int] | None = None,
                    position: tuple[int, int] | None = None) -> np.ndarray:
    """For each image, the derivative of one unit of ``layer``'s output with respect to the
    image, through ReLUs that follow ``method``. The unit is the strongest one (the largest
    output) of the layer, or of one ``channel`` (an int, or one per image, e.g. the predicted
    classes at ``global_average_pooling``), or at one ``(row, col)`` position of a map.
    Inference mode; the result has the shape of ``images``."""
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
    probe = keras.Model(model.input, model.get_layer(layer).output)
    outputs = ops.convert_to_numpy(probe(np.asarray(images, np.float32), training=False))
    flat = outputs.reshape(len(outputs), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, outputs.shape[1:]), axis=1)


def gradient_image(gradient: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """An input-gradient map as an image in [0, 1]: zero is mid-grey, and ``percentile`` of
    the absolute values (per image) maps to black and white; larger values are clipped."""
    gradient = np.asarray(gradient, np.float64)
    axes = tuple(range(1, gradient.ndim)) if gradient.ndim == 4 else None
    scale = np.percentile(np.abs(gradient), percentile, axis=axes, keepdims=True)
    return np.clip(0.5 + 0.5 * gradient / np.maximum(scale, 1e-12), 0.0, 1.0)


def kernel_images(kernel: np.ndarray) -> np.ndarray:
    """A ``(k, k, 3, filters)`` first-layer kernel as ``filters`` RGB images in [0, 1], each
    scaled on its own so that zero is mid-grey and its largest weight black or white."""
    filters = np.moveaxis(np.asarray(kernel, np.float64), -1, 0)
    scale = np.abs(filters).max(axis=(1, 2, 3), keepdims=True)
    return 0.5 + 0.5 * filters / np.maximum(scale, 1e-12)


def receptive_field_box(table: pd.DataFrame, layer: str, row: int, col: int
                        ) -> tuple[float, float, int]:
    """``(top, left, side)`` in input pixels of the window that unit ``(row, col)`` of
    ``layer`` sees, from ``architecture.layer_table``; it may reach into the zero padding."""
    rf, jump, centre = (table.loc[layer, c] for c in ("receptive_field", "jump", "centre"))
    half = (rf - 1) / 2
    return centre + row * jump - half, centre + col * jump - half, int(rf)


# --------------------------------------------------------------------------- batch norm


def class_score_summary(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                        scores_layer: str = "global_average_pooling") -> dict[str, float]:
    """How alive the class scores (``scores_layer``'s output) are on ``images``, in inference
    mode: the accuracy, the number of distinct predicted classes, and the scores' spread (std
    over the images, averaged over the classes; 0 when every image gets the same scores)."""
    probe = keras.Model(model.input, model.get_layer(scores_layer).output)
    scores = np.asarray(ops.convert_to_numpy(probe(np.asarray(images, np.float32),
                                                   training=False)), np.float64)
    predicted = scores.argmax(axis=1)
    return {"accuracy": float(np.mean(predicted == np.asarray(labels))),
            "classes predicted": len(np.unique(predicted)),
            "score spread": float(scores.std(axis=0).mean())}


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


def inference_speed(model: keras.Model, images: np.ndarray, *, batch_size: int = 256,
                    repeats: int = 3) -> float:
    """Images per second of ``model`` in inference mode (one compiled ``tf.function``), the
    median of ``repeats`` timed passes over ``images`` after one untimed pass."""
    predict = tf.function(lambda batch: model(batch, training=False))
    batches = [tf.constant(images[i:i + batch_size], tf.float32)
               for i in range(0, len(images), batch_size)]
    seconds = []
    for _ in range(repeats + 1):  # the first pass traces the function
        start = time.perf_counter()
        for batch in batches:
            last = predict(batch)
        ops.convert_to_numpy(last)
        seconds.append(time.perf_counter() - start)
    return len(images) / float(np.median(seconds[1:]))
