"""Input preprocessing and augmentation for the All-CNN reproduction.

Springenberg et al. (2014), Sec. 3.2 / 4: the results *without* augmentation use the data set
"whitened and contrast normalized" following Goodfellow et al. (2013, maxout), i.e. pylearn2's
``make_cifar10_gcn_whitened.py``: global contrast normalization with ``scale=55`` (each image
centred and scaled to an L2 norm of 55), then ZCA whitening fitted on the training set with
``filter_bias=0.1`` added to the covariance. The augmented results use "horizontal flips and
translations" only. This module provides:

* :func:`to_float`, :func:`global_contrast_normalize`, :class:`Standardizer`,
  :func:`per_channel_standardize`;
* :class:`ZCAWhitening` (``mode="zca"`` or ``"pca"``), fitted on training images, saved and
  loaded as ``.npz``; :func:`gcn_zca` runs the paper's GCN + ZCA pipeline in one call;
* augmentation with identical semantics in three forms: NumPy (:func:`shift_image`,
  :func:`flip_horizontal`, :func:`shift_flip`, :func:`random_shift_flip`), Keras 3
  (:func:`ops_shift_flip`, the layer :class:`RandomShiftFlip`, usable on every backend and inside
  ``tf.data``) and pure TensorFlow (:func:`tf_shift_flip`, :func:`tf_random_shift_flip`,
  :func:`augment_dataset`).

Shift convention everywhere: a shift by ``(dy, dx)`` gives ``out[i, j] = src[i - dy, j - dx]``
(content moves down by ``dy`` and right by ``dx``), and pixels with no source are filled with
``fill`` (zero by default; on whitened data zero is the training mean). When an image is both
flipped and shifted, it is flipped first: ``out = shift(flip(x), dy, dx)``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

try:  # Keras >= 3.11: the base of keras.layers.RandomFlip & co. (not exported publicly)
    from keras.src.layers.preprocessing.data_layer import DataLayer as _DataLayer
except ImportError:  # pragma: no cover - older Keras 3 releases
    from keras.src.layers.preprocessing.tf_data_layer import TFDataLayer as _DataLayer

__all__ = [
    "PAPER_GCN_SCALE",
    "PAPER_ZCA_EPSILON",
    "PreprocessingFileError",
    "RandomShiftFlip",
    "Standardizer",
    "ZCAWhitening",
    "augment_dataset",
    "flip_horizontal",
    "gcn_zca",
    "global_contrast_normalize",
    "ops_shift_flip",
    "per_channel_standardize",
    "random_shift_flip",
    "resolve_max_shift",
    "shift_flip",
    "shift_image",
    "tf_random_shift_flip",
    "tf_shift_flip",
    "to_float",
]

#: pylearn2 ``CIFAR10(gcn=55.)``, used for maxout and All-CNN: every image gets L2 norm 55,
#: i.e. a per-pixel RMS of 55 / sqrt(3072) ~= 0.99.
PAPER_GCN_SCALE = 55.0
#: pylearn2 ``preprocessing.ZCA()`` default ``filter_bias``, added to the covariance of the
#: GCN(55) data in ``make_cifar10_gcn_whitened.py``.
PAPER_ZCA_EPSILON = 0.1

_CHUNK = 4096  # rows per block in the chunked NumPy loops (bounds temporary memory)
_ZCA_FORMAT = "allcnn.ZCAWhitening/1"
_STD_FORMAT = "allcnn.Standardizer/1"


class PreprocessingFileError(ValueError):
    """A saved preprocessor file that is missing pieces, corrupt or of another kind."""


# --------------------------------------------------------------------------- scaling


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [0, 1] (divided by 255); float input is cast to float32 as is."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32, copy=False)
    raise TypeError(f"to_float expects uint8 or float images, got dtype {images.dtype}")


def global_contrast_normalize(
    x: np.ndarray,
    scale: float = PAPER_GCN_SCALE,
    eps: float = 1e-8,
    *,
    use_std: bool = False,
    sqrt_bias: float = 0.0,
    subtract_mean: bool = True,
) -> np.ndarray:
    """Global contrast normalization per image, as pylearn2's ``global_contrast_normalize``.

    For each image, flattened to a vector ``v`` of ``D`` values (D = 3072 on CIFAR-10)::

        c = v - mean(v)                                  (if subtract_mean)
        d = sqrt(sqrt_bias + sum(c ** 2)) / scale        (use_std=False, the default)
        d = sqrt(sqrt_bias + sum(c ** 2) / (D - 1)) / scale      (use_std=True; ddof=1)
        out = c / d, except out = c where d < eps        (pylearn2's ``min_divisor``)

    With the defaults every image has mean 0 and L2 norm ``scale`` = 55, which is what maxout
    and All-CNN used (pylearn2 ``CIFAR10(gcn=55.)``, Springenberg et al. Sec. 3.2). Note
    55 ~= sqrt(3072): the per-pixel RMS is ~0.99, so data and ZCA ``epsilon`` are on a unit
    scale. ``use_std=True, sqrt_bias=10, scale=1`` is Coates et al.'s variant (on 0..255 data).
    The result does not depend on the input's scale (uint8 or [0, 1] give the same output,
    up to ``sqrt_bias``). Returns float32 of the input's shape; the first axis indexes images.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (N, ...), got shape {x.shape}")
    flat = x.reshape(len(x), -1)
    d = flat.shape[1]
    if use_std and d < 2:
        raise ValueError("use_std=True needs at least 2 values per image")
    out = np.empty(flat.shape, np.float32)
    for start in range(0, len(flat), _CHUNK):
        c = flat[start:start + _CHUNK].astype(np.float64)
        if subtract_mean:
            c -= c.mean(axis=1, keepdims=True)
        ss = np.einsum("ij,ij->i", c, c)
        if use_std:
            ss = ss / (d - 1)
        divisor = np.sqrt(sqrt_bias + ss) / scale
        divisor[divisor < eps] = 1.0
        out[start:start + _CHUNK] = c / divisor[:, None]
    return out.reshape(x.shape)


def per_channel_standardize(images: np.ndarray, mean: Sequence[float] | np.ndarray,
                            std: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(images - mean) / std`` per channel (last axis), as float32."""
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)
    images = np.asarray(images)
    if images.shape[-1] != mean32.shape[-1]:
        raise ValueError(f"images have {images.shape[-1]} channels, statistics have "
                         f"{mean32.shape[-1]}")
    return (images.astype(np.float32) - mean32) / std32


class Standardizer:
    """Per-channel standardization fitted on training images: mean 0, std 1 per channel.

    The simpler alternative to GCN + ZCA (Springenberg et al. Sec. 3.2 use the latter). Channel
    statistics are computed in float64 over all images and pixels of the training set only.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = float(eps)
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None

    def fit(self, images: np.ndarray) -> Standardizer:
        """Compute the per-channel mean and (population) std of ``images`` (N, ..., C)."""
        images = np.asarray(images)
        if images.ndim < 2 or len(images) == 0:
            raise ValueError(f"expected a non-empty batch (N, ..., C), got shape {images.shape}")
        flat = images.reshape(-1, images.shape[-1])
        total = np.zeros(flat.shape[1])
        for start in range(0, len(flat), _CHUNK * 256):
            total += flat[start:start + _CHUNK * 256].sum(axis=0, dtype=np.float64)
        mean = total / len(flat)
        sq = np.zeros(flat.shape[1])
        for start in range(0, len(flat), _CHUNK * 256):
            c = flat[start:start + _CHUNK * 256].astype(np.float64) - mean
            sq += np.einsum("ij,ij->j", c, c)
        self.mean_ = mean
        self.std_ = np.maximum(np.sqrt(sq / len(flat)), self.eps)
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Standardize with the fitted statistics; float32, same shape."""
        if self.mean_ is None or self.std_ is None:
            raise RuntimeError("Standardizer is not fitted: call fit(training_images) first")
        return per_channel_standardize(images, self.mean_, self.std_)

    def fit_transform(self, images: np.ndarray) -> np.ndarray:
        """``fit(images).transform(images)``."""
        return self.fit(images).transform(images)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly state: ``{"mean": [...], "std": [...], "eps": ...}``."""
        if self.mean_ is None or self.std_ is None:
            raise RuntimeError("Standardizer is not fitted")
        return {"mean": self.mean_.tolist(), "std": self.std_.tolist(), "eps": self.eps}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Standardizer:
        """Rebuild from :meth:`to_dict` output."""
        obj = cls(eps=state.get("eps", 1e-8))
        obj.mean_ = np.asarray(state["mean"], np.float64)
        obj.std_ = np.asarray(state["std"], np.float64)
        return obj

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (``.npz``, written atomically); returns the path."""
        state = self.to_dict()
        return _atomic_savez(path, format=np.array(_STD_FORMAT), mean=self.mean_,
                             std=self.std_, eps=np.array(state["eps"]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Standardizer:
        """Read a file written by :meth:`save`; :class:`PreprocessingFileError` if it is not one."""
        z = _load_npz(path, _STD_FORMAT, ("mean", "std", "eps"))
        return cls.from_dict({"mean": z["mean"], "std": z["std"], "eps": float(z["eps"])})


# --------------------------------------------------------------------------- ZCA


class ZCAWhitening:
    """ZCA (or PCA) whitening fitted on training images.

    ``fit`` flattens the images to ``X`` (N, D), centres it by the per-feature mean ``mu``,
    forms the covariance ``C = Xc^T Xc / N`` and its eigendecomposition ``C = U diag(lam) U^T``.
    Then, with ``g = 1 / sqrt(lam + epsilon)``:

    * ``mode="zca"``: ``W = U diag(g) U^T`` (symmetric; whitened images still look like images,
      mostly edges: the whitening closest to the identity);
    * ``mode="pca"``: ``W = diag(g) U^T`` (coordinates in the eigenbasis, largest first; the
      output keeps the input's shape but is no longer an image).

    ``transform(x) = W (x - mu)`` per image. The whitened training data has covariance
    ``U diag(lam / (lam + epsilon)) U^T``: the identity in every direction with
    ``lam >> epsilon``.

    Args:
        epsilon: added to every eigenvalue; in the *squared units of the data given to fit*.
            It caps the gain of any direction at ``1 / sqrt(epsilon)``. The default 0.1 is
            pylearn2's ``filter_bias`` used for maxout / All-CNN on GCN(55) data (per-pixel
            RMS ~1; on the 50,000 CIFAR-10 training images 720 of 3,072 eigenvalues exceed
            0.1, the largest is ~470, and the constant direction has eigenvalue 0). On [0, 1]
            data (:func:`to_float`) the covariance is ~16x smaller: there epsilon ~5e-3 keeps a
            similar number of directions (1e-2: 497 eigenvalues above it, max gain 10). A tiny
            epsilon such as 1e-6 is far too small
            for 8-bit images: the smallest eigenvalues of CIFAR-10 on [0, 1] are ~2e-6, the
            level of quantization noise ((1/255)^2 / 12 ~= 1.3e-6) and JPEG artefacts, and
            epsilon=1e-6 amplifies those near-empty directions ~575x (at most
            1/sqrt(1e-6) = 1000x), so the whitened images are dominated by noise.
        mode: ``"zca"`` or ``"pca"``.
        covariance_dtype: dtype of the ``Xc^T Xc`` product (BLAS syrk over row blocks, summed
            in float64). float32 (default) is ~2x faster than float64 and accurate to ~1e-6
            relative, well below the quantization noise of 8-bit images.
        eigh_dtype: dtype of the eigendecomposition (``scipy.linalg.eigh``, divide and
            conquer). float64 (default) resolves even the smallest eigenvalues; float32 is ~2x
            faster and fine for epsilon >= ~1e-4 x the largest eigenvalue (relative error of
            the output ~5e-4 at epsilon=1e-2 on [0, 1] CIFAR-10), but not for tiny epsilon.
        flip_invariant: fit on the images *and their horizontal mirror images* (the
            augmentation of Sec. 3.2), without materializing them: the covariance then
            commutes with the flip and splits into two half-size blocks (half the covariance
            work, a quarter of the eigendecomposition; ~1.7x less CPU time on CIFAR-10). Not
            the exact pylearn2 estimator (that is the default, False): on GCN(55) CIFAR-10
            with epsilon=0.1 the whitened images differ by ~5% (relative L2), mostly in the
            weak, high-gain directions. Needs (N, H, W, C) images of even width.

    Attributes (after ``fit``):
        mean_: (D,) float64 per-feature training mean.
        eigenvalues_: (D,) float64 covariance eigenvalues, descending, clipped at 0.
        components_: (D, D) float32 eigenvectors as rows, in the order of ``eigenvalues_``
            (sign fixed so each row's largest-magnitude entry is positive).
        whitening_matrix_: (D, D) float32 ``W`` above.
        feature_shape_: shape of one sample, e.g. (32, 32, 3); n_samples_: N used in fit.
    """

    def __init__(self, epsilon: float = PAPER_ZCA_EPSILON, mode: str = "zca", *,
                 covariance_dtype: str = "float32", eigh_dtype: str = "float64",
                 flip_invariant: bool = False) -> None:
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if mode not in ("zca", "pca"):
            raise ValueError(f"mode must be 'zca' or 'pca', got {mode!r}")
        for name, value in (("covariance_dtype", covariance_dtype), ("eigh_dtype", eigh_dtype)):
            if np.dtype(value) not in (np.float32, np.float64):
                raise ValueError(f"{name} must be float32 or float64, got {value!r}")
        self.epsilon = float(epsilon)
        self.mode = mode
        self.covariance_dtype = np.dtype(covariance_dtype).name
        self.eigh_dtype = np.dtype(eigh_dtype).name
        self.flip_invariant = bool(flip_invariant)
        self.mean_: np.ndarray | None = None
        self.eigenvalues_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.whitening_matrix_: np.ndarray | None = None
        self.feature_shape_: tuple[int, ...] | None = None
        self.n_samples_: int = 0

    def __repr__(self) -> str:
        fitted = f", fitted on {self.n_samples_} x {self.feature_shape_}" if self.fitted else ""
        flip = ", flip_invariant=True" if self.flip_invariant else ""
        return f"ZCAWhitening(epsilon={self.epsilon:g}, mode={self.mode!r}{flip}{fitted})"

    @property
    def fitted(self) -> bool:
        """True once ``fit`` (or ``load``) has set the matrices."""
        return self.whitening_matrix_ is not None

    @staticmethod
    def _as_float(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(
                f"ZCAWhitening expects float data, got {images.dtype}: convert first with "
                "to_float() or global_contrast_normalize(), since epsilon is in the data's "
                "squared units")
        return images

    def fit(self, images: np.ndarray) -> ZCAWhitening:
        """Fit on training images (N, ...) of float dtype; every other axis is a feature."""
        import scipy.linalg

        images = self._as_float(images)
        if images.ndim < 2 or len(images) < 2:
            raise ValueError(f"expected at least 2 samples (N, ...), got shape {images.shape}")
        x = images.reshape(len(images), -1)
        n, d = x.shape
        mean = np.zeros(d)
        for start in range(0, n, _CHUNK):
            mean += x[start:start + _CHUNK].sum(axis=0, dtype=np.float64)
        mean /= n
        if not np.all(np.isfinite(mean)):
            raise ValueError("images contain NaN or inf")

        if self.flip_invariant:
            mean, blocks = self._flip_blocks(images.shape, x, mean)
        else:
            mean_c = mean.astype(self.covariance_dtype)
            blocks = [(None, self._covariance(
                x, lambda xb, dt: np.subtract(xb, mean_c, dtype=dt)))]
        lams, vecs = [], []
        for expand, cov in blocks:
            lam_b, u_b = scipy.linalg.eigh(cov.astype(self.eigh_dtype), overwrite_a=True,
                                           check_finite=False, driver="evd")
            lams.append(lam_b.astype(np.float64))
            vecs.append(u_b.astype(np.float64) if expand is None else expand(u_b))
        lam = np.concatenate(lams)
        order = np.argsort(-lam, kind="stable")
        lam = np.maximum(lam[order], 0.0)
        comp = np.concatenate(vecs, axis=1)[:, order].T.astype(np.float32)  # rows: eigenvectors
        if lam[-1] + self.epsilon <= 0:
            raise ValueError("the covariance is singular (fewer samples than features, or "
                             "constant features) and epsilon is 0: use epsilon > 0")
        biggest = np.abs(comp).argmax(axis=1)
        comp *= np.where(comp[np.arange(d), biggest] < 0, -1.0, 1.0).astype(np.float32)[:, None]

        self.mean_ = mean
        self.eigenvalues_ = lam
        self.components_ = comp
        self.whitening_matrix_ = self._whitening_matrix(lam, comp, self.epsilon, self.mode)
        self.feature_shape_ = tuple(int(s) for s in images.shape[1:])
        self.n_samples_ = int(n)
        return self

    @staticmethod
    def _whitening_matrix(lam: np.ndarray, comp: np.ndarray, epsilon: float, mode: str
                          ) -> np.ndarray:
        gain = (1.0 / np.sqrt(lam + epsilon)).astype(np.float32)
        if mode == "zca":
            w = (comp.T * gain) @ comp
            w = (w + w.T) * np.float32(0.5)
        else:
            w = gain[:, None] * comp
        return np.ascontiguousarray(w, dtype=np.float32)

    def with_epsilon(self, epsilon: float, mode: str | None = None) -> ZCAWhitening:
        """A fitted copy with another ``epsilon`` (and ``mode``), from this fit's mean and
        eigendecomposition: no refit (the 3,072 x 3,072 eigendecomposition is the slow part).
        Equal to fitting again with those settings (``flip_invariant`` kept)."""
        if not self.fitted:
            raise RuntimeError("ZCAWhitening is not fitted: call fit(training_images) first")
        other = ZCAWhitening(epsilon, mode or self.mode, covariance_dtype=self.covariance_dtype,
                             eigh_dtype=self.eigh_dtype, flip_invariant=self.flip_invariant)
        if self.eigenvalues_[-1] + other.epsilon <= 0:
            raise ValueError("the covariance is singular and epsilon is 0: use epsilon > 0")
        other.mean_, other.eigenvalues_ = self.mean_, self.eigenvalues_
        other.components_ = self.components_
        other.whitening_matrix_ = self._whitening_matrix(self.eigenvalues_, self.components_,
                                                         other.epsilon, other.mode)
        other.feature_shape_, other.n_samples_ = self.feature_shape_, self.n_samples_
        return other

    def _covariance(self, x: np.ndarray, center: Any) -> np.ndarray:
        """``sum(c^T c) / N`` over row blocks ``c = center(block, dtype)``, summed in float64."""
        cdt = np.dtype(self.covariance_dtype)
        n, d = x.shape
        cov = None
        block = max(2 * d, (1 << 24) // d)  # ~64 MB float32 blocks: few, efficient BLAS calls
        for start in range(0, n, block):
            xc = center(x[start:start + block], cdt)
            part = xc.T @ xc  # a.T @ a: NumPy calls BLAS syrk (half the work of gemm)
            cov = part.astype(np.float64) if cov is None else cov + part
        return cov / n

    def _flip_blocks(self, shape: tuple[int, ...], x: np.ndarray, mean: np.ndarray) -> Any:
        """Mean and covariance blocks of the images plus their mirror images (flip_invariant).

        In the coordinates ``s = (x_left + mirror(x_right)) / sqrt(2)`` and
        ``a = (x_left - mirror(x_right)) / sqrt(2)`` the covariance of the flip-augmented set is
        block diagonal (``a`` changes sign under the flip), so two D/2 problems replace one of
        size D: half the covariance work and a quarter of the eigendecomposition.
        """
        if len(shape) != 4 or shape[2] % 2:
            raise ValueError("flip_invariant needs (N, H, W, C) images of even width, got "
                             f"shape {shape}")
        h, w, c = shape[1:]
        index = np.arange(h * w * c).reshape(h, w, c)
        left = index[:, : w // 2].reshape(-1)
        right = index[:, ::-1][:, : w // 2].reshape(-1)  # the mirror partner of each left
        mirrored = index[:, ::-1].reshape(-1)
        mean = (mean + mean[mirrored]) / 2  # mean of the images and their mirror images
        r = np.sqrt(0.5)
        mean_s = ((mean[left] + mean[right]) * r).astype(self.covariance_dtype)

        def halves(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # strided views (no gathers), in the order of ``left`` and ``right``
            xb = xb.reshape(-1, h, w, c)
            return xb[:, :, : w // 2], xb[:, :, ::-1][:, :, : w // 2]

        def sym(xb: np.ndarray, dt: np.dtype) -> np.ndarray:
            out = np.add(*halves(xb), dtype=dt).reshape(len(xb), -1)
            out *= dt.type(r)
            out -= mean_s
            return out

        def anti(xb: np.ndarray, dt: np.dtype) -> np.ndarray:
            out = np.subtract(*halves(xb), dtype=dt).reshape(len(xb), -1)
            out *= dt.type(r)
            return out

        cov_s = self._covariance(x, sym)
        cov_a = self._covariance(x, anti)

        def expander(sign: float) -> Any:
            def expand(u_b: np.ndarray) -> np.ndarray:
                full = np.empty((h * w * c, u_b.shape[1]))
                full[left] = u_b * r
                full[right] = sign * u_b * r
                return full
            return expand

        return mean, [(expander(1.0), cov_s), (expander(-1.0), cov_a)]

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Whiten any batch (M, *feature_shape) or one sample (*feature_shape); float32."""
        if not self.fitted:
            raise RuntimeError("ZCAWhitening is not fitted: call fit(training_images) first")
        images = self._as_float(images)
        fshape = self.feature_shape_
        single = images.shape == fshape
        if not single and images.shape[1:] != fshape:
            raise ValueError(f"expected samples of shape {fshape}, got array of shape "
                             f"{images.shape}")
        x = images.reshape(1 if single else len(images), -1)
        wt = self.whitening_matrix_.T  # Fortran-ordered view: BLAS handles it without a copy
        mean32 = self.mean_.astype(np.float32)
        out = np.empty(x.shape, np.float32)
        for start in range(0, len(x), _CHUNK):
            np.matmul(x[start:start + _CHUNK].astype(np.float32) - mean32, wt,
                      out=out[start:start + _CHUNK])
        return out.reshape(images.shape)

    def fit_transform(self, images: np.ndarray) -> np.ndarray:
        """``fit(images).transform(images)``."""
        return self.fit(images).transform(images)

    def max_gain(self) -> float:
        """Largest amplification of any input direction: ``1 / sqrt(min(lam) + epsilon)``."""
        if self.eigenvalues_ is None:
            raise RuntimeError("ZCAWhitening is not fitted")
        return float(1.0 / np.sqrt(self.eigenvalues_[-1] + self.epsilon))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted state to ``path`` (``.npz`` appended if missing), atomically.

        The arrays go to a temporary file in the same folder, which then replaces ``path``
        with ``os.replace``: an interrupted save never leaves a half-written file behind.
        """
        if not self.fitted:
            raise RuntimeError("ZCAWhitening is not fitted: nothing to save")
        return _atomic_savez(
            path, format=np.array(_ZCA_FORMAT), epsilon=np.array(self.epsilon),
            mode=np.array(self.mode), covariance_dtype=np.array(self.covariance_dtype),
            eigh_dtype=np.array(self.eigh_dtype), flip_invariant=np.array(self.flip_invariant),
            feature_shape=np.array(self.feature_shape_, np.int64),
            n_samples=np.array(self.n_samples_, np.int64), mean=self.mean_,
            eigenvalues=self.eigenvalues_, components=self.components_,
            whitening_matrix=self.whitening_matrix_)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZCAWhitening:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            PreprocessingFileError: the file is corrupt, truncated, or not a saved
                ZCAWhitening; the message names the file.
        """
        keys = ("epsilon", "mode", "covariance_dtype", "eigh_dtype", "flip_invariant",
                "feature_shape",
                "n_samples", "mean", "eigenvalues", "components", "whitening_matrix")
        z = _load_npz(path, _ZCA_FORMAT, keys)
        shape = tuple(int(s) for s in z["feature_shape"])
        d = int(np.prod(shape))
        expected = {"mean": (d,), "eigenvalues": (d,), "components": (d, d),
                    "whitening_matrix": (d, d)}
        for key, want in expected.items():
            if z[key].shape != want:
                raise PreprocessingFileError(
                    f"{path}: '{key}' has shape {z[key].shape}, expected {want} for samples "
                    f"of shape {shape} (corrupt file?). Fix: fit and save the whitening again")
        obj = cls(float(z["epsilon"]), str(z["mode"]), covariance_dtype=str(z["covariance_dtype"]),
                  eigh_dtype=str(z["eigh_dtype"]), flip_invariant=bool(z["flip_invariant"]))
        obj.mean_ = z["mean"].astype(np.float64)
        obj.eigenvalues_ = z["eigenvalues"].astype(np.float64)
        obj.components_ = z["components"].astype(np.float32)
        obj.whitening_matrix_ = z["whitening_matrix"].astype(np.float32)
        obj.feature_shape_ = shape
        obj.n_samples_ = int(z["n_samples"])
        return obj


def gcn_zca(x_train: np.ndarray, *others: np.ndarray, scale: float = PAPER_GCN_SCALE,
            epsilon: float = PAPER_ZCA_EPSILON, **zca_kwargs: Any
            ) -> tuple[ZCAWhitening, tuple[np.ndarray, ...]]:
    """The paper's no-augmentation preprocessing: GCN(scale) then ZCA fitted on ``x_train``.

    Returns ``(zca, (train, *others))``: float32 arrays of the input shapes; ``others``
    (validation, test) are transformed with the statistics of ``x_train`` only. GCN leaves
    every image with zero mean, so the constant direction has eigenvalue 0 and gain exactly
    ``1 / sqrt(epsilon)`` (3.16 for 0.1).
    """
    zca = ZCAWhitening(epsilon, **zca_kwargs)
    train = zca.fit_transform(global_contrast_normalize(x_train, scale))
    rest = tuple(zca.transform(global_contrast_normalize(x, scale)) for x in others)
    return zca, (train, *rest)


def _atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_npz(path: str | os.PathLike, fmt: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    kind = fmt.split("/")[0].split(".")[-1]
    fix = f"point at a file written by {kind}.save(), or fit and save it again"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Fix: {fix}")
    problem = None
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            problem = f"a single {type(z).__name__}, not an .npz archive"
        else:
            with z:
                got = {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        problem = f"not a readable .npz file ({type(err).__name__}: {err})"
    if problem is not None:
        raise PreprocessingFileError(f"{path}: {problem}. Fix: {fix}")
    found = str(got["format"]) if "format" in got else "no format tag"
    if found != fmt:
        raise PreprocessingFileError(f"{path}: not a saved {kind} (format: {found}, expected "
                                     f"{fmt}). Fix: {fix}")
    missing = [k for k in keys if k not in got]
    if missing:
        raise PreprocessingFileError(f"{path}: missing {', '.join(missing)} (corrupt file?). "
                                     f"Fix: {fix}")
    return got


# --------------------------------------------------------------------------- augmentation: NumPy


def resolve_max_shift(max_shift: int | float, size: int | None) -> int:
    """Pixels of shift: an int is pixels; a float in [0, 1) a fraction of ``size`` (rounded).

    ``resolve_max_shift(0.1, 32) == 3``. ``size=None`` (unknown) accepts only ints.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int | float | np.integer |
                                                     np.floating):
        raise TypeError(f"max_shift must be an int (pixels) or a float fraction, got "
                        f"{max_shift!r}")
    if isinstance(max_shift, int | np.integer):
        pixels = int(max_shift)
    elif size is None:
        raise ValueError("a fractional max_shift needs a known image size; pass int pixels")
    elif 0.0 <= max_shift < 1.0:
        pixels = int(round(float(max_shift) * size))
    else:
        raise ValueError(f"a float max_shift is a fraction of the image size in [0, 1), got "
                         f"{max_shift}; pass an int for pixels")
    if pixels < 0 or (size is not None and pixels >= size):
        raise ValueError(f"max_shift must be in [0, {size}) pixels for size {size}, got {pixels}")
    return pixels


def flip_horizontal(images: np.ndarray) -> np.ndarray:
    """Mirror left-right: ``out[..., i, j, :] = images[..., i, W - 1 - j, :]`` (channels last)."""
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {images.shape}")
    return np.ascontiguousarray(images[..., ::-1, :])


def shift_image(image: np.ndarray, dy: int, dx: int, fill: float = 0) -> np.ndarray:
    """Shift one (H, W, C) image by whole pixels: ``out[i, j] = image[i - dy, j - dx]``.

    Positive ``dy`` moves the content down, positive ``dx`` right; uncovered pixels get
    ``fill``. Shape and dtype are kept.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected one (H, W, C) image, got shape {image.shape}")
    h, w = image.shape[:2]
    out = np.full_like(image, fill)
    dy, dx = int(dy), int(dx)
    if abs(dy) < h and abs(dx) < w:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def shift_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flips: np.ndarray,
               fill: float = 0) -> np.ndarray:
    """Per image: flip left-right where ``flips``, then shift by ``(dy, dx)``; vectorized.

    ``images`` (N, H, W, C); ``dy``, ``dx`` int (N,); ``flips`` bool (N,). Same shape and dtype.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    n, h, w = images.shape[:3]
    dy = np.asarray(dy, np.int64).reshape(n, 1)
    dx = np.asarray(dx, np.int64).reshape(n, 1)
    flips = np.asarray(flips, bool).reshape(n, 1)
    rows = np.arange(h)[None, :] - dy  # (N, H) source row of each output row
    cols = np.arange(w)[None, :] - dx  # (N, W) source column before the flip
    valid = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    cols = np.where(flips, w - 1 - cols, cols)
    out = images[np.arange(n)[:, None, None], np.clip(rows, 0, h - 1)[:, :, None],
                 np.clip(cols, 0, w - 1)[:, None, :]]
    out[~valid] = fill
    return out


def random_shift_flip(
    images: np.ndarray,
    rng: np.random.Generator | int | None = None,
    max_shift: int | float = 0.1,
    flip: bool = True,
    fill: str | float = "zero",
    *,
    return_params: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """"Horizontal flips and translations" (Springenberg et al. Sec. 3.2), in NumPy.

    Each image is flipped left-right with probability 0.5 (if ``flip``), then shifted by
    integers ``dy``, ``dx`` drawn independently and uniformly from ``[-s, s]``, where ``s`` is
    :func:`resolve_max_shift` of ``max_shift`` (0.1 -> 3 pixels on 32x32). Borders are filled
    with zeros (``fill="zero"``) or a given number. Shape and dtype are kept. With
    ``return_params`` also returns ``(dy, dx, flips)``.
    """
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4:
        raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {images.shape}")
    value = 0 if isinstance(fill, str) and fill == "zero" else fill
    if isinstance(value, str):
        raise ValueError(f"fill must be 'zero' or a number, got {fill!r}")
    rng = np.random.default_rng(rng)
    n, h, w = batch.shape[:3]
    sy, sx = resolve_max_shift(max_shift, h), resolve_max_shift(max_shift, w)
    dy = rng.integers(-sy, sy + 1, size=n)
    dx = rng.integers(-sx, sx + 1, size=n)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    out = shift_flip(batch, dy, dx, flips, value)
    out = out[0] if single else out
    return (out, dy, dx, flips) if return_params else out


# --------------------------------------------------------------------------- augmentation: Keras


def _shift_flip_backend(xnp: Any, core: Any, images: Any, dy: Any, dx: Any, flips: Any,
                        fill: float) -> Any:
    """:func:`shift_flip` with ops from ``xnp`` (numpy-like) and ``core`` (shape, cast).

    ``images`` (B, H, W, C). One gather of (B*H*W) rows: exact on every backend (no matmul,
    hence no TF32/bf16 rounding on accelerators).
    """
    b, h, w, c = core.shape(images)
    dy = xnp.reshape(core.cast(dy, "int32"), (-1, 1))
    dx = xnp.reshape(core.cast(dx, "int32"), (-1, 1))
    flips = xnp.reshape(core.cast(flips, "bool"), (-1, 1))
    rows = xnp.expand_dims(xnp.arange(h, dtype="int32"), 0) - dy  # (B, H)
    cols = xnp.expand_dims(xnp.arange(w, dtype="int32"), 0) - dx  # (B, W)
    valid = xnp.logical_and(
        xnp.expand_dims(xnp.logical_and(rows >= 0, rows < h), 2),
        xnp.expand_dims(xnp.logical_and(cols >= 0, cols < w), 1))  # (B, H, W)
    cols = xnp.where(flips, (w - 1) - cols, cols)
    rows = xnp.clip(rows, 0, h - 1)
    cols = xnp.clip(cols, 0, w - 1)
    base = xnp.reshape(xnp.arange(b, dtype="int32") * (h * w), (-1, 1, 1))
    index = base + xnp.expand_dims(rows * w, 2) + xnp.expand_dims(cols, 1)  # (B, H, W)
    flat = xnp.reshape(images, (-1, c))
    gathered = xnp.take(flat, xnp.reshape(index, (-1,)), axis=0)
    gathered = xnp.reshape(gathered, (b, h, w, c))
    filler = xnp.full_like(gathered, fill)
    return xnp.where(xnp.expand_dims(valid, 3), gathered, filler)


def ops_shift_flip(images: Any, dy: Any, dx: Any, flips: Any, fill: float = 0.0) -> Any:
    """:func:`shift_flip` in ``keras.ops`` (any backend, inside models); keeps the dtype."""
    images = keras.ops.convert_to_tensor(images)
    single = len(keras.ops.shape(images)) == 3
    batch = keras.ops.expand_dims(images, 0) if single else images
    out = _shift_flip_backend(keras.ops, keras.ops, batch, dy, dx, flips, fill)
    return out[0] if single else out


@keras.saving.register_keras_serializable(package="allcnn")
class RandomShiftFlip(_DataLayer):
    """Keras 3 layer: random horizontal flip (p = 0.5) and integer shift with zero fill.

    The semantics of :func:`random_shift_flip` (flip, then shift by ``dy, dx`` uniform in
    ``[-max_shift, max_shift]``), built like ``keras.layers.RandomFlip`` on Keras' data-layer
    base, so it runs on every backend inside a model *and* in a ``tf.data`` pipeline
    (``dataset.map(layer)``) whatever the backend. Randomness comes from a
    ``keras.random.SeedGenerator``: two layers with the same ``seed`` give the same sequence.
    Identity when called with ``training=False`` (``model.predict``/``evaluate``). Output dtype
    is the layer's compute dtype (float32), like Keras' own augmentation layers.

    Args:
        max_shift: int pixels, or a float fraction of the image size in [0, 1).
        flip: draw horizontal flips.
        fill_value: value of uncovered pixels.
        seed: int seed, or None for a random one.
    """

    def __init__(self, max_shift: int | float = 3, flip: bool = True, fill_value: float = 0.0,
                 seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        resolve_max_shift(max_shift, 1 << 30)  # validates type and sign early
        self.max_shift = max_shift
        self.flip = bool(flip)
        self.fill_value = float(fill_value)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)
        self.supports_jit = True

    def call(self, inputs: Any, training: bool = True) -> Any:
        be = self.backend
        images = be.cast(inputs, self.compute_dtype)
        if not training:
            return images
        single = len(be.shape(images)) == 3
        if single:
            images = be.numpy.expand_dims(images, 0)
        b, h, w, _ = be.shape(images)
        sy = resolve_max_shift(self.max_shift, h if isinstance(h, int) else None)
        sx = resolve_max_shift(self.max_shift, w if isinstance(w, int) else None)
        seed = self._get_seed_generator(be._backend)
        dy = be.random.randint((b,), -sy, sy + 1, dtype="int32", seed=seed)
        dx = be.random.randint((b,), -sx, sx + 1, dtype="int32", seed=seed)
        if self.flip:
            flips = be.random.uniform((b,), seed=seed) < 0.5
        else:
            flips = be.numpy.zeros((b,), dtype="bool")
        out = _shift_flip_backend(be.numpy, be, images, dy, dx, flips, self.fill_value)
        return out[0] if single else out

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(max_shift=self.max_shift, flip=self.flip, fill_value=self.fill_value,
                      seed=self.seed)
        return config


# --------------------------------------------------------------------------- augmentation: TF


def tf_shift_flip(images: Any, dy: Any, dx: Any, flips: Any,
                  fill_value: float | str = 0) -> Any:
    """:func:`shift_flip` in pure TensorFlow (two batched gathers); keeps shape and dtype.

    ``fill_value="reflect"`` fills the uncovered border with the image mirrored at its edge
    (``numpy.pad(mode="reflect")``): a shift by ``(dy, dx)`` is then a random crop of the
    reflect-padded image, the translation of the fast recipes (Page 2018, airbench).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    batch = images[None] if single else images
    shape = tf.shape(batch)
    h, w = shape[1], shape[2]
    dy = tf.reshape(tf.cast(dy, tf.int32), [-1, 1])
    dx = tf.reshape(tf.cast(dx, tf.int32), [-1, 1])
    flips = tf.reshape(tf.cast(flips, tf.bool), [-1, 1])
    rows = tf.range(h)[None, :] - dy
    cols = tf.range(w)[None, :] - dx
    valid = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    reflect = isinstance(fill_value, str)
    if reflect:
        if fill_value != "reflect":
            raise ValueError(f"fill_value must be a number or 'reflect', got {fill_value!r}")
        rows = (h - 1) - tf.abs((h - 1) - tf.abs(rows))  # mirror at 0 and at h - 1
        cols = (w - 1) - tf.abs((w - 1) - tf.abs(cols))
    cols = tf.where(flips, w - 1 - cols, cols)
    out = tf.gather(batch, tf.clip_by_value(rows, 0, h - 1), axis=1, batch_dims=1)
    out = tf.gather(out, tf.clip_by_value(cols, 0, w - 1), axis=2, batch_dims=1)
    if not reflect:
        out = tf.where(valid[..., None], out, tf.cast(fill_value, out.dtype))
    return out[0] if single else out


def tf_random_shift_flip(images: Any, labels: Any = None, max_shift: int | float = 3,
                         seed: Any = None, flip: bool = True,
                         fill_value: float | str = 0) -> Any:
    """Random flip + shift for a ``tf.data`` map (semantics of :func:`random_shift_flip`).

    ``seed``: a stateless seed, int tensor of shape [2] (vary it per batch, e.g. with
    :func:`augment_dataset`), or None for TF's global stateful generator. Returns
    ``(images, labels)`` when ``labels`` is given, else the images; dtype is kept.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    batch = images[None] if single else images
    sy = resolve_max_shift(max_shift, batch.shape[1])  # static sizes (None if unknown)
    sx = resolve_max_shift(max_shift, batch.shape[2])
    n = tf.shape(batch)[:1]
    if seed is None:
        dy = tf.random.uniform(n, -sy, sy + 1, dtype=tf.int32)
        dx = tf.random.uniform(n, -sx, sx + 1, dtype=tf.int32)
        flips = tf.random.uniform(n) < 0.5
    else:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
        dy = tf.random.stateless_uniform(n, seeds[0], -sy, sy + 1, dtype=tf.int32)
        dx = tf.random.stateless_uniform(n, seeds[1], -sx, sx + 1, dtype=tf.int32)
        flips = tf.random.stateless_uniform(n, seeds[2]) < 0.5
    if not flip:
        flips = tf.zeros_like(flips)
    out = tf_shift_flip(batch, dy, dx, flips, fill_value)
    out = out[0] if single else out
    return out if labels is None else (out, labels)


def augment_dataset(dataset: Any, max_shift: int | float = 3, seed: int = 0, flip: bool = True,
                    fill_value: float | str = 0, num_parallel_calls: int | None = None) -> Any:
    """Map :func:`tf_random_shift_flip` over a batched ``tf.data`` dataset, reproducibly.

    Elements are images or ``(images, labels, ...)`` tuples (the first item is augmented).
    Per-batch stateless seeds come from ``tf.data.Dataset.random(seed,
    rerandomize_each_iteration=True)``: the same ``seed`` gives the same augmentations in every
    run, different ones in every epoch, independent of ``num_parallel_calls``.
    """
    import tensorflow as tf

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def apply(element: Any, pair: Any) -> Any:
        if isinstance(element, tuple):
            first = tf_random_shift_flip(element[0], None, max_shift, pair, flip, fill_value)
            return (first, *element[1:])
        return tf_random_shift_flip(element, None, max_shift, pair, flip, fill_value)

    zipped = tf.data.Dataset.zip((dataset, seeds))
    if num_parallel_calls is None:
        return zipped.map(apply)
    return zipped.map(apply, num_parallel_calls=num_parallel_calls, deterministic=True)
