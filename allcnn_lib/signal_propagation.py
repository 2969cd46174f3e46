"""Signal propagation at initialization: how the scale of activations and gradients changes
from layer to layer, for notebook 02 (weight initialization).

The question goes back to Glorot & Bengio (2010), "Understanding the difficulty of training deep
feedforward neural networks", and He et al. (2015), "Delving Deep into Rectifiers", Section 2.2.
For a linear layer ``y_l = W_l x_l`` with ``n_l`` inputs (its fan-in), i.i.d. zero-mean weights
of variance ``Var(w_l)`` and inputs independent of the weights,

    Var(y_l) = n_l * Var(w_l) * E[x_l^2]                                     (He et al., Eq. 7)

and after a ReLU of a symmetric, zero-mean ``y_{l-1}``, ``E[x_l^2] = Var(y_{l-1}) / 2``, so

    Var(y_l) = (n_l * Var(w_l) / 2) * Var(y_{l-1}).                          (He et al., Eq. 9)

The pre-activation variance is multiplied by ``n_l Var(w_l) / 2`` at every layer: He's
``Var(w) = 2 / fan_in`` makes that factor 1; Glorot's ``Var(w) = 2 / (fan_in + fan_out)`` gives
1/2 for square layers (the signal halves its variance per layer); a fixed Gaussian of std 0.01
gives ``n * 1e-4 / 2``, far below 1 for any layer of the course.

What is here:

- ``deep_relu_stack``: a deep plain ReLU network (dense or 3x3 conv layers) to watch this.
- ``linear_layers``, ``activation_stats``: the std of each linear layer's output (the
  pre-activation, as in He et al.) on a batch, in forward order.
- ``gradient_stats``: the std of the cross-entropy's gradient on a labelled batch, per layer:
  with respect to the kernels (what SGD sees) or to the layers' outputs (the back-propagated
  signal of He et al.).
- ``propagation_stats``: all three from one forward and one backward pass (TensorFlow).
- ``sample_kernel``, ``sampled_std``: what a Keras initializer actually draws.
- ``predicted_preactivation_std``: the recursion above, to lay over the measurements.
- Figures (a separate section at the end): ``layer_stats_figure``, ``weight_histograms``.

Every model is called in inference mode (``training=False``): no dropout, batch norm (if any)
with its moving statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from allcnn_lib.initializers import get_initializer
from allcnn_lib.models import _initializer_for_layer

#: Layer types whose output is a pre-activation ("linear layers") in the course's models.
LINEAR_LAYER_TYPES = (keras.layers.Dense, keras.layers.Conv2D)

STACK_KINDS = ("dense", "conv")


# --------------------------------------------------------------------------- networks


def _layer_initializer(initializer: str | keras.initializers.Initializer, seed: int,
                       index: int) -> keras.initializers.Initializer:
    """Initializer for layer ``index``: a course name seeded ``seed + index``, or a copy of a
    Keras initializer with its integer seed advanced by ``index`` (so layers differ)."""
    if isinstance(initializer, str):
        return get_initializer(initializer, seed=seed + index)
    return _initializer_for_layer(initializer, index)


def deep_relu_stack(depth: int, width: int,
                    initializer: str | keras.initializers.Initializer = "he_normal", *,
                    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
                    kind: str = "dense", seed: int = 0) -> keras.Model:
    """A plain deep ReLU network: ``depth`` linear layers of ``width`` units, each followed by a
    ReLU, then a linear classifier and a softmax. No batch norm, no dropout, no skips: only the
    initialization decides how the signal's scale changes with depth.

    - ``kind="dense"``: the input is flattened; layers ``dense1 .. denseN`` (``Dense``), each
      followed by ``relu1 .. reluN``, then ``classifier`` (``Dense(num_classes)``).
    - ``kind="conv"``: layers ``conv1 .. convN`` (3x3 ``Conv2D``, ``same`` padding, stride 1),
      then ``classifier`` (1x1 conv to ``num_classes``) and global average pooling, as in
      All-CNN-C.

    ``initializer``: a course name (``allcnn_lib.initializers.get_initializer``: "gaussian",
    "glorot_normal", "he_uniform", ...) or a Keras initializer. Every layer, the classifier
    included, gets its own copy seeded ``seed + k``, so layers differ and a model is
    reproducible. Biases start at zero. The last layer is a ``softmax`` activation named
    ``softmax``, as in ``allcnn_lib.models``.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"need depth >= 1 and width >= 1, got depth={depth}, width={width}")
    if kind not in STACK_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(STACK_KINDS)}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if kind == "dense":
        if len(input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        for k in range(1, depth + 1):
            x = keras.layers.Dense(width, kernel_initializer=_layer_initializer(
                initializer, seed, k), name=f"dense{k}")(x)
            x = keras.layers.ReLU(name=f"relu{k}")(x)
        x = keras.layers.Dense(num_classes, kernel_initializer=_layer_initializer(
            initializer, seed, depth + 1), name="classifier")(x)
    else:
        if len(input_shape) != 3:
            raise ValueError(f"kind='conv' needs (height, width, channels) inputs, "
                             f"got {tuple(input_shape)}")
        for k in range(1, depth + 1):
            x = keras.layers.Conv2D(width, 3, padding="same", kernel_initializer=(
                _layer_initializer(initializer, seed, k)), name=f"conv{k}")(x)
            x = keras.layers.ReLU(name=f"relu{k}")(x)
        x = keras.layers.Conv2D(num_classes, 1, kernel_initializer=_layer_initializer(
            initializer, seed, depth + 1), name="classifier")(x)
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name=f"relu_stack_{kind}{depth}x{width}")


def linear_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's ``Dense`` and ``Conv2D`` layers in forward order (their outputs are the
    pre-activations in ``allcnn_lib.models`` and ``deep_relu_stack``)."""
    return [layer for layer in model.layers if isinstance(layer, LINEAR_LAYER_TYPES)]


def _select(model: keras.Model,
            layers: Sequence[str | keras.layers.Layer] | None) -> list[keras.layers.Layer]:
    if layers is None:
        chosen = linear_layers(model)
    else:
        chosen = [model.get_layer(lay) if isinstance(lay, str) else lay for lay in layers]
    if not chosen:
        raise ValueError(f"model {model.name!r} has no layers to measure")
    return chosen


def _np(x: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _std(x: Any) -> float:
    return float(np.std(_np(x), dtype=np.float64))


# --------------------------------------------------------------------------- statistics


def _probe(model: keras.Model, layers: Sequence[keras.layers.Layer]) -> keras.Model:
    """A model from the model's input(s) to the outputs of ``layers`` and the model's output."""
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [layer.output for layer in layers] + [model.output])


def activation_stats(model: keras.Model, batch: Any,
                     layers: Sequence[str | keras.layers.Layer] | None = None
                     ) -> dict[str, float]:
    """The standard deviation of each layer's output on ``batch``, in forward order.

    ``layers``: names or layers; default ``linear_layers(model)``, whose outputs are the
    pre-activations ``y_l`` of He et al. (pass ``reluK`` names for post-activations). The std
    is taken over all values of the output (examples, positions and channels), in float64.
    One probe model runs the batch once, in inference mode.
    """
    chosen = _select(model, layers)
    outputs = _probe(model, chosen)(batch, training=False)[:-1]
    return {layer.name: _std(out) for layer, out in zip(chosen, outputs, strict=True)}


def _loss(labels: Any, probabilities: Any, reduction: str) -> Any:
    losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    return keras.ops.sum(losses) if reduction == "sum" else keras.ops.mean(losses)


def _kernel_gradients(model: keras.Model, batch: Any, labels: Any) -> list[Any]:
    """d(mean cross-entropy)/d(variable) for every trainable variable (the model's order)."""
    backend = keras.backend.backend()
    variables = model.trainable_variables
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
    probe = _probe(model, layers)
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


GRADIENT_TARGETS = ("kernel", "output")


def gradient_stats(model: keras.Model, batch: Any, labels: Any,
                   layers: Sequence[str | keras.layers.Layer] | None = None, *,
                   wrt: str = "kernel") -> dict[str, float]:
    """The standard deviation of a gradient of the cross-entropy, per layer, in forward order.

    - ``wrt="kernel"``: the gradient of the batch's *mean* loss with respect to each layer's
      kernel, the update direction SGD sees. Runs on the TensorFlow (``tf.GradientTape``), JAX
      (``jax.grad`` of ``stateless_call``) and PyTorch (``loss.backward()``) backends.
    - ``wrt="output"``: the gradient of the batch's *summed* loss with respect to each layer's
      output (the back-propagated signal ``dL/dy_l`` of He et al., Section 2.2); with the sum,
      each example's entries are the gradient of its own loss, whatever the batch size.
      TensorFlow and PyTorch backends.

    The loss is the sparse categorical cross-entropy of the model's (softmax) output on
    ``batch`` against the integer ``labels``, in inference mode. ``layers``: names or layers;
    default ``linear_layers(model)``. A kernel that gets no gradient raises ``ValueError``.
    """
    if wrt not in GRADIENT_TARGETS:
        raise ValueError(f"unknown wrt {wrt!r}; choose one of {', '.join(GRADIENT_TARGETS)}")
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
        grad = by_path.get(kernel.path)
        if grad is None:
            raise ValueError(f"layer {layer.name!r}: its kernel got no gradient")
        stats[layer.name] = _std(grad)
    return stats


def propagation_stats(model: keras.Model, batch: Any, labels: Any,
                      layers: Sequence[str | keras.layers.Layer] | None = None
                      ) -> dict[str, dict[str, float]]:
    """All three statistics at once: ``{"activation": ..., "output_gradient": ...,
    "kernel_gradient": ...}``, each as ``activation_stats`` and ``gradient_stats`` (with
    ``wrt="output"`` and ``wrt="kernel"``) return them.

    On TensorFlow one forward and one backward pass give all three (the kernel gradient of the
    mean loss is that of the summed loss divided by the batch size); on other backends the three
    functions run one after the other. The layers must have kernels.
    """
    chosen = _select(model, layers)
    if keras.backend.backend() != "tensorflow":
        return {"activation": activation_stats(model, batch, chosen),
                "output_gradient": gradient_stats(model, batch, labels, chosen, wrt="output"),
                "kernel_gradient": gradient_stats(model, batch, labels, chosen)}
    import tensorflow as tf

    kernels = [getattr(layer, "kernel", None) for layer in chosen]
    if any(k is None for k in kernels):
        raise ValueError("propagation_stats needs layers with a kernel")
    probe = _probe(model, chosen)
    with tf.GradientTape() as tape:
        outputs = probe(batch, training=False)
        for out in outputs[:-1]:
            tape.watch(out)
        loss = _loss(labels, outputs[-1], "sum")
    grads = tape.gradient(loss, [*outputs[:-1], *kernels])
    n = len(chosen)
    size = int(outputs[-1].shape[0])
    names = [layer.name for layer in chosen]
    return {"activation": {nm: _std(o) for nm, o in zip(names, outputs[:-1], strict=True)},
            "output_gradient": {nm: _std(g) for nm, g in zip(names, grads[:n], strict=True)},
            "kernel_gradient": {nm: _std(g) / size
                                for nm, g in zip(names, grads[n:], strict=True)}}


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
    return _np(init(tuple(int(d) for d in shape), dtype="float32"))


def sampled_std(initializer: str | keras.initializers.Initializer, shape: Sequence[int],
                *, seed: int = 0) -> float:
    """The standard deviation of one kernel drawn by ``initializer`` (see ``sample_kernel``);
    compare it with ``allcnn_lib.initializers.expected_std``."""
    return float(np.std(sample_kernel(initializer, shape, seed=seed), dtype=np.float64))


def predicted_preactivation_std(weight_stds: Sequence[float], fan_ins: Sequence[int],
                                input_mean_square: float) -> np.ndarray:
    """The std of each layer's pre-activation that He et al.'s recursion predicts.

    ``Var(y_1) = n_1 Var(w_1) E[x_1^2]`` for the first layer, whose input (the image) is not a
    ReLU output, and ``Var(y_l) = n_l Var(w_l) Var(y_{l-1}) / 2`` after that (ReLU of a
    symmetric ``y_{l-1}``); ``n_l`` is the fan-in (``kh * kw * c_in`` for a conv),
    ``weight_stds`` the weights' stds and ``input_mean_square`` is ``E[x_1^2]`` of the input.
    Biases are taken as zero. Returns the stds ``sqrt(Var(y_l))``.
    """
    if len(weight_stds) != len(fan_ins) or not len(fan_ins):
        raise ValueError("need one weight std per fan-in, at least one layer")
    variances = []
    var = None
    for std, n in zip(weight_stds, fan_ins, strict=True):
        factor = n * float(std) ** 2
        var = factor * float(input_mean_square) if var is None else factor * var / 2.0
        variances.append(var)
    return np.sqrt(np.asarray(variances, dtype=np.float64))


# --------------------------------------------------------------------------- figures
# Figure helpers for these statistics live here while allcnn_lib.plots is being rewritten;
# they follow its conventions: one figure, a title, labelled axes, the Figure returned.


def layer_stats_figure(stats: Mapping[str, Mapping[str, float]], *, title: str, ylabel: str,
                       xlabel: str = "layer (forward order)",
                       predicted: Mapping[str, Sequence[float]] | None = None,
                       log: bool = True, legend: bool = True, ax=None):
    """One line per initializer of a per-layer statistic (e.g. ``activation_stats``).

    ``stats``: initializer label -> {layer name: value}; all with the same layers. With few
    layers (12 or fewer) the x ticks are the layer names, else the layer numbers (1 = first).
    ``predicted``: label -> values per layer, drawn dashed in the same colour (theory).
    ``log``: a logarithmic y axis (the values span orders of magnitude). ``legend``: False
    leaves it out (e.g. on the second panel of a figure whose first panel has it). ``ax``: draw
    into an existing axes (the figure is then the axes' figure, and its layout is left to the
    caller). Returns the figure.
    """
    import matplotlib.pyplot as plt

    if not stats:
        raise ValueError("nothing to plot")
    own_figure = ax is None
    fig, ax = plt.subplots(figsize=(7.5, 4.4)) if own_figure else (ax.figure, ax)
    names = list(next(iter(stats.values())))
    x = np.arange(1, len(names) + 1)
    markers = "osD^vP*X"
    for i, (label, values) in enumerate(stats.items()):
        if list(values) != names:
            raise ValueError(f"{label!r} has layers {list(values)}, expected {names}")
        line, = ax.plot(x, [values[n] for n in names], marker=markers[i % len(markers)],
                        ms=4, lw=1.5, label=label)
        if predicted is not None and label in predicted:
            ax.plot(x, np.asarray(predicted[label], float), ls="--", lw=1.2,
                    color=line.get_color(), alpha=0.8)
    if predicted:
        ax.plot([], [], ls="--", color="grey", label="predicted (He et al., Eq. 9)")
    if log:
        ax.set_yscale("log")
    if len(names) <= 12:
        ax.set_xticks(x, names)
        ax.tick_params(axis="x", labelsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=9)
    if own_figure:  # with ``ax`` the caller lays out its figure once, at the end
        fig.tight_layout()
    return fig


def weight_histograms(samples: Mapping[str, np.ndarray], *, title: str, bins: int = 120,
                      xlabel: str = "weight value"):
    """Overlaid density histograms of sampled kernels (label -> array of weights), each with
    its std in the legend. Returns the figure."""
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("nothing to plot")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    limit = max(float(np.max(np.abs(w))) for w in samples.values())
    edges = np.linspace(-limit, limit, bins + 1)
    for label, w in samples.items():
        w = np.asarray(w, np.float64).ravel()
        ax.hist(w, bins=edges, density=True, histtype="step", lw=1.5,
                label=f"{label} (std {w.std():.4f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (1 / weight unit)")
    ax.set_title(title)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig
