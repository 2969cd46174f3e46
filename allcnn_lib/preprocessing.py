"""Input preprocessing: contrast normalization, standardization, ZCA whitening, augmentation.

Springenberg et al. (2014), Sec. 3.2, after maxout's pylearn2 pipeline: without augmentation
:func:`global_contrast_normalize` (L2 norm 55), then :class:`ZCAWhitening` (epsilon 0.1) fitted
on the training set; with augmentation "horizontal flips and translations"
(:func:`augment_dataset`). :class:`Standardizer` is the simpler per-channel alternative.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from allcnn_lib import runs

Preprocess = Callable[[tf.Tensor], tf.Tensor]

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
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"to_float expects uint8 or float images, got dtype {images.dtype}")
    return images / np.float32(255) if images.dtype == np.uint8 else images.astype(np.float32)


def global_contrast_normalize(images: np.ndarray, scale: float = PAPER_GCN_SCALE) -> np.ndarray:
    """Per image: subtract its mean, then scale it to L2 norm ``scale`` (pylearn2's GCN; a
    constant image is only centred). The result does not depend on the input's scale."""
    flat = np.asarray(images).reshape(len(images), -1)
    out = np.empty(flat.shape, np.float32)
    for start in range(0, len(flat), _CHUNK):
        c = flat[start:start + _CHUNK].astype(np.float64)
        c -= c.mean(axis=1, keepdims=True)
        divisor = np.linalg.norm(c, axis=1, keepdims=True) / scale
        out[start:start + _CHUNK] = c / np.where(divisor < 1e-8, 1.0, divisor)
    return out.reshape(np.shape(images))


class Standardizer:
    """Per-channel standardization fitted on training images: mean 0, std 1 per channel."""

    mean_: np.ndarray | None = None
    std_: np.ndarray | None = None

    def fit(self, images: np.ndarray) -> Standardizer:
        """Per-channel mean and population std (float64) of ``images`` (N, ..., C)."""
        flat = np.asarray(images).reshape(-1, np.shape(images)[-1])
        self.mean_ = flat.mean(axis=0, dtype=np.float64)
        blocks = np.array_split(flat, max(1, len(flat) // (1 << 20)))
        var = sum(np.square(b - self.mean_).sum(axis=0) for b in blocks) / len(flat)
        self.std_ = np.sqrt(np.maximum(var, 1e-16))
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """``(images - mean) / std`` per channel, as float32."""
        if self.mean_ is None:
            raise RuntimeError("Standardizer is not fitted: call fit(training_images) first")
        return (np.asarray(images, np.float32) - self.mean_.astype(np.float32)) / (
            self.std_.astype(np.float32))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (``.npz``, atomically); returns the path."""
        return _save(path, "Standardizer", mean=self.mean_, std=self.std_)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Standardizer:
        """Read a file written by :meth:`save` (:class:`PreprocessingFileError` if it is not)."""
        obj, state = cls(), _load(path, "Standardizer", ("mean", "std"))
        obj.mean_, obj.std_ = state["mean"], state["std"]
        return obj


class ZCAWhitening:
    """ZCA whitening fitted on training images (Sec. 3.2, after pylearn2's ``ZCA``; notebook 04).

    With the training covariance C = U diag(λ) Uᵀ, W = U diag(1 / √(λ + ε)) Uᵀ and
    ``transform(x) = W (x - mean)``. ``epsilon`` is in the data's squared units: the paper's 0.1
    suits GCN(55) data. After ``fit``: ``mean_``, ``eigenvalues_`` (descending),
    ``components_`` (eigenvectors as rows), ``whitening_matrix_``, ``feature_shape_``.
    """

    def __init__(self, epsilon: float = PAPER_ZCA_EPSILON) -> None:
        self.epsilon = float(epsilon)
        self.mean_ = self.eigenvalues_ = self.components_ = self.whitening_matrix_ = None
        self.feature_shape_: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"ZCAWhitening(epsilon={self.epsilon:g}, feature_shape={self.feature_shape_})"

    def fit(self, images: np.ndarray) -> ZCAWhitening:
        """Fit on float training images (N, ...); every axis but the first is a feature."""
        x = _float_images(images).reshape(len(images), -1)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        cov = np.zeros((x.shape[1],) * 2)
        for start in range(0, len(x), _CHUNK):
            xc = x[start:start + _CHUNK] - mean
            cov += xc.T @ xc  # float32 products, summed in float64
        lam, u = np.linalg.eigh(cov / len(x))
        lam, comp = np.maximum(lam[::-1], 0.0), u[:, ::-1].T.astype(np.float32)  # descending
        if lam[-1] + self.epsilon <= 0:
            raise ValueError("the covariance is singular (fewer samples than features?) and "
                             "epsilon is 0: use epsilon > 0")
        w = (comp.T * (1 / np.sqrt(lam + self.epsilon)).astype(np.float32)) @ comp
        self.whitening_matrix_ = (w + w.T) / np.float32(2)  # symmetric, as ZCA is
        self.mean_, self.eigenvalues_, self.components_ = mean, lam, comp
        self.feature_shape_ = tuple(np.shape(images)[1:])
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Whiten float images (M, *feature_shape) or one image; float32, same shape."""
        if self.whitening_matrix_ is None:
            raise RuntimeError("ZCAWhitening is not fitted: call fit(training_images) first")
        images = _float_images(images)
        if images.shape[images.ndim - len(self.feature_shape_):] != self.feature_shape_:
            raise ValueError(f"expected images of shape {self.feature_shape_}, got an array "
                             f"of shape {images.shape}")
        x = images.reshape(-1, len(self.mean_))
        out = np.concatenate([(x[i:i + _CHUNK] - self.mean_) @ self.whitening_matrix_
                              for i in range(0, len(x), _CHUNK)])
        return out.astype(np.float32, copy=False).reshape(images.shape)

    def max_gain(self) -> float:
        """The largest amplification of any input direction: 1 / √(min λ + ε)."""
        return float(1.0 / np.sqrt(self.eigenvalues_[-1] + self.epsilon))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted state to ``path`` (``.npz`` appended if missing), atomically."""
        return _save(path, "ZCAWhitening", epsilon=self.epsilon, mean=self.mean_,
                     feature_shape=np.array(self.feature_shape_), eigenvalues=self.eigenvalues_,
                     components=self.components_, whitening_matrix=self.whitening_matrix_)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZCAWhitening:
        """Read a file written by :meth:`save` (:class:`PreprocessingFileError` if it is not)."""
        z = _load(path, "ZCAWhitening", ("epsilon", "feature_shape", "mean", "eigenvalues",
                                         "components", "whitening_matrix"))
        obj = cls(float(z["epsilon"]))
        obj.feature_shape_ = tuple(int(s) for s in z["feature_shape"])
        obj.mean_, obj.eigenvalues_ = z["mean"].astype(np.float32), z["eigenvalues"]
        obj.components_, obj.whitening_matrix_ = z["components"], z["whitening_matrix"]
        return obj


def _float_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"ZCAWhitening expects float images, got {images.dtype}: convert with "
                        "to_float() or global_contrast_normalize() first (epsilon is in the "
                        "data's squared units)")
    return images


def _save(path: str | os.PathLike, kind: str, **arrays: Any) -> Path:
    """``np.savez`` of ``arrays``, tagged ``kind``, written atomically (``runs.atomic_path``)."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    with runs.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, format=np.array(f"allcnn.{kind}/1"), **arrays)
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


# --------------------------------------------------------------------------- in the pipeline


def scale_to_unit(images: tf.Tensor) -> tf.Tensor:
    """uint8 images to float32 in [0, 1] (the default preprocessing)."""
    return tf.cast(images, tf.float32) / 255.0


def fit_zca(x_train: np.ndarray, epsilon: float, scale: float = PAPER_GCN_SCALE) -> ZCAWhitening:
    """The paper's whitening (Sec. 3.2): GCN to an L2 norm of ``scale``, then ZCA with
    ``epsilon`` added to the eigenvalues, fitted on the training images."""
    return ZCAWhitening(epsilon=epsilon).fit(global_contrast_normalize(x_train, scale))


def gcn_zca_preprocess(zca: ZCAWhitening, scale: float = PAPER_GCN_SCALE) -> Preprocess:
    """``zca.transform(global_contrast_normalize(x, scale))`` in TensorFlow, for the pipeline."""
    mean = tf.constant(np.asarray(zca.mean_, np.float32)[None, :])
    w_t = tf.constant(np.asarray(zca.whitening_matrix_, np.float32).T)

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        flat = tf.reshape(tf.cast(images, tf.float32), (tf.shape(images)[0], -1))
        centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
        divisor = tf.sqrt(tf.reduce_sum(tf.square(centred), axis=1, keepdims=True)) / scale
        divisor = tf.where(divisor < 1e-8, tf.ones_like(divisor), divisor)  # as pylearn2
        return tf.reshape(tf.matmul(centred / divisor - mean, w_t), tf.shape(images))

    return preprocess


def standardize_preprocess(standardizer: Standardizer) -> Preprocess:
    """uint8 images to ``(x - mean) / std`` per channel with a fitted ``Standardizer``."""
    mean = tf.constant(np.asarray(standardizer.mean_, np.float32))
    std = tf.constant(np.asarray(standardizer.std_, np.float32))
    return lambda images: (tf.cast(images, tf.float32) - mean) / std


def load_or_fit_preprocess(config: Mapping[str, Any], run_dir: str | Path,
                           x_train: np.ndarray | None = None) -> Preprocess:
    """A run's input preprocessing (``config``: ``TrainConfig.to_dict()``): its ZCA or
    standardization loaded from ``run_dir``, else fitted on ``x_train`` and saved there; /255
    when it had neither."""
    zca = config.get("zca")
    if not (zca or config.get("normalize")):
        return scale_to_unit
    path = Path(run_dir) / (runs.ZCA_FILE if zca else runs.STANDARDIZER_FILE)
    if path.is_file():
        state = (ZCAWhitening if zca else Standardizer).load(path)
    elif x_train is None:
        what = "ZCA whitening" if zca else "per-channel standardization"
        raise FileNotFoundError(f"{path}: the run used {what} but its {path.name} is missing")
    else:
        state = fit_zca(x_train, config["zca_epsilon"]) if zca else Standardizer().fit(x_train)
        state.save(path)
    return gcn_zca_preprocess(state) if zca else standardize_preprocess(state)


def tf_shift_flip(images: Any, dy: Any, dx: Any, flips: Any, fill_value: float | str = 0) -> Any:
    """Flip each image of a batch left-right where ``flips``, then shift it: ``out[i, j] =
    src[i - dy, j - dx]``. The uncovered border gets ``fill_value``, or with ``"reflect"`` the
    image mirrored at its edge (a crop of the reflect-padded image, as in airbench)."""
    if isinstance(fill_value, str) and fill_value != "reflect":
        raise ValueError(f"fill_value must be a number or 'reflect', got {fill_value!r}")
    images = tf.convert_to_tensor(images)
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    rows = tf.range(h)[None, :] - tf.reshape(tf.cast(dy, tf.int32), [-1, 1])
    cols = tf.range(w)[None, :] - tf.reshape(tf.cast(dx, tf.int32), [-1, 1])
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    if fill_value == "reflect":
        rows = (h - 1) - tf.abs((h - 1) - tf.abs(rows))  # mirror at 0 and at h - 1
        cols = (w - 1) - tf.abs((w - 1) - tf.abs(cols))
    cols = tf.where(tf.reshape(tf.cast(flips, tf.bool), [-1, 1]), w - 1 - cols, cols)
    out = tf.gather(images, tf.clip_by_value(rows, 0, h - 1), axis=1, batch_dims=1)
    out = tf.gather(out, tf.clip_by_value(cols, 0, w - 1), axis=2, batch_dims=1)
    if fill_value == "reflect":
        return out
    return tf.where(valid[..., None], out, tf.cast(fill_value, out.dtype))


def augment_dataset(dataset: Any, max_shift: int | float = 3, seed: int = 0,
                    fill_value: float | str = 0) -> Any:
    """"Horizontal flips and translations" (Sec. 3.2) over a batched ``tf.data`` dataset of
    tuples ``(images, ...)``: flip with probability 1/2, then shift by ``dy``, ``dx`` uniform in
    [-s, s], ``s = max_shift`` pixels or a fraction of the side (0.1: 3 px on 32 x 32). Seeds
    from ``Dataset.random(seed)``: the same in every run, new in every epoch."""
    def apply(element: tuple, pair: Any) -> tuple:
        images = element[0]
        s = max_shift if isinstance(max_shift, int) else round(max_shift * images.shape[1])
        seeds = tf.random.experimental.stateless_split(pair, 3)
        n = tf.shape(images)[:1]
        dy, dx = (tf.random.stateless_uniform(n, seeds[k], -s, s + 1, dtype=tf.int32)
                  for k in range(2))
        flips = tf.random.stateless_uniform(n, seeds[2]) < 0.5
        return (tf_shift_flip(images, dy, dx, flips, fill_value), *element[1:])

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((dataset, seeds)).map(apply)
