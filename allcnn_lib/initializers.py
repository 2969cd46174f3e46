"""Weight initializers: the course's named initializers (notebook 02 derives their stds), LSUV
(Mishkin & Matas 2015, Algorithm 1; notebook 03) and patch-whitening filters for conv1
(airbench)."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

from allcnn_lib.runs import INITIALIZERS as _CHOICES

#: The named initializers (``runs.INITIALIZERS`` less LSUV, which starts from orthogonal).
INITIALIZERS = tuple(name for name in _CHOICES if name != "lsuv")
GAUSSIAN_STD = 0.01  # Caffe's gaussian filler, std 0.01


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in INITIALIZERS:
        raise ValueError(f"unknown initializer {name!r}; choose one of: {', '.join(INITIALIZERS)}")
    return key


def get_initializer(name: str | keras.initializers.Initializer,
                    seed: int | None = None) -> keras.initializers.Initializer:
    """A Keras initializer by course name (orthogonal with gain 1); an instance passes."""
    if isinstance(name, keras.initializers.Initializer):
        return name
    if not isinstance(name, str):
        raise TypeError(f"initializer must be a name or an Initializer, got {name!r}")
    if _key(name) == "gaussian":
        return keras.initializers.RandomNormal(0.0, GAUSSIAN_STD, seed=seed)
    return type(keras.initializers.get(_key(name)))(seed=seed)


# --------------------------------------------------------------------------- LSUV


def lsuv(model: keras.Model, batch, *, tol_var: float = 0.1, t_max: int = 10,
         seed: int | None = None) -> dict[str, dict[str, float]]:
    """LSUV, Mishkin & Matas (2015), Algorithm 1, on ``model`` in place.

    Feeds ``batch`` forward through the layers in order (inference mode). Each conv or dense
    layer gets an orthonormal kernel (Saxe et al. 2014; Keras' ``Orthogonal``) and a zero bias;
    then, while |Var(B) - 1| >= Tol_var and fewer than T_max divisions, its kernel is divided by
    √Var(B), B the layer's output. ``model`` must be a chain of layers, as in
    ``allcnn_lib.models``. Returns, per layer: Var(B) before and after, the number of divisions
    and their product (scale). Warns (RuntimeWarning) where Var(B) is 0 or not finite.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0] if len(model.inputs) == 1 else None
    for layer in layers:  # a chain: each layer reads the output of the one before
        if layer.input is not previous:
            raise ValueError(f"lsuv needs a chain of layers; {model.name!r} branches at "
                             f"{layer.name!r}")
        previous = layer.output
    orthonormal = keras.initializers.Orthogonal(seed=keras.random.SeedGenerator(seed))
    x = keras.ops.convert_to_tensor(np.asarray(batch, np.float32))
    report, variance = {}, lambda b: float(keras.ops.var(keras.ops.cast(b, "float32")))
    for layer in layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            x = layer(x, training=False)
            continue
        layer.kernel.assign(orthonormal(layer.kernel.shape))
        if layer.bias is not None:
            layer.bias.assign(keras.ops.zeros(layer.bias.shape))
        x_in, x = x, layer(x, training=False)
        var = var_before = variance(x)
        iterations, scale = 0, 1.0
        while abs(var - 1.0) >= tol_var and iterations < t_max and 0 < var < math.inf:
            layer.kernel.assign(layer.kernel / math.sqrt(var))
            scale, iterations = scale / math.sqrt(var), iterations + 1
            x = layer(x_in, training=False)
            var = variance(x)
        if not 0 < var < math.inf:
            warnings.warn(f"lsuv: {layer.name} outputs variance {var:g} on this batch (dead or "
                          "overflowing); it was left there", RuntimeWarning, stacklevel=2)
        report[layer.name] = {"var_before": var_before, "var_after": var,
                              "iterations": iterations, "scale": scale}
    return report


# --------------------------------------------------------------------------- patch whitening


def patch_whitening_kernel(images: np.ndarray, kernel_size: int = 3, *, epsilon: float = 5e-4,
                           patches: int = 20_000, seed: int = 0) -> np.ndarray:
    """First-conv filters from ZCA fitted on ``patches`` random k x k patches of ``images``
    (Page 2018; Jordan 2024, airbench; ``epsilon`` theirs): each row of the whitening matrix,
    then its negative (a ReLU passes both signs), a (k, k, C, 2 k² C) kernel."""
    from allcnn_lib.preprocessing import ZCAWhitening

    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    k = int(kernel_size)
    i = rng.integers(0, n, patches)
    y = rng.integers(0, h - k + 1, patches)[:, None, None] + np.arange(k)[None, :, None]
    x = rng.integers(0, w - k + 1, patches)[:, None, None] + np.arange(k)[None, None, :]
    sample = np.asarray(images[i[:, None, None], y, x], np.float32)  # (P, k, k, C)
    filters = ZCAWhitening(epsilon).fit(sample).whitening_matrix_.reshape(-1, k, k, c)
    kernel = np.moveaxis(filters, 0, -1)  # (k, k, C, k*k*C)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def whiten_first_conv(model: keras.Model, images: np.ndarray, *, seed: int = 0) -> int:
    """Set the first filters of the first conv to ``patch_whitening_kernel(images)``, scaled to
    the RMS of its initial kernel; returns the number of filters set."""
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    kernel = keras.ops.convert_to_numpy(conv.kernel).copy()
    whitening = patch_whitening_kernel(images, kernel.shape[0], seed=seed)
    whitening *= np.sqrt(np.mean(kernel**2) / np.mean(whitening**2))
    count = min(whitening.shape[-1], kernel.shape[-1])
    kernel[..., :count] = whitening[..., :count]
    conv.kernel.assign(kernel)
    return count
