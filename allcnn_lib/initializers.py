"""Weight initializers: the course's named initializers and their stds (notebook 02), LSUV
(Mishkin & Matas 2015, Algorithm 1; notebook 03) beside the seed repository's versions, and
patch-whitening filters for conv1 (airbench)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import keras
import numpy as np

from allcnn_lib.runs import INITIALIZERS as _CHOICES

#: The named initializers (``runs.INITIALIZERS`` less LSUV, which starts from orthogonal).
INITIALIZERS = tuple(name for name in _CHOICES if name != "lsuv")
UNIFORM_INITIALIZERS = ("glorot_uniform", "he_uniform")
GAUSSIAN_STD = 0.01  # Caffe's gaussian filler, std 0.01
LSUV_LAYER_TYPES = (keras.layers.Conv2D, keras.layers.Dense)


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


def fans(kernel_shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` as Keras counts them: ``(kh*kw*cin, kh*kw*cout)`` for a conv."""
    shape = tuple(int(d) for d in kernel_shape)
    if len(shape) < 2:
        return (shape[0], shape[0]) if shape else (1, 1)
    return shape[-2] * math.prod(shape[:-2]), shape[-1] * math.prod(shape[:-2])


def expected_std(name: str, fan_in: int, fan_out: int, *, columns: int | None = None) -> float:
    """The std of initializer ``name``: Glorot √(2 / (fan_in + fan_out)), He √(2 / fan_in)
    (normal and uniform alike), gaussian 0.01, orthogonal 1 / √max(fan_in, columns)."""
    key = _key(name)
    if key == "gaussian":
        return GAUSSIAN_STD
    if key.startswith("glorot"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    if key.startswith("he"):
        return math.sqrt(2.0 / fan_in)
    return 1.0 / math.sqrt(max(fan_in, fan_out if columns is None else columns))


def uniform_limit(name: str, fan_in: int, fan_out: int) -> float:
    """The bound ``l`` of ``glorot_uniform`` or ``he_uniform`` (U[-l, l] has std l / √3)."""
    if _key(name) not in UNIFORM_INITIALIZERS:
        raise ValueError(f"{name!r} is not one of {', '.join(UNIFORM_INITIALIZERS)}")
    return math.sqrt(3.0) * expected_std(name, fan_in, fan_out)


# --------------------------------------------------------------------------- orthonormal kernels


def orthonormal_kernel(shape: Sequence[int],
                       rng: np.random.Generator | int | None = None) -> np.ndarray:
    """An orthonormal channels-last kernel (Saxe et al. 2014), LSUV's pre-initialization: as
    Keras' ``Orthogonal``, the (kh*kw*cin, cout) matrix has orthonormal columns, or rows when
    there are more filters than inputs (conv1: 27 inputs, 96 filters)."""
    shape = tuple(int(d) for d in shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    a = np.random.default_rng(rng).standard_normal((max(rows, cols), min(rows, cols)))
    q, r = (keras.ops.convert_to_numpy(t) for t in keras.ops.qr(a.astype(np.float32)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0).astype(q.dtype)
    return (q if rows >= cols else q.T).reshape(shape).astype(np.float32)


def seed_orthonormal(shape: Sequence[int],
                     rng: np.random.Generator | int | None = None) -> np.ndarray:
    """The seed's (and LSUV-keras') ``svd_orthonormal``, kept to show its bug: it flattens to
    ``(shape[0], rest)``, one row per filter for Theano's (cout, cin, kh, kw) but ``kh`` rows
    for Keras' (kh, kw, cin, cout), so the filters are not orthonormal."""
    flat_shape = (shape[0], math.prod(shape[1:]))
    u, _, v = np.linalg.svd(np.random.default_rng(rng).standard_normal(flat_shape),
                            full_matrices=False)
    return (u if u.shape == flat_shape else v).reshape(shape).astype(np.float32)


def orthonormality_error(kernel: np.ndarray, *, equal_norms: bool = False) -> float:
    """``max |G - I|`` for the Gram matrix G of the filters (rows when cout > fan_in); with
    ``equal_norms`` G is first divided by its mean diagonal (orthogonal up to one scale)."""
    w = np.asarray(kernel, np.float64).reshape(-1, np.shape(kernel)[-1])
    gram = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T
    gram = gram / np.mean(np.diag(gram)) if equal_norms else gram
    return float(np.max(np.abs(gram - np.eye(len(gram)))))


# --------------------------------------------------------------------------- LSUV


def lsuv(model: keras.Model, batch, *, tol_var: float = 0.1, t_max: int = 10,
         seed: int | None = None) -> dict[str, dict[str, float]]:
    """LSUV, Mishkin & Matas (2015), Algorithm 1, on ``model`` in place.

    Walks the layers in order, feeding ``batch`` forward (inference mode). Each conv or dense
    layer gets an orthonormal kernel and a zero bias; then, while |Var(B) - 1| >= Tol_var and
    fewer than T_max divisions, its kernel is divided by √Var(B), B the layer's output. Needs a
    chain of layers, as in ``allcnn_lib.models``. Returns, per layer: Var(B) before and after,
    the number of divisions and their product (scale).
    """
    rng = np.random.default_rng(seed)
    x = keras.ops.convert_to_tensor(np.asarray(batch, np.float32))
    report = {}
    for layer in _chain(model):
        if not isinstance(layer, LSUV_LAYER_TYPES):
            x = layer(x, training=False)
            continue
        layer.kernel.assign(orthonormal_kernel(layer.kernel.shape, rng))
        if layer.bias is not None:
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
        x_in, x = x, layer(x, training=False)
        var = var_before = _variance(x)
        iterations, scale = 0, 1.0
        while abs(var - 1.0) >= tol_var and iterations < t_max:
            if not 0 < var < math.inf:  # a dead layer or an overflow: nothing to divide by
                warnings.warn(f"LSUV: layer {layer.name!r} has output variance {var:.3g}; "
                              "left unscaled", RuntimeWarning, stacklevel=2)
                break
            layer.kernel.assign(layer.kernel / math.sqrt(var))
            scale, iterations = scale / math.sqrt(var), iterations + 1
            x = layer(x_in, training=False)
            var = _variance(x)
        report[layer.name] = {"var_before": var_before, "var_after": var,
                              "iterations": iterations, "scale": scale}
    return report


def _variance(y) -> float:
    """Var over all values, in float32 (bfloat16 under mixed precision)."""
    return float(keras.ops.convert_to_numpy(keras.ops.var(keras.ops.cast(y, "float32"))))


def _chain(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers after its input, checked to form a chain (each reads the one before)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0] if len(model.inputs) == 1 else None
    for layer in layers:
        if layer.input is not previous:
            raise ValueError(f"lsuv needs a chain of layers with one input; {model.name!r} "
                             f"branches at layer {layer.name!r}")
        previous = layer.output
    return layers


def lsuv_seed_rebuild(model: keras.Model, batch, *, tol_var: float = 0.1, t_max: int = 10,
                      seed: int | None = None,
                      orthonormal: Callable[..., np.ndarray] = seed_orthonormal
                      ) -> dict[str, dict[str, float]]:
    """The seed repository's LSUV (after LSUV-keras), slow by design: it skips layers with fewer
    than 32 outputs per image, pre-initializes with ``orthonormal``, and builds a new model and
    calls ``predict`` to measure Var on every iteration. Returns ``lsuv``'s report."""
    rng = np.random.default_rng(seed)
    report = {}
    for layer in model.layers:
        if not isinstance(layer, LSUV_LAYER_TYPES) or math.prod(layer.output.shape[1:]) < 32:
            continue
        probe = keras.Model(model.inputs, layer.output)
        layer.kernel.assign(orthonormal(layer.kernel.shape, rng))
        var = var_before = float(np.var(probe.predict(batch, verbose=0)))
        iterations, scale = 0, 1.0
        while abs(var - 1.0) > tol_var and iterations < t_max and math.sqrt(var) >= 1e-7:
            layer.kernel.assign(layer.kernel / math.sqrt(var))
            scale, iterations = scale / math.sqrt(var), iterations + 1
            probe = keras.Model(model.inputs, layer.output)  # rebuilt, as the seed does
            var = float(np.var(probe.predict(batch, verbose=0)))
        report[layer.name] = {"var_before": var_before, "var_after": var,
                              "iterations": iterations, "scale": scale}
    return report


def lsuv_table(report: dict[str, dict[str, float]]) -> str:
    """An aligned text table of an ``lsuv`` report, one line per layer."""
    lines = [f"{'layer':8s} {'Var before':>10s} {'Var after':>10s} {'divisions':>9s} "
             f"{'scale':>7s}"]
    lines += [f"{name:8s} {r['var_before']:10.4g} {r['var_after']:10.4f} "
              f"{r['iterations']:9d} {r['scale']:7.4g}" for name, r in report.items()]
    return "\n".join(lines)


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
