"""Looking inside a network: activation statistics per layer, batch norm folded into the convs,
and the input-gradient maps of Springenberg et al. (2014), Section 4: plain gradients,
deconvnet (Zeiler & Fergus 2014) and guided backpropagation. Notebooks 11 (batch
normalization) and 12 (guided backpropagation) are built on it.

The three maps differ only in what a ReLU ``y = max(x, 0)`` sends back to its input, given the
gradient ``g = dL/dy`` that reaches it from above (the paper's Section 4):

- ``"gradient"``: ``g * (x > 0)``, ordinary backpropagation (the saliency map);
- ``"deconvnet"``: ``g * (g > 0)``, whatever ``x`` was (Zeiler & Fergus' deconvnet);
- ``"guided"``: ``g * (x > 0) * (g > 0)``, both masks: guided backpropagation.

Convolutions are undone by their transpose in all three, which is what the ordinary gradient
already does, so a copy of the model whose ReLU layers follow one rule (``with_relu_backward``)
and ``tf.GradientTape`` give each map. TensorFlow backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import ops

__all__ = [
    "RELU_BACKWARD_METHODS", "relu_backward",
    "relu_with_backward", "BackwardRuleReLU", "with_relu_backward", "input_gradients",
    "strongest_units", "gradient_image", "activation_statistics", "class_score_summary",
    "fold_batch_norm", "inference_speed", "receptive_field_box", "kernel_images",
]

#: The ReLU backward rules of Section 4, by name (see the module's docstring).
RELU_BACKWARD_METHODS = ("gradient", "deconvnet", "guided")


# --------------------------------------------------------------------------- loading


# --------------------------------------------------------------------------- the ReLU rules


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


def _pick_channel(outputs, channel: int | Sequence[int]):
    """``outputs[..., channel]``, with one channel for all images or one per image."""
    channels = np.broadcast_to(np.asarray(channel), (int(outputs.shape[0]),))
    one_hot = ops.one_hot(channels, int(outputs.shape[-1]), dtype=outputs.dtype)
    one_hot = ops.reshape(one_hot, (len(channels),) + (1,) * (len(outputs.shape) - 2) + (-1,))
    return ops.sum(outputs * one_hot, axis=-1)


def input_gradients(model: keras.Model, images: np.ndarray, layer: str,
                    method: str = "guided", channel: int | Sequence[int] | None = None,
                    position: tuple[int, int] | None = None) -> np.ndarray:
    """For each image, the derivative of one unit of ``layer``'s output with respect to the
    image, through ReLUs that follow ``method``. The unit is the strongest one (the largest
    output) of the layer, or of one ``channel`` (an int, or one per image, e.g. the predicted
    classes at ``global_average_pooling``), or at one ``(row, col)`` position of a map.
    Inference mode; the result has the shape of ``images``."""
    probe = keras.Model(model.input, model.get_layer(layer).output)
    probe = with_relu_backward(probe, method)
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = probe(x, training=False)
        if position is not None:
            outputs = outputs[:, position[0], position[1]]
        if channel is not None:
            outputs = _pick_channel(outputs, channel)
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


# --------------------------------------------------------------------------- batch norm


def activation_statistics(model: keras.Model, images: np.ndarray,
                          layers: Sequence[str] | None = None, *,
                          training: bool = False) -> pd.DataFrame:
    """Per layer (default: every ReLU), over ``images``: the mean and standard deviation of
    the outputs, the fraction of outputs that are zero, and the fraction of channels that are
    zero for every image at every position (dead channels). ``training=True`` measures what
    training sees (batch statistics, dropout) and leaves the moving statistics unchanged."""
    names = list(layers or [la.name for la in model.layers
                            if isinstance(la, keras.layers.ReLU)])
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    saved = [ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    outputs = probe(np.asarray(images, np.float32), training=training)
    for variable, value in zip(model.non_trainable_variables, saved, strict=True):
        variable.assign(value)  # a training-mode call moves the moving statistics
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    rows = {}
    for name, out in zip(names, outputs, strict=True):
        out = np.asarray(ops.convert_to_numpy(out), np.float64)
        per_channel = out.reshape(-1, out.shape[-1])
        rows[name] = {"mean": out.mean(), "std": out.std(), "zero fraction": np.mean(out == 0),
                      "dead channels": np.mean(per_channel.max(axis=0) <= 0)}
    return pd.DataFrame(rows).T


def class_score_summary(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                        scores_layer: str = "global_average_pooling") -> dict[str, float]:
    """How alive a network's class scores (the output of ``scores_layer``, before the
    softmax) are on ``images``, in inference mode: the accuracy, the number of distinct
    predicted classes, and the spread of the scores (their standard deviation over the images,
    averaged over the classes): 0 when every image gets the same scores."""
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


# --------------------------------------------------------------------------- seeing the net


def receptive_field_box(table: pd.DataFrame, layer: str, row: int, col: int
                        ) -> tuple[float, float, int]:
    """``(top, left, side)`` in input pixels of the window that unit ``(row, col)`` of
    ``layer`` sees, from ``architecture.layer_table`` (receptive field, jump, centre); the
    window may reach into the zero padding outside the image."""
    rf, jump, centre = (table.loc[layer, c] for c in ("receptive_field", "jump", "centre"))
    half = (rf - 1) / 2
    return centre + row * jump - half, centre + col * jump - half, int(rf)


def kernel_images(kernel: np.ndarray) -> np.ndarray:
    """A ``(k, k, 3, filters)`` first-layer kernel as ``filters`` RGB images in [0, 1], each
    scaled on its own so that zero is mid-grey and its largest weight black or white."""
    filters = np.moveaxis(np.asarray(kernel, np.float64), -1, 0)
    scale = np.abs(filters).max(axis=(1, 2, 3), keepdims=True)
    return 0.5 + 0.5 * filters / np.maximum(scale, 1e-12)
