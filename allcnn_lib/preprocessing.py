"""Input preprocessing: contrast normalization, standardization, ZCA whitening, augmentation.

Springenberg et al. (2014), Sec. 3.2, as maxout's pylearn2 pipeline: without augmentation
:func:`global_contrast_normalize` (L2 norm 55) then :class:`ZCAWhitening` (epsilon 0.1) fitted on
the training set; with augmentation "horizontal flips and translations" (:func:`augment_dataset`).
:class:`Standardizer` is the simpler per-channel alternative.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

#: pylearn2 ``CIFAR10(gcn=55.)``: every image gets L2 norm 55, a per-value RMS of ~0.99.
PAPER_GCN_SCALE = 55.0
#: pylearn2 ``ZCA(filter_bias=0.1)``: added to the eigenvalues of the GCN(55) covariance.
PAPER_ZCA_EPSILON = 0.1

_CHUNK = 4096  # images per block of the NumPy loops (bounds temporary memory)


class PreprocessingFileError(ValueError):
    """A saved preprocessor file that is corrupt, truncated or of another kind."""


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [0, 1]; float images are cast to float32 as they are."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32, copy=False)
    raise TypeError(f"to_float expects uint8 or float images, got dtype {images.dtype}")


def global_contrast_normalize(images: np.ndarray, scale: float = PAPER_GCN_SCALE,
                              min_divisor: float = 1e-8) -> np.ndarray:
    """Per image: subtract its mean, then scale it to L2 norm ``scale`` (pylearn2's GCN).

    An image whose divisor ``norm / scale`` is below ``min_divisor`` (a constant image) is only
    centred. The result does not depend on the input's scale (uint8 or [0, 1]); float32.
    """
    images = np.asarray(images)
    flat = images.reshape(len(images), -1)
    out = np.empty(flat.shape, np.float32)
    for start in range(0, len(flat), _CHUNK):
        c = flat[start:start + _CHUNK].astype(np.float64)
        c -= c.mean(axis=1, keepdims=True)
        divisor = np.sqrt(np.einsum("ij,ij->i", c, c)) / scale
        out[start:start + _CHUNK] = c / np.where(divisor < min_divisor, 1.0, divisor)[:, None]
    return out.reshape(images.shape)


class Standardizer:
    """Per-channel standardization fitted on training images: mean 0, std 1 per channel."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = float(eps)
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None

    def fit(self, images: np.ndarray) -> Standardizer:
        """Per-channel mean and population std (float64) of ``images`` (N, ..., C)."""
        flat = np.asarray(images).reshape(-1, np.shape(images)[-1])
        total, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        for start in range(0, len(flat), _CHUNK * 256):
            block = flat[start:start + _CHUNK * 256].astype(np.float64)
            total += block.sum(axis=0)
            squares += np.einsum("ij,ij->j", block, block)
        self.mean_ = total / len(flat)
        self.std_ = np.sqrt(np.maximum(squares / len(flat) - self.mean_**2, self.eps**2))
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """``(images - mean) / std`` per channel, as float32."""
        if self.mean_ is None:
            raise RuntimeError("Standardizer is not fitted: call fit(training_images) first")
        mean, std = self.mean_.astype(np.float32), self.std_.astype(np.float32)
        return (np.asarray(images, np.float32) - mean) / std

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (``.npz``, atomically); returns the path."""
        if self.mean_ is None:
            raise RuntimeError("Standardizer is not fitted: nothing to save")
        return _save(path, "Standardizer", mean=self.mean_, std=self.std_, eps=self.eps)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Standardizer:
        """Read a file written by :meth:`save` (:class:`PreprocessingFileError` if it is not)."""
        state = _load(path, "Standardizer", ("mean", "std", "eps"))
        obj = cls(float(state["eps"]))
        obj.mean_, obj.std_ = state["mean"].astype(np.float64), state["std"].astype(np.float64)
        return obj


class ZCAWhitening:
    """ZCA whitening fitted on training images (Sec. 3.2, after pylearn2's ``ZCA``; notebook 04).

    With the training covariance C = U diag(λ) Uᵀ, W = U diag(1 / √(λ + ε)) Uᵀ and
    ``transform(x) = W (x - mean)``. ``epsilon`` is in the data's squared units: the paper's 0.1
    suits GCN(55) data; 1e-6 would amplify 8-bit rounding noise up to 1000x. After ``fit``:
    ``mean_``, ``eigenvalues_`` (descending), ``components_`` (eigenvectors as rows),
    ``whitening_matrix_``, ``feature_shape_``, ``n_samples_``.
    """

    def __init__(self, epsilon: float = PAPER_ZCA_EPSILON) -> None:
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.mean_ = self.eigenvalues_ = self.components_ = self.whitening_matrix_ = None
        self.feature_shape_: tuple[int, ...] | None = None
        self.n_samples_ = 0

    def __repr__(self) -> str:
        fitted = (f", fitted on {self.n_samples_} x {self.feature_shape_}"
                  if self.whitening_matrix_ is not None else "")
        return f"ZCAWhitening(epsilon={self.epsilon:g}{fitted})"

    def fit(self, images: np.ndarray) -> ZCAWhitening:
        """Fit on float training images (N, ...); every axis but the first is a feature."""
        import scipy.linalg

        x = _float_images(images).reshape(len(images), -1)
        n, d = x.shape
        mean = x.mean(axis=0, dtype=np.float64)
        if not np.all(np.isfinite(mean)):
            raise ValueError("images contain NaN or inf")
        cov = np.zeros((d, d))
        block = max(2 * d, (1 << 24) // d)  # ~64 MB float32 blocks: few, efficient BLAS calls
        for start in range(0, n, block):
            xc = np.subtract(x[start:start + block], mean.astype(np.float32), dtype=np.float32)
            cov += xc.T @ xc  # BLAS syrk in float32, summed in float64
        lam, u = scipy.linalg.eigh(cov / n, overwrite_a=True, check_finite=False, driver="evd")
        lam, comp = np.maximum(lam[::-1], 0.0), u[:, ::-1].T.astype(np.float32)  # descending
        if lam[-1] + self.epsilon <= 0:
            raise ValueError("the covariance is singular (fewer samples than features?) and "
                             "epsilon is 0: use epsilon > 0")
        comp *= np.sign(comp[np.arange(d), np.abs(comp).argmax(axis=1)])[:, None]
        gain = (1.0 / np.sqrt(lam + self.epsilon)).astype(np.float32)
        w = (comp.T * gain) @ comp
        self.whitening_matrix_ = np.ascontiguousarray((w + w.T) * np.float32(0.5))
        self.mean_, self.eigenvalues_, self.components_ = mean, lam, comp
        self.feature_shape_, self.n_samples_ = tuple(int(s) for s in np.shape(images)[1:]), n
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Whiten float images (M, *feature_shape) or one image; float32, same shape."""
        if self.whitening_matrix_ is None:
            raise RuntimeError("ZCAWhitening is not fitted: call fit(training_images) first")
        images = _float_images(images)
        if images.shape[images.ndim - len(self.feature_shape_):] != self.feature_shape_:
            raise ValueError(f"expected images of shape {self.feature_shape_}, got an array "
                             f"of shape {images.shape}")
        x = images.reshape(-1, self.whitening_matrix_.shape[0])
        out = np.empty(x.shape, np.float32)
        mean = self.mean_.astype(np.float32)
        for start in range(0, len(x), _CHUNK):
            np.matmul(x[start:start + _CHUNK].astype(np.float32) - mean, self.whitening_matrix_.T,
                      out=out[start:start + _CHUNK])
        return out.reshape(images.shape)

    def max_gain(self) -> float:
        """The largest amplification of any input direction: 1 / √(min λ + ε)."""
        return float(1.0 / np.sqrt(self.eigenvalues_[-1] + self.epsilon))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted state to ``path`` (``.npz`` appended if missing), atomically."""
        if self.whitening_matrix_ is None:
            raise RuntimeError("ZCAWhitening is not fitted: nothing to save")
        return _save(path, "ZCAWhitening", epsilon=self.epsilon,
                     feature_shape=np.array(self.feature_shape_), n_samples=self.n_samples_,
                     mean=self.mean_, eigenvalues=self.eigenvalues_,
                     components=self.components_, whitening_matrix=self.whitening_matrix_)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZCAWhitening:
        """Read a file written by :meth:`save` (:class:`PreprocessingFileError` if it is not)."""
        z = _load(path, "ZCAWhitening", ("epsilon", "feature_shape", "n_samples", "mean",
                                         "eigenvalues", "components", "whitening_matrix"))
        obj = cls(float(z["epsilon"]))
        obj.feature_shape_ = tuple(int(s) for s in z["feature_shape"])
        d = int(np.prod(obj.feature_shape_))
        if z["mean"].shape != (d,) or z["whitening_matrix"].shape != (d, d):
            raise PreprocessingFileError(f"{path}: arrays do not fit images of shape "
                                         f"{obj.feature_shape_}. Fix: fit and save it again")
        obj.mean_, obj.eigenvalues_ = z["mean"].astype(np.float64), z["eigenvalues"]
        obj.components_ = z["components"].astype(np.float32)
        obj.whitening_matrix_ = z["whitening_matrix"].astype(np.float32)
        obj.n_samples_ = int(z["n_samples"])
        return obj


def _float_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"ZCAWhitening expects float images, got {images.dtype}: convert with "
                        "to_float() or global_contrast_normalize() first (epsilon is in the "
                        "data's squared units)")
    return images


def _save(path: str | os.PathLike, kind: str, **arrays: Any) -> Path:
    """``np.savez`` to a temporary file beside ``path``, then rename: never half-written."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, format=np.array(f"allcnn.{kind}/1"), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load(path: str | os.PathLike, kind: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of a file that :func:`_save` wrote for ``kind``, or a one-line error."""
    fix = f"Fix: point at a file written by {kind}.save(), or fit and save it again"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file. {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise PreprocessingFileError(f"{path}: not a readable .npz archive "
                                     f"({type(err).__name__}). {fix}") from None
    found = str(arrays.get("format", "no format tag"))
    if found != f"allcnn.{kind}/1" or not all(key in arrays for key in keys):
        raise PreprocessingFileError(f"{path}: not a saved {kind} (format: {found}). {fix}")
    return arrays


# --------------------------------------------------------------------------- augmentation


def tf_shift_flip(images: Any, dy: Any, dx: Any, flips: Any,
                  fill_value: float | str = 0) -> Any:
    """Flip each image left-right where ``flips``, then shift it: ``out[i, j] = src[i - dy,
    j - dx]``. The uncovered border gets ``fill_value``, or with ``"reflect"`` the image mirrored
    at its edge (a crop of the reflect-padded image, as in airbench). Keeps shape and dtype."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    batch = images[None] if single else images
    h, w = tf.shape(batch)[1], tf.shape(batch)[2]
    rows = tf.range(h)[None, :] - tf.reshape(tf.cast(dy, tf.int32), [-1, 1])
    cols = tf.range(w)[None, :] - tf.reshape(tf.cast(dx, tf.int32), [-1, 1])
    valid = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    reflect = isinstance(fill_value, str)
    if reflect:
        if fill_value != "reflect":
            raise ValueError(f"fill_value must be a number or 'reflect', got {fill_value!r}")
        rows = (h - 1) - tf.abs((h - 1) - tf.abs(rows))  # mirror at 0 and at h - 1
        cols = (w - 1) - tf.abs((w - 1) - tf.abs(cols))
    cols = tf.where(tf.reshape(tf.cast(flips, tf.bool), [-1, 1]), w - 1 - cols, cols)
    out = tf.gather(batch, tf.clip_by_value(rows, 0, h - 1), axis=1, batch_dims=1)
    out = tf.gather(out, tf.clip_by_value(cols, 0, w - 1), axis=2, batch_dims=1)
    if not reflect:
        out = tf.where(valid[..., None], out, tf.cast(fill_value, out.dtype))
    return out[0] if single else out


def tf_random_shift_flip(images: Any, labels: Any = None, max_shift: int | float = 3,
                         seed: Any = None, flip: bool = True,
                         fill_value: float | str = 0) -> Any:
    """"Horizontal flips and translations" (Sec. 3.2): flip with probability 1/2 (if ``flip``),
    then shift by ``dy``, ``dx`` uniform in [-s, s], ``s = max_shift`` pixels or a fraction of
    the side (0.1 -> 3 pixels on 32 x 32). ``seed``: a stateless seed of shape [2], or None.
    Returns ``(images, labels)`` when labels are given."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    side = images.shape[-3]  # static height (None if unknown)
    s = int(max_shift) if isinstance(max_shift, int | np.integer) else int(round(max_shift * side))
    if not 0 <= s < (side or s + 1):
        raise ValueError(f"max_shift must be in [0, {side}) pixels, got {max_shift}")
    n = tf.shape(images)[:1] if images.shape.rank == 4 else [1]
    if seed is None:
        dy, dx = (tf.random.uniform(n, -s, s + 1, dtype=tf.int32) for _ in range(2))
        flips = tf.random.uniform(n) < 0.5
    else:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
        dy, dx = (tf.random.stateless_uniform(n, seeds[k], -s, s + 1, dtype=tf.int32)
                  for k in range(2))
        flips = tf.random.stateless_uniform(n, seeds[2]) < 0.5
    out = tf_shift_flip(images, dy, dx, flips & flip, fill_value)
    return out if labels is None else (out, labels)


def augment_dataset(dataset: Any, max_shift: int | float = 3, seed: int = 0, flip: bool = True,
                    fill_value: float | str = 0, num_parallel_calls: int | None = None) -> Any:
    """Map :func:`tf_random_shift_flip` over a batched ``tf.data`` dataset (elements: images or
    tuples whose first item is the images). Per-batch seeds from ``Dataset.random(seed,
    rerandomize_each_iteration=True)``: the same in every run, new in every epoch."""
    import tensorflow as tf

    def apply(element: Any, pair: Any) -> Any:
        first = element[0] if isinstance(element, tuple) else element
        out = tf_random_shift_flip(first, None, max_shift, pair, flip, fill_value)
        return (out, *element[1:]) if isinstance(element, tuple) else out

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    zipped = tf.data.Dataset.zip((dataset, seeds))
    if num_parallel_calls is None:
        return zipped.map(apply)
    return zipped.map(apply, num_parallel_calls=num_parallel_calls, deterministic=True)


def shift_flip(images: np.ndarray, dy: Any, dx: Any, flips: Any, fill: float = 0) -> np.ndarray:
    """:func:`tf_shift_flip` on NumPy arrays (for tests and checks)."""
    return tf_shift_flip(images, dy, dx, flips, fill).numpy()


def random_shift_flip(images: np.ndarray, rng: np.random.Generator | int | None = None,
                      max_shift: int | float = 3) -> np.ndarray:
    """:func:`tf_random_shift_flip` on NumPy arrays, seeded from ``rng`` (for benchmarks)."""
    seed = np.random.default_rng(rng).integers(0, 2**31, size=2)
    return tf_random_shift_flip(images, None, max_shift, seed).numpy()
