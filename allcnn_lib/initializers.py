"""Weight initializers for the course: named Keras initializers and LSUV.

``get_initializer(name)`` gives the initializers that the notebooks compare: ``"gaussian"`` (a
fixed N(0, 0.01^2), the usual Caffe ``gaussian`` filler setting of the papers' era), Glorot &
Bengio's ``"glorot_normal"`` / ``"glorot_uniform"``, He et al.'s ``"he_normal"`` /
``"he_uniform"`` and Saxe et al.'s ``"orthogonal"``. ``expected_std`` gives the standard
deviation each one should have, from the formulas in Keras' ``random_initializers.py``.

``lsuv(model, batch)`` is Layer-Sequential Unit-Variance initialization, Algorithm 1 of Mishkin &
Matas (2015), "All you need is a good init":

1. pre-initialize every conv and dense kernel with an orthonormal matrix (Saxe et al. 2014);
2. for each such layer L, in forward order: while ``|Var(B_L) - 1| >= Tol_var`` and fewer than
   ``T_max`` iterations, forward the mini-batch, compute the variance of L's output ``B_L``
   and divide L's kernel by ``sqrt(Var(B_L))``.

``B_L`` is the layer's own output: in ``allcnn_lib.models`` every conv is linear and followed by
a separate ReLU (and, with batch norm, a ``BatchNormalization`` in between), so LSUV normalizes
the pre-activation and batch norm does not hide the scale.

``lsuv_seed_rebuild`` re-implements the approach of the seed repository (after LSUV-keras,
``ducha-aiki/LSUV-keras``): it rebuilds a probe model and runs ``predict`` on every iteration and
uses ``seed_orthonormal``, whose reshape is right for Theano's (cout, cin, kh, kw) kernels but
mixes the axes of Keras' channels-last (kh, kw, cin, cout) kernels, so its filters are not
orthogonal. It is kept for the benchmark and the notebook that compares the two.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

# --------------------------------------------------------------------------- patch whitening

#: Added to the eigenvalues of the 3x3 patch covariance (airbench's value, on standardized
#: pixels): directions weaker than this are not amplified beyond 1 / sqrt(5e-4) ~ 45x.
PATCH_WHITENING_EPSILON = 5e-4


def patch_whitening_kernel(images: np.ndarray, kernel_size: int = 3, *,
                           epsilon: float = PATCH_WHITENING_EPSILON, patches: int = 20_000,
                           seed: int = 0) -> np.ndarray:
    """Whitening filters for a first conv layer, from ZCA fitted on image patches.

    ``patches`` random ``kernel_size`` x ``kernel_size`` patches of the (preprocessed, float)
    training ``images`` (N, H, W, C) are whitened with ``ZCAWhitening`` (notebook 04), and each
    row of its whitening matrix becomes one filter, followed by its negative (so that a ReLU
    passes both signs): a kernel of shape ``(k, k, C, 2 k^2 C)``, 54 filters for 3x3 RGB. The
    conv's output is then the ZCA-whitened patch around each pixel (Page 2018; Jordan 2024,
    airbench).
    """
    from allcnn_lib.preprocessing import ZCAWhitening

    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    k = int(kernel_size)
    i = rng.integers(0, n, patches)
    y = rng.integers(0, h - k + 1, patches)[:, None, None] + np.arange(k)[None, :, None]
    x = rng.integers(0, w - k + 1, patches)[:, None, None] + np.arange(k)[None, None, :]
    sample = np.asarray(images[i[:, None, None], y, x], np.float32)  # (P, k, k, C)
    zca = ZCAWhitening(epsilon=epsilon, mode="zca").fit(sample)
    filters = zca.whitening_matrix_.reshape(-1, k, k, c)  # row d: the filter of output d
    kernel = np.moveaxis(filters, 0, -1)  # (k, k, C, k*k*C)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def whiten_first_conv(model: keras.Model, images: np.ndarray, *, seed: int = 0) -> int:
    """Set the first filters of the model's first conv to ``patch_whitening_kernel`` of
    ``images``, scaled as a whole to the RMS of the initial kernel (the whitening holds up to
    that one factor; weight decay then sees ordinary weights); the remaining filters keep their
    initialization. Returns the number of filters set."""
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    kernel = keras.ops.convert_to_numpy(conv.kernel).copy()
    whitening = patch_whitening_kernel(images, kernel.shape[0], seed=seed)
    whitening *= np.sqrt(np.mean(kernel**2) / np.mean(whitening**2))
    count = min(whitening.shape[-1], kernel.shape[-1])
    kernel[..., :count] = whitening[..., :count]
    conv.kernel.assign(kernel)
    return count


# --------------------------------------------------------------------------- named initializers

#: Standard deviation of the "gaussian" initializer: Caffe's ``gaussian`` filler with ``std:
#: 0.01``, the common setting when the All-CNN and LSUV papers were written.
GAUSSIAN_STD = 0.01

#: Name -> factory ``f(seed) -> Initializer``. Keras initializers with an integer seed draw the
#: same numbers on every call; ``seed=None`` draws fresh numbers each time.
INITIALIZERS: dict[str, Callable[[int | None], keras.initializers.Initializer]] = {
    "gaussian": lambda seed: keras.initializers.RandomNormal(0.0, GAUSSIAN_STD, seed=seed),
    "glorot_normal": lambda seed: keras.initializers.GlorotNormal(seed=seed),
    "glorot_uniform": lambda seed: keras.initializers.GlorotUniform(seed=seed),
    "he_normal": lambda seed: keras.initializers.HeNormal(seed=seed),
    "he_uniform": lambda seed: keras.initializers.HeUniform(seed=seed),
    "orthogonal": lambda seed: keras.initializers.Orthogonal(gain=1.0, seed=seed),
}

UNIFORM_INITIALIZERS = ("glorot_uniform", "he_uniform")


def _normalize_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get_initializer(name_or_obj: str | keras.initializers.Initializer,
                    seed: int | None = None) -> keras.initializers.Initializer:
    """A Keras initializer by course name (see ``INITIALIZERS``); an ``Initializer`` instance is
    returned unchanged (``seed`` is then ignored)."""
    if isinstance(name_or_obj, keras.initializers.Initializer):
        return name_or_obj
    if not isinstance(name_or_obj, str):
        raise TypeError(f"initializer must be a name or a keras.initializers.Initializer, "
                        f"got {type(name_or_obj).__name__}")
    key = _normalize_name(name_or_obj)
    if key not in INITIALIZERS:
        raise ValueError(f"unknown initializer {name_or_obj!r}; choose one of: "
                         f"{', '.join(INITIALIZERS)}")
    return INITIALIZERS[key](seed)


def fans(kernel_shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel, as Keras' ``compute_fans`` counts them.

    Conv kernel (kh, kw, cin, cout): ``fan_in = kh*kw*cin``, ``fan_out = kh*kw*cout``; dense
    kernel (n_in, n_out): ``(n_in, n_out)``; a vector of length n: ``(n, n)``.
    """
    shape = tuple(int(d) for d in kernel_shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def expected_std(name: str, fan_in: int, fan_out: int, *, columns: int | None = None) -> float:
    """The standard deviation that initializer ``name`` gives a kernel with these fans.

    The formulas are those of Keras 3 (``keras/src/initializers/random_initializers.py``):

    - ``gaussian``: 0.01;
    - ``glorot_normal``: ``sqrt(2 / (fan_in + fan_out))``. Keras draws from a normal truncated
      at 2 standard deviations with ``stddev / 0.87962566103423978``, which restores this std;
    - ``glorot_uniform``: uniform on ``[-l, l]``, ``l = sqrt(6 / (fan_in + fan_out))``; std
      ``l / sqrt(3)``, the same as Glorot normal;
    - ``he_normal``: ``sqrt(2 / fan_in)`` (truncated and rescaled like Glorot normal);
    - ``he_uniform``: ``l = sqrt(6 / fan_in)``, std ``l / sqrt(3) = sqrt(2 / fan_in)``;
    - ``orthogonal`` (gain 1): Keras flattens the kernel to ``(fan_in, columns)``, columns =
      the last axis (``cout`` of a conv; defaults to ``fan_out``, right for dense kernels), and
      makes the shorter side orthonormal, so every entry has RMS ``1 / sqrt(max(fan_in,
      columns))``.
    """
    key = _normalize_name(name)
    if key == "gaussian":
        return GAUSSIAN_STD
    if key in ("glorot_normal", "glorot_uniform"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    if key in ("he_normal", "he_uniform"):
        return math.sqrt(2.0 / fan_in)
    if key == "orthogonal":
        return 1.0 / math.sqrt(max(fan_in, fan_out if columns is None else columns))
    raise ValueError(f"unknown initializer {name!r}; choose one of: {', '.join(INITIALIZERS)}")


def uniform_limit(name: str, fan_in: int, fan_out: int) -> float:
    """The bound ``l`` of a uniform initializer (``glorot_uniform`` or ``he_uniform``)."""
    key = _normalize_name(name)
    if key not in UNIFORM_INITIALIZERS:
        raise ValueError(f"{name!r} is not a uniform initializer; "
                         f"choose one of: {', '.join(UNIFORM_INITIALIZERS)}")
    return math.sqrt(3.0) * expected_std(key, fan_in, fan_out)


# --------------------------------------------------------------------------- orthonormal kernels


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def orthonormal_kernel(shape: Sequence[int],
                       rng: np.random.Generator | int | None = None) -> np.ndarray:
    """An orthonormal kernel for channels-last weights (Saxe et al. 2014; LSUV's pre-init).

    The kernel (kh, kw, cin, cout) is seen as the matrix ``W`` of shape (kh*kw*cin, cout):
    fan-in by filters, one column per filter. When ``cout <= fan_in`` the columns are
    orthonormal (``W.T @ W = I``); otherwise (e.g. conv1: 27 inputs, 96 filters) there are more
    filters than dimensions and the rows are orthonormal instead (``W @ W.T = I``). A dense
    kernel (n_in, n_out) is treated the same way. This is the layout of Keras' own
    ``Orthogonal`` initializer; here the Gaussian matrix comes from ``rng`` (numpy, so a seed
    gives the same kernel on every backend) and its QR from the backend.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"an orthonormal kernel needs at least 2 dimensions, got {shape}")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    q = _orthonormal_columns(_rng(rng).standard_normal((max(rows, cols), min(rows, cols))))
    w = q if rows >= cols else q.T
    return w.reshape(shape).astype(np.float32)


def _orthonormal_columns(a: np.ndarray) -> np.ndarray:
    """The Q of ``a = QR`` (reduced) with R's diagonal made positive, so that Q is
    Haar-distributed when ``a`` is Gaussian (Mezzadri 2007).

    The QR runs on the Keras backend (``keras.ops.qr``, float32): numpy's multi-threaded LAPACK
    QR took 1-5 s for All-CNN-C's nine kernels on a loaded 2-core machine, TensorFlow's 0.3 s.
    """
    q, r = keras.ops.qr(keras.ops.convert_to_tensor(np.asarray(a, np.float32)), mode="reduced")
    q, r = _np(q), _np(r)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0).astype(q.dtype)


def seed_orthonormal(shape: Sequence[int],
                     rng: np.random.Generator | int | None = None) -> np.ndarray:
    """The seed's (and LSUV-keras') ``svd_orthonormal``, kept to show its bug.

    It flattens the kernel to ``(shape[0], prod(shape[1:]))`` and makes the shorter side
    orthonormal. For Theano's (cout, cin, kh, kw) kernels that is one row per filter, right.
    For Keras' channels-last (kh, kw, cin, cout) it is ``kh`` orthonormal rows of length
    ``kw*cin*cout``: the filters are then neither orthogonal nor of equal norm; the kernel is
    close to i.i.d. Gaussian with std ``1/sqrt(kw*cin*cout)``. Dense kernels (n_in, n_out) come
    out right.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"an orthonormal kernel needs at least 2 dimensions, got {shape}")
    flat_shape = (shape[0], math.prod(shape[1:]))
    a = _rng(rng).standard_normal(flat_shape)
    u, _, v = np.linalg.svd(a, full_matrices=False)
    q = u if u.shape == flat_shape else v
    return q.reshape(shape).astype(np.float32)


def orthonormality_error(kernel: np.ndarray, *, equal_norms: bool = False) -> float:
    """``max |G - I|`` for the Gram matrix ``G`` of the kernel's filters (columns of the
    (fan_in, cout) matrix; rows when cout > fan_in). With ``equal_norms``, ``G`` is first
    divided by its mean diagonal, so ``W.T @ W = c * I`` for any ``c > 0`` gives 0."""
    kernel = np.asarray(kernel, np.float64)
    w = kernel.reshape(-1, kernel.shape[-1])
    gram = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T
    if equal_norms:
        gram = gram / np.mean(np.diag(gram))
    return float(np.max(np.abs(gram - np.eye(len(gram)))))


# --------------------------------------------------------------------------- LSUV report

#: Record statuses: ``ok`` converged; the rest leave a note (and, but for ``skipped``, a warning).
OK, NOT_CONVERGED, SKIPPED, ZERO_VARIANCE, NON_FINITE, UNREACHABLE = (
    "ok", "not converged", "skipped", "zero variance", "non-finite", "no single output")


@dataclass
class LSUVRecord:
    """One layer's line of an LSUV report."""

    name: str
    kind: str
    output_shape: tuple
    var_before: float  # output variance after the orthonormal pre-init, before any scaling
    var_after: float  # output variance when LSUV left the layer
    iterations: int  # kernel divisions by sqrt(Var)
    scale: float  # product of the factors the kernel was multiplied by
    status: str = OK

    @property
    def skipped(self) -> bool:
        """Left unscaled: too small, zero/non-finite variance or no single output."""
        return self.status not in (OK, NOT_CONVERGED)

    @property
    def warned(self) -> bool:
        """A warning was issued for this layer."""
        return self.status not in (OK, SKIPPED)

    @property
    def converged(self) -> bool:
        return self.status == OK

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "kind": self.kind,
                "output_shape": list(self.output_shape),
                "var_before": self.var_before, "var_after": self.var_after,
                "iterations": self.iterations, "scale": self.scale, "status": self.status,
                "skipped": self.skipped, "warned": self.warned}


@dataclass
class LSUVReport:
    """What ``lsuv`` did, one ``LSUVRecord`` a layer, in forward order."""

    records: list[LSUVRecord] = field(default_factory=list)
    tol_var: float = 0.1
    t_max: int = 10
    method: str = "lsuv"
    seconds: float = 0.0

    def __iter__(self) -> Iterator[LSUVRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | slice | str) -> LSUVRecord | list[LSUVRecord]:
        """A record by position (or a list of them by slice) or by layer name."""
        if isinstance(key, str):
            for record in self.records:
                if record.name == key:
                    return record
            raise KeyError(key)
        return self.records[key]

    @property
    def layer_names(self) -> list[str]:
        return [r.name for r in self.records]

    def as_rows(self) -> list[dict[str, Any]]:
        """One dict a layer (e.g. for ``pandas.DataFrame`` or JSON)."""
        return [r.as_dict() for r in self.records]

    def to_text(self) -> str:
        """An aligned table: layer, kind, Var before, Var after, iterations, scale, status."""
        header = ("layer", "kind", "output", "Var before", "Var after", "iters", "scale",
                  "status")
        rows = [(r.name, r.kind, "x".join(str(d) for d in r.output_shape),
                 f"{r.var_before:.4g}", f"{r.var_after:.4f}", str(r.iterations),
                 f"{r.scale:.4g}", r.status) for r in self.records]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        left = {0, 1, 2, 7}

        def line(row: Sequence[str]) -> str:
            cells = [c.ljust(w) if i in left else c.rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            return "  ".join(cells).rstrip()

        title = (f"{self.method}: Tol_var={self.tol_var}, T_max={self.t_max}, "
                 f"{len(self.records)} layers, {self.seconds:.2f} s")
        rule = "-" * len(line(header))
        return "\n".join([title, line(header), rule, *(line(row) for row in rows)])

    def __str__(self) -> str:
        return self.to_text()


# --------------------------------------------------------------------------- LSUV

#: Layer types that LSUV initializes: kernels (..., fan-in axis, filters axis) and a linear map.
LSUV_LAYER_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                    keras.layers.Dense)

#: Below this output variance a layer counts as dead (dividing by sqrt(Var) would explode).
MIN_VARIANCE = 1e-12


def lsuv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The conv and dense layers of ``model`` that LSUV visits, in the model's (forward) order."""
    return [layer for layer in model.layers if isinstance(layer, LSUV_LAYER_TYPES)]


def _variable(layer: keras.layers.Layer, name: str):
    for variable in layer.weights:
        if variable.name == name:
            return variable
    return None


def _variance(y) -> float:
    """Var over every element of a layer's output (Algorithm 1 pools batch, space, channels).
    ``ops.moments`` is one fused pass on TensorFlow (``ops.var`` takes about 1.6x as long).
    Half-precision outputs (a mixed-precision policy) are measured in float32."""
    if keras.backend.standardize_dtype(y.dtype) not in ("float32", "float64"):
        y = keras.ops.cast(y, "float32")
    _, var = keras.ops.moments(y, axes=list(range(len(y.shape))))
    return float(_np(var))


def _as_inputs(model: keras.Model, batch) -> list:
    items = list(batch) if isinstance(batch, list | tuple) else [batch]
    if len(items) != len(model.inputs):
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs, "
                         f"the batch gives {len(items)}")
    return [np.asarray(x, dtype=t.dtype or "float32") for x, t in zip(items, model.inputs,
                                                                       strict=True)]


class _NoGrad:
    """``torch.no_grad()`` on the torch backend (probe calls build no autograd graph); else
    nothing."""

    def __enter__(self):
        self._ctx = None
        if keras.backend.backend() == "torch":
            import torch

            self._ctx = torch.no_grad()
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def _single_output(layer: keras.layers.Layer):
    try:
        return layer.output
    except (AttributeError, ValueError):
        return None


def _build_probes(model: keras.Model, layers: list[keras.layers.Layer]) -> list:
    """For each layer, ``(sources, probe)``: a model from ``sources`` (indices into ``layers``,
    ``-1`` for the model inputs) to the layer's input, built once.

    The probe starts from the previous LSUV layer's output when the graph allows that (a plain
    chain such as All-CNN-C), so the whole pass forwards the batch through the network once;
    otherwise (skip connections) from the model inputs plus every earlier LSUV layer's output.
    """
    probes = []
    for k, layer in enumerate(layers):
        target = layer.input
        candidates = [[k - 1]] if k > 0 else []
        candidates.append([-1, *range(k)])
        for sources in candidates:
            tensors = []
            for s in sources:
                tensors.extend(model.inputs if s < 0 else [layers[s].output])
            try:
                probe = keras.Model(tensors, target, name=f"lsuv_probe_{layer.name}")
            except ValueError:
                continue
            probes.append((sources, probe))
            break
        else:  # pragma: no cover - the model inputs always reach an input of the model
            raise ValueError(f"cannot reach the input of layer {layer.name!r} from the model")
    return probes


#: Layers that commute with multiplying their input by a constant c > 0 at inference:
#: f(c * x) = c * f(x). Between two LSUV layers these let a pending scale travel unapplied.
_SCALE_COMMUTING_LAYERS = tuple(getattr(keras.layers, name) for name in (
    "InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianDropout", "AlphaDropout", "GaussianNoise", "Flatten", "Reshape", "Permute",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D",
    "Cropping3D", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
    "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D") if hasattr(keras.layers, name))


def _homogeneous_activation(activation) -> bool:
    """ReLU and the identity: act(c * z) = c * act(z) for c > 0."""
    return activation in (None, keras.activations.linear, keras.activations.relu)


def _commutes_with_scale(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, _SCALE_COMMUTING_LAYERS):
        return True
    if isinstance(layer, keras.layers.ReLU):
        return (layer.max_value is None and float(layer.threshold) == 0.0)
    if isinstance(layer, keras.layers.Activation):
        return _homogeneous_activation(layer.activation)
    return False


def _probe_commutes_with_scale(probe: keras.Model) -> bool:
    """Every layer on the probe's path passes a positive input scale through unchanged."""
    return all(_commutes_with_scale(layer) for layer in probe.layers)


def _linear_part(layer: keras.layers.Layer, x):
    """The layer's output without its (zero) bias: the conv or matmul, then its activation.
    Saves a full pass over the output (the bias add) on every measurement."""
    if isinstance(layer, keras.layers.Dense):
        y = keras.ops.matmul(x, layer.kernel)
    else:
        y = layer.convolution_op(x, layer.kernel)
    act = getattr(layer, "activation", None)
    return y if act in (None, keras.activations.linear) else act(y)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def lsuv(model: keras.Model, batch, *, tol_var: float = 0.1, t_max: int = 10,
         skip_smaller_than: int = 0, seed: int | None = None, zero_bias: bool = True,
         recompute: bool = False, verbose: bool = False) -> LSUVReport:
    """Layer-sequential unit-variance initialization, Mishkin & Matas (2015), Algorithm 1.

    Changes ``model`` in place and returns an ``LSUVReport``.

    1. Every conv/dense kernel gets ``orthonormal_kernel`` (filters orthonormal, in the
       channels-last layout) and, with ``zero_bias`` (the paper's choice), a zero bias.
    2. For each layer in forward order: ``Var`` of the layer's own output on ``batch``
       (inference mode: no dropout; batch norm uses its moving statistics); while
       ``|Var - 1| >= tol_var`` and fewer than ``t_max`` divisions, divide the kernel by
       ``sqrt(Var)`` (the bias is not scaled) and measure again.

    ``batch``: a preprocessed mini-batch (as the model will be fed in training), or a list
    for several inputs. Paper defaults: ``Tol_var = 0.1``, ``T_max = 10``.

    Speed: each layer's probe (from the previous layer's output to this layer's input) is built
    once, so the batch goes through the network once. For a layer with a zero bias and ReLU or
    no activation, dividing the kernel by ``s`` divides the output by ``s`` and its variance by
    ``s**2`` exactly; that identity replaces re-running the layer and re-measuring (one division
    suffices; ``T_max`` matters for the others), the bias add is skipped, and the scale is
    carried through the layers in between when they commute with it (ReLU, dropout, pooling)
    instead of being multiplied into the activations. ``recompute=True`` turns all of this off.

    Layers left as they are (original kernel, no pre-init): those with fewer than
    ``skip_smaller_than`` output values per example (LSUV-keras used 32; the default 0 skips
    none, as Algorithm 1 visits every layer, the classifier included) and layers called more
    than once (no single output; warned). A layer whose output variance is zero or non-finite
    on the batch keeps its orthonormal pre-init unscaled and gets a ``RuntimeWarning`` naming
    it: never a division by zero. A layer that does not reach the tolerance
    within ``t_max`` keeps its last scale and gets a warning.
    """
    start = time.perf_counter()
    if tol_var <= 0 or t_max < 0:
        raise ValueError(f"need tol_var > 0 and t_max >= 0, got {tol_var}, {t_max}")
    rng = np.random.default_rng(seed)
    inputs = [keras.ops.convert_to_tensor(x) for x in _as_inputs(model, batch)]
    report = LSUVReport(tol_var=tol_var, t_max=t_max, method="lsuv")

    layers, shapes = [], {}
    for layer in lsuv_layers(model):
        out = _single_output(layer)
        shapes[layer.name] = () if out is None else tuple(out.shape[1:])
        layers.append(layer)
    to_fit = [lay for lay in layers if _single_output(lay) is not None
              and math.prod(shapes[lay.name]) >= skip_smaller_than]

    # Step 1: orthonormal pre-initialization (and zero biases) of every layer to be fitted.
    for layer in to_fit:
        kernel = _variable(layer, "kernel")
        kernel.assign(orthonormal_kernel(kernel.shape, rng).astype(kernel.dtype))
        bias = _variable(layer, "bias")
        if zero_bias and bias is not None:
            bias.assign(np.zeros(bias.shape, dtype=bias.dtype))

    # Step 2: layer by layer. Probes from one fitted layer's output to the next one's input.
    probes = _build_probes(model, to_fit) if to_fit else []
    last_use: dict[int, int] = {}
    for k, (sources, _) in enumerate(probes):
        for s in sources:
            last_use[s] = k
    outputs: dict[int, tuple[Any, float]] = {}

    # A stored output is a pair (tensor, c): the layer's true output is c * tensor. While the
    # path to the next layer commutes with a positive scale (ReLU, dropout, pooling) and the
    # next layer is homogeneous (zero bias, ReLU or no activation), c travels unapplied and the
    # variance is corrected by c**2: exact, and it saves a pass over every activation map.
    scale_free = [_probe_commutes_with_scale(p) and len(src) == 1 for src, p in probes]

    with _NoGrad():
        for layer in layers:
            kind, shape = type(layer).__name__, shapes[layer.name]
            if layer not in to_fit:
                status = SKIPPED if shape else UNREACHABLE
                if status == UNREACHABLE:
                    _warn(f"LSUV: layer {layer.name!r} is called more than once; "
                          "left as it is")
                report.records.append(LSUVRecord(layer.name, kind, shape, math.nan, math.nan,
                                                 0, 1.0, status))
                continue
            index = to_fit.index(layer)
            sources, probe = probes[index]
            kernel, bias = _variable(layer, "kernel"), _variable(layer, "bias")
            exact = (not recompute and (bias is None or not np.any(_np(bias)))
                     and _homogeneous_activation(getattr(layer, "activation", None))
                     and type(layer) in LSUV_LAYER_TYPES
                     and not getattr(layer, "lora_enabled", False)
                     and layer.compute_dtype == kernel.dtype)
            carry = 1.0  # the true input of this layer is carry * (what the probe gives)
            feed = []
            for s in sources:
                if s < 0:
                    feed.extend(inputs)
                    continue
                tensor, c = outputs[s]
                if c != 1.0 and not (exact and scale_free[index]):
                    tensor, c = keras.ops.multiply(tensor, c), 1.0
                feed.append(tensor)
                carry = c
            x = probe(feed, training=False)
            for s in [s for s in outputs if last_use[s] <= index]:
                del outputs[s]

            # exact: layer(carry * x) = carry * layer_without_bias(x), so Var = carry**2 * Var(y)
            y = _linear_part(layer, x) if exact else layer(x)
            var = var_before = _variance(y) * carry * carry
            iterations, scale, status = 0, 1.0, OK
            while True:
                if not math.isfinite(var) or var < MIN_VARIANCE:
                    status = NON_FINITE if not math.isfinite(var) else ZERO_VARIANCE
                    _warn(f"LSUV: layer {layer.name!r} has output variance {var:.3g} on the "
                          "batch; its kernel is not scaled (dead units, an all-zero input or "
                          "an overflow upstream?)")
                    break
                if abs(var - 1.0) < tol_var:
                    break
                if iterations >= t_max:
                    status = NOT_CONVERGED
                    _warn(f"LSUV: layer {layer.name!r} did not reach |Var - 1| < {tol_var} "
                          f"in {t_max} iterations (Var = {var:.4g})")
                    break
                factor = 1.0 / math.sqrt(var)
                kernel.assign(_np(kernel) * np.asarray(factor, dtype=kernel.dtype))
                scale *= factor
                iterations += 1
                if exact:  # conv(x, W * f) = f * conv(x, W): Var scales by f**2
                    var *= factor * factor
                else:
                    y = layer(x)
                    var = _variance(y)
            if index in last_use:  # the next probe reads this output (true = c * y)
                outputs[index] = (y, carry * scale if exact else 1.0)
            report.records.append(LSUVRecord(layer.name, kind, shape, var_before, var,
                                             iterations, scale, status))
            if verbose:
                print(f"LSUV {layer.name}: Var {var_before:.4g} -> {var:.4f} "
                      f"in {iterations} iteration(s) [{status}]")
            del x, y
    report.seconds = time.perf_counter() - start
    return report


def lsuv_seed_rebuild(model: keras.Model, batch, *, tol_var: float = 0.1, t_max: int = 10,
                      skip_smaller_than: int = 32, seed: int | None = None,
                      orthonormal: Callable[..., np.ndarray] = seed_orthonormal,
                      verbose: bool = False) -> LSUVReport:
    """The seed repository's LSUV (after LSUV-keras' ``LSUVinit``), for benchmarks.

    Faithful to it: layer by layer, pre-init the kernel with ``orthonormal`` (by default the
    axis-mixing ``seed_orthonormal``; biases untouched), skip layers with fewer than 32 output
    values per example, and on every iteration build a new ``keras.Model`` from the model
    inputs to the layer's output and run ``predict`` (batches of 32) from the input image on.
    The loop stops when ``|Var - 1| <= tol_var``, after ``t_max`` divisions or when
    ``sqrt(Var) < 1e-7``. Slow by design; use ``lsuv``.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    inputs = _as_inputs(model, batch)
    feed = inputs if len(inputs) > 1 else inputs[0]
    report = LSUVReport(tol_var=tol_var, t_max=t_max, method="lsuv_seed_rebuild")

    def activations(layer: keras.layers.Layer) -> np.ndarray:
        probe = keras.Model(model.inputs, layer.output)
        return probe.predict(feed, verbose=0)

    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            continue
        shape = tuple(layer.output.shape[1:])
        kind = type(layer).__name__
        if math.prod(shape) < skip_smaller_than:
            report.records.append(LSUVRecord(layer.name, kind, shape, math.nan, math.nan, 0,
                                             1.0, SKIPPED))
            continue
        weights = layer.get_weights()
        weights[0] = orthonormal(weights[0].shape, rng)
        layer.set_weights(weights)
        variance = var_before = float(np.var(activations(layer)))
        iteration, scale = 0, 1.0
        while abs(1.0 - variance) > tol_var:
            if np.sqrt(variance) < 1e-7:
                break
            weights = layer.get_weights()
            weights[0] /= np.sqrt(variance)
            layer.set_weights(weights)
            scale /= math.sqrt(variance)
            variance = float(np.var(activations(layer)))
            iteration += 1
            if iteration >= t_max:
                break
        status = OK if abs(1.0 - variance) <= tol_var else NOT_CONVERGED
        report.records.append(LSUVRecord(layer.name, kind, shape, var_before, variance,
                                         iteration, scale, status))
        if verbose:
            print(f"LSUV (seed) {layer.name}: Var {var_before:.4g} -> {variance:.4f} "
                  f"in {iteration} iteration(s)")
    report.seconds = time.perf_counter() - start
    return report
