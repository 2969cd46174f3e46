"""Signal propagation at initialization (notebook 02): how the scale of activations and
gradients changes from layer to layer (Glorot & Bengio 2010; He et al. 2015, Section 2.2).

For a linear layer ``y_l = W_l x_l`` with fan-in ``n_l`` and i.i.d. zero-mean weights,
``Var(y_l) = n_l Var(w_l) E[x_l^2]`` (He et al., Eq. 7), and after a ReLU of a symmetric
``y_{l-1}``, ``E[x_l^2] = Var(y_{l-1}) / 2``, so ``Var(y_l) = (n_l Var(w_l) / 2) Var(y_{l-1})``
(Eq. 9). He's ``Var(w) = 2 / fan_in`` makes the factor 1; Glorot's ``2 / (fan_in + fan_out)``
gives 1/2 for square layers; a Gaussian of std 0.01 gives ``n * 1e-4 / 2``.

Every model is called in inference mode (no dropout; batch norm with its moving statistics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import pandas as pd

from allcnn_lib.initializers import get_initializer
from allcnn_lib.models import _initializer_for_layer

Layers = Sequence[str | keras.layers.Layer] | None


def deep_relu_stack(depth: int, width: int,
                    initializer: str | keras.initializers.Initializer = "he_normal", *,
                    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
                    kind: str = "dense", seed: int = 0) -> keras.Model:
    """A plain deep ReLU network: ``depth`` linear layers of ``width`` units, each followed by a
    ReLU, then a linear ``classifier`` and a ``softmax``; no batch norm, dropout or skips.

    ``kind="dense"``: flatten, ``dense1 .. denseN``, ``relu1 .. reluN``, ``Dense`` classifier.
    ``kind="conv"``: 3x3 ``conv1 .. convN`` (``same``), a 1x1 conv classifier and global
    average pooling, as in All-CNN-C. ``initializer``: a course name (seeded ``seed + k`` for
    layer k) or a Keras initializer (copied per layer, its seed advanced by k). Biases are zero.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"need depth >= 1 and width >= 1, got depth={depth}, width={width}")
    if kind not in ("dense", "conv"):
        raise ValueError(f"unknown kind {kind!r}; choose one of dense, conv")
    if kind == "conv" and len(input_shape) != 3:
        raise ValueError(f"kind='conv' needs (height, width, channels) inputs, "
                         f"got {tuple(input_shape)}")

    def linear(units: int, k: int, name: str) -> keras.layers.Layer:
        init = (get_initializer(initializer, seed=seed + k) if isinstance(initializer, str)
                else _initializer_for_layer(initializer, k))
        if kind == "dense":
            return keras.layers.Dense(units, kernel_initializer=init, name=name)
        return keras.layers.Conv2D(units, 3 if k <= depth else 1, padding="same",
                                   kernel_initializer=init, name=name)

    x = inputs = keras.Input(shape=tuple(input_shape), name="image")
    if kind == "dense" and len(input_shape) > 1:
        x = keras.layers.Flatten(name="flatten")(x)
    for k in range(1, depth + 1):
        x = keras.layers.ReLU(name=f"relu{k}")(linear(width, k, f"{kind}{k}")(x))
    x = linear(num_classes, depth + 1, "classifier")(x)
    if kind == "conv":
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name=f"relu_stack_{kind}{depth}x{width}")


def linear_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The ``Dense`` and ``Conv2D`` layers in forward order (their outputs: pre-activations)."""
    return [la for la in model.layers if isinstance(la, keras.layers.Dense | keras.layers.Conv2D)]


def _select(model: keras.Model, layers: Layers) -> list[keras.layers.Layer]:
    chosen = linear_layers(model) if layers is None else [
        model.get_layer(la) if isinstance(la, str) else la for la in layers]
    if not chosen:
        raise ValueError(f"model {model.name!r} has no layers to measure")
    return chosen


def _std(x: Any) -> float:
    return float(np.std(keras.ops.convert_to_numpy(x), dtype=np.float64))


def activation_statistics(model: keras.Model, images: Any, layers: Layers = None, *,
                          training: bool = False) -> pd.DataFrame:
    """Per layer (default: every ReLU), over ``images``: the outputs' mean and std, the
    fraction that is zero, and the fraction of channels that are zero for every image at every
    position (dead channels). ``training=True`` measures what training sees (batch statistics,
    dropout) and leaves the moving statistics unchanged."""
    chosen = [la for la in model.layers if isinstance(la, keras.layers.ReLU)] \
        if layers is None else _select(model, layers)
    probe = keras.Model(model.input, [layer.output for layer in chosen])
    saved = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    outputs = probe(images, training=training)
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    for variable, value in zip(model.non_trainable_variables, saved, strict=True):
        variable.assign(value)  # a training-mode call moves the moving statistics
    rows = {}
    for layer, out in zip(chosen, outputs, strict=True):
        out = np.asarray(keras.ops.convert_to_numpy(out), np.float64)
        rows[layer.name] = {"mean": out.mean(), "std": out.std(),
                            "zero fraction": np.mean(out == 0),
                            "dead channels": np.mean(out.reshape(-1, out.shape[-1]).max(0) <= 0)}
    return pd.DataFrame(rows).T


def activation_stats(model: keras.Model, batch: Any, layers: Layers = None) -> dict[str, float]:
    """The std of each layer's output on ``batch`` (float64, over all values), in forward
    order; default ``linear_layers(model)``: the pre-activations ``y_l`` of He et al."""
    stds = activation_statistics(model, batch, _select(model, layers))["std"]
    return {name: float(value) for name, value in stds.items()}


def _loss(labels: Any, probabilities: Any, reduction: str) -> Any:
    losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    return keras.ops.sum(losses) if reduction == "sum" else keras.ops.mean(losses)


def _kernel_gradients(model: keras.Model, batch: Any, labels: Any) -> list[Any]:
    """d(mean cross-entropy)/d(variable) for every trainable variable, on each backend."""
    backend, variables = keras.backend.backend(), model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = _loss(labels, model(batch, training=False), "mean")
        return tape.gradient(loss, variables)
    if backend == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable):
            probabilities, _ = model.stateless_call(trainable, non_trainable, batch,
                                                    training=False)
            return _loss(labels, probabilities, "mean")

        return jax.grad(loss_of)([v.value for v in variables])
    if backend == "torch":
        for v in variables:
            v.value.grad = None
        loss = _loss(keras.ops.convert_to_tensor(labels), model(batch, training=False), "mean")
        loss.backward()
        return [v.value.grad for v in variables]
    raise NotImplementedError(f"gradient_stats supports the tensorflow, jax and torch "
                              f"backends, not {backend!r}")


def _output_gradients(model: keras.Model, layers: Sequence[keras.layers.Layer], batch: Any,
                      labels: Any) -> list[Any]:
    """d(summed cross-entropy)/d(output of each layer): every example's own gradient."""
    backend = keras.backend.backend()
    probe = keras.Model(model.input, [layer.output for layer in layers] + [model.output])
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outputs = probe(batch, training=False)
            for out in outputs[:-1]:
                tape.watch(out)
            loss = _loss(labels, outputs[-1], "sum")
        return tape.gradient(loss, outputs[:-1])
    if backend == "torch":
        outputs = probe(batch, training=False)
        for out in outputs[:-1]:
            out.retain_grad()
        _loss(keras.ops.convert_to_tensor(labels), outputs[-1], "sum").backward()
        return [out.grad for out in outputs[:-1]]
    raise NotImplementedError(f"gradient_stats(wrt='output') supports the tensorflow and "
                              f"torch backends, not {backend!r}; wrt='kernel' runs on all three")


def gradient_stats(model: keras.Model, batch: Any, labels: Any, layers: Layers = None, *,
                   wrt: str = "kernel") -> dict[str, float]:
    """The std of a gradient of the cross-entropy (integer ``labels``, inference mode), per
    layer (default ``linear_layers``), in forward order.

    ``wrt="kernel"``: of the batch's *mean* loss with respect to each kernel, what SGD sees
    (TensorFlow, JAX and PyTorch). ``wrt="output"``: of the *summed* loss with respect to each
    layer's output, the back-propagated ``dL/dy_l`` of He et al., each example's own gradient
    (TensorFlow and PyTorch).
    """
    if wrt not in ("kernel", "output"):
        raise ValueError(f"unknown wrt {wrt!r}; choose one of kernel, output")
    chosen = _select(model, layers)
    if wrt == "output":
        grads = _output_gradients(model, chosen, batch, labels)
        return {layer.name: _std(g) for layer, g in zip(chosen, grads, strict=True)}
    gradients = _kernel_gradients(model, batch, labels)
    by_path = {v.path: g for v, g in zip(model.trainable_variables, gradients, strict=True)}
    stats = {}
    for layer in chosen:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            raise ValueError(f"layer {layer.name!r} has no kernel")
        if by_path.get(kernel.path) is None:
            raise ValueError(f"layer {layer.name!r}: its kernel got no gradient")
        stats[layer.name] = _std(by_path[kernel.path])
    return stats


def propagation_stats(model: keras.Model, batch: Any, labels: Any, layers: Layers = None
                      ) -> dict[str, dict[str, float]]:
    """``{"activation": ..., "output_gradient": ..., "kernel_gradient": ...}``: what
    ``activation_stats`` and ``gradient_stats`` (``wrt="output"``, ``"kernel"``) return."""
    chosen = _select(model, layers)
    return {"activation": activation_stats(model, batch, chosen),
            "output_gradient": gradient_stats(model, batch, labels, chosen, wrt="output"),
            "kernel_gradient": gradient_stats(model, batch, labels, chosen)}


def std_ratio(stats: Mapping[str, float]) -> float:
    """Last layer's value over the first layer's: how much the statistic changed with depth."""
    values = list(stats.values())
    if not values or values[0] == 0 or not math.isfinite(values[0]):
        return math.nan
    return values[-1] / values[0]


def sample_kernel(initializer: str | keras.initializers.Initializer, shape: Sequence[int],
                  *, seed: int = 0) -> np.ndarray:
    """The float32 kernel that ``initializer`` (a course name, seeded with ``seed``, or a Keras
    initializer used as it is) draws for ``shape``, as a numpy array."""
    init = get_initializer(initializer, seed=seed) if isinstance(initializer, str) else initializer
    return np.asarray(keras.ops.convert_to_numpy(init(tuple(map(int, shape)), dtype="float32")))


def predicted_preactivation_std(weight_stds: Sequence[float], fan_ins: Sequence[int],
                                input_mean_square: float) -> np.ndarray:
    """The pre-activation stds that He et al.'s recursion predicts: ``Var(y_1) = n_1 Var(w_1)
    E[x_1^2]`` for the first layer (the image is no ReLU output), then ``Var(y_l) = n_l
    Var(w_l) Var(y_{l-1}) / 2``; ``input_mean_square`` is ``E[x_1^2]``, biases are zero."""
    if len(weight_stds) != len(fan_ins) or not len(fan_ins):
        raise ValueError("need one weight std per fan-in, at least one layer")
    variances, var = [], None
    for std, n in zip(weight_stds, fan_ins, strict=True):
        factor = n * float(std) ** 2
        var = factor * float(input_mean_square) if var is None else factor * var / 2.0
        variances.append(var)
    return np.sqrt(np.asarray(variances, dtype=np.float64))
