"""Tests of allcnn_lib.preprocessing on real CIFAR-10 images from the shipped sample.

With 1,800 sample images and D = 3,072 values per image the covariance of whole images is rank
deficient, so "whitened covariance = I" is checked where N >> D: on 20,000 random 6x6x3 patches
(D = 108) and on the images average-pooled to 8x8x3 (D = 192). Whole-image fits are left to
benchmarks/bench_zca.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from allcnn_lib import preprocessing as P
from allcnn_lib.preprocessing import PreprocessingFileError, Standardizer, ZCAWhitening


@pytest.fixture(scope="module")
def train_u8(cifar_sample) -> np.ndarray:
    return cifar_sample.x_train


@pytest.fixture(scope="module")
def patches(train_u8) -> np.ndarray:
    """20,000 random 6x6x3 patches of real images, [0, 1] floats (N >> D = 108)."""
    rng = np.random.default_rng(0)
    img, top, left = (rng.integers(0, hi, 20_000) for hi in (len(train_u8), 27, 27))
    rows, cols = top[:, None] + np.arange(6), left[:, None] + np.arange(6)
    return P.to_float(train_u8[img[:, None, None], rows[:, :, None], cols[:, None, :]])


def pool(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats, average-pooled 4x4: (N, 8, 8, 3), D = 192."""
    return P.to_float(x).reshape(len(x), 8, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def pooled(train_u8) -> np.ndarray:
    return pool(train_u8)


def covariance(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    return flat.T @ flat / len(flat)


# --------------------------------------------------------------------------- scaling


def test_to_float_and_gcn(train_u8):
    x = P.to_float(train_u8[:500])
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x * 255, train_u8[:500].astype(np.float32))
    with pytest.raises(TypeError):
        P.to_float(np.zeros(3, np.int32))
    g = P.global_contrast_normalize(train_u8[:500])  # pylearn2 CIFAR10(gcn=55.)
    assert g.dtype == np.float32 and g.shape == x.shape
    flat = g.reshape(len(g), -1).astype(np.float64)
    np.testing.assert_allclose(flat.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 55.0, rtol=1e-5)
    v = train_u8[7].reshape(-1).astype(np.float64)
    c = v - v.mean()
    np.testing.assert_allclose(g[7].reshape(-1), 55.0 * c / np.sqrt((c**2).sum()), rtol=1e-5)
    np.testing.assert_allclose(P.global_contrast_normalize(x), g, atol=2e-4)  # scale-free
    constant = np.full((1, 32, 32, 3), 128, np.uint8)  # nothing to normalize: 0, not NaN
    np.testing.assert_array_equal(P.global_contrast_normalize(constant), 0.0)


def test_standardizer_per_channel_and_file(train_u8, cifar_sample, tmp_path):
    st = Standardizer().fit(train_u8)
    z = st.transform(train_u8).astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(st.mean_, train_u8.reshape(-1, 3).mean(axis=0), rtol=1e-10)
    v = st.transform(cifar_sample.x_val)  # other splits use the training statistics
    assert not np.allclose(v.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    path = st.save(tmp_path / "std")
    assert path.name == "std.npz"
    loaded = Standardizer.load(path)
    np.testing.assert_array_equal(loaded.transform(train_u8[:10]), st.transform(train_u8[:10]))


# --------------------------------------------------------------------------- ZCA


def test_zca_whitened_covariance_is_the_formula(patches):
    eps = 1e-4
    zca = ZCAWhitening(epsilon=eps).fit(patches)
    z = zca.transform(patches)
    assert z.shape == patches.shape and z.dtype == np.float32
    w = zca.whitening_matrix_
    np.testing.assert_array_equal(w, w.T)  # ZCA: symmetric
    u, lam = zca.components_.T.astype(np.float64), zca.eigenvalues_
    assert np.all(np.diff(lam) <= 0) and lam[-1] > 0
    # the whitened covariance is U diag(lam / (lam + eps)) U^T: the identity where lam >> eps
    np.testing.assert_allclose(covariance(z), (u * (lam / (lam + eps))) @ u.T, atol=3e-4)
    np.testing.assert_allclose(covariance(z.reshape(len(z), -1) @ u[:, :20]), np.eye(20),
                               atol=0.011)


def test_zca_on_real_images_with_realistic_epsilon(pooled, cifar_sample):
    eps = 1e-3
    zca = ZCAWhitening(epsilon=eps).fit(pooled)
    u, lam = zca.components_.astype(np.float64), zca.eigenvalues_
    top = lam > 100 * eps  # white where lam >> eps, shrunk below
    assert 10 <= top.sum() < 192
    in_basis = np.diag(u @ covariance(zca.transform(pooled)) @ u.T)
    np.testing.assert_allclose(in_basis[top], 1.0, atol=0.011)
    assert in_basis[~top].min() < 0.5
    held_out = np.diag(u @ covariance(zca.transform(pool(cifar_sample.x_val))) @ u.T)
    assert 0.5 < np.median(held_out[:20]) < 2.0  # only approximately white


def test_larger_epsilon_shrinks_noise_amplification(patches):
    x = patches[:2000]
    noise = (np.random.default_rng(1).random(x.shape, np.float32) - 0.5) / 255  # 8-bit rounding
    gains = []
    for eps in (1e-6, 1e-4, 1e-2, 1e-1):
        zca = ZCAWhitening(epsilon=eps).fit(patches)
        spectral = np.linalg.norm(zca.whitening_matrix_.astype(np.float64), 2)
        np.testing.assert_allclose(spectral, zca.max_gain(), rtol=1e-3)
        d = zca.transform(x + noise) - zca.transform(x)
        gains.append(np.linalg.norm(d) / np.linalg.norm(noise))
    assert np.all(np.diff(gains) < 0) and gains[0] > 10 * gains[2]


def test_zca_any_batch_and_clear_errors(pooled):
    a = ZCAWhitening(epsilon=1e-2).fit(pooled)
    whole = a.transform(pooled)
    np.testing.assert_array_equal(whole, ZCAWhitening(epsilon=1e-2).fit(pooled).transform(pooled))
    np.testing.assert_allclose(a.transform(pooled[:7]), whole[:7], atol=1e-5)
    np.testing.assert_allclose(a.transform(pooled[3]), whole[3], atol=1e-5)  # one image
    with pytest.raises(ValueError, match="shape"):
        a.transform(pooled[:, :4])
    with pytest.raises(TypeError, match="to_float"):
        ZCAWhitening().fit((pooled * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="singular"):
        ZCAWhitening(epsilon=0.0).fit(pooled[:100])  # N < D = 192
    with pytest.raises(RuntimeError, match="not fitted"):
        ZCAWhitening().transform(pooled)


def test_zca_save_load_and_bad_files(pooled, tmp_path):
    zca = ZCAWhitening(epsilon=1e-2).fit(pooled)
    path = zca.save(tmp_path / "sub" / "zca")
    assert path == tmp_path / "sub" / "zca.npz"
    assert [p.name for p in path.parent.iterdir()] == ["zca.npz"]  # no temporary left
    loaded = ZCAWhitening.load(path)
    assert (loaded.epsilon, loaded.feature_shape_) == (1e-2, (8, 8, 3))
    for key in ("mean_", "eigenvalues_", "components_", "whitening_matrix_"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(zca, key))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    other = Standardizer().fit(pooled).save(tmp_path / "standardizer.npz")
    for bad, why in ((garbage, "readable"), (truncated, "readable"), (single, "readable"),
                     (other, "not a saved ZCAWhitening")):
        with pytest.raises(PreprocessingFileError, match=why) as err:
            ZCAWhitening.load(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ZCAWhitening.load(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- augmentation


def reference_shift_flip(image: np.ndarray, dy: int, dx: int, flip: bool,
                         fill: float | str = 0) -> np.ndarray:
    """out[i, j] = flipped[i - dy, j - dx], written out pixel by pixel (or a reflect crop)."""
    src = image[:, ::-1] if flip else image
    h, w = src.shape[:2]
    if fill == "reflect":
        padded = np.pad(src, ((h - 1, h - 1), (w - 1, w - 1), (0, 0)), mode="reflect")
        return padded[h - 1 - dy:2 * h - 1 - dy, w - 1 - dx:2 * w - 1 - dx]
    out = np.full_like(src, fill)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[i, j] = src[i - dy, j - dx]
    return out


def locate(src: np.ndarray, out: np.ndarray, s: int) -> list[tuple[int, int, bool] | None]:
    """For each output image, the (dy, dx, flip) with |dy|, |dx| <= s that produces it."""
    found = []
    for image, result in zip(src, out, strict=True):
        hits = [(dy, dx, f) for f in (False, True) for dy in range(-s, s + 1)
                for dx in range(-s, s + 1)
                if np.array_equal(reference_shift_flip(image, dy, dx, f), result)]
        found.append(hits[0] if hits else None)
    return found


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("fill", [0, "reflect"])
def test_tf_shift_flip_matches_reference(train_u8, dtype, fill):
    rng = np.random.default_rng(4)
    x = train_u8[:12].astype(dtype)
    dy, dx = rng.integers(-5, 6, 12), rng.integers(-5, 6, 12)
    dy[0], dx[0] = 31, -31  # all but one corner pixel uncovered
    flips = rng.random(12) < 0.5
    out = P.tf_shift_flip(x, dy, dx, flips, fill).numpy()
    assert out.dtype == dtype and out.shape == x.shape
    for k in range(12):
        np.testing.assert_array_equal(out[k], reference_shift_flip(x[k], dy[k], dx[k],
                                                                   flips[k], fill))
    with pytest.raises(ValueError, match="reflect"):
        P.tf_shift_flip(x, dy, dx, flips, "wrap")


def test_augment_dataset_bounds_rate_seeds_and_new_every_epoch(train_u8, cifar_sample):
    import tensorflow as tf

    x, y = train_u8[:64], cifar_sample.y_train[:64]

    def epochs(seed):
        base = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        ds = P.augment_dataset(base, max_shift=0.1, seed=seed)  # 10% of 32 px: 3
        batches = [list(ds) for _ in range(2)]
        for epoch in batches:
            np.testing.assert_array_equal(np.concatenate([b[1] for b in epoch]), y)
        return [np.concatenate([b[0].numpy() for b in epoch]) for epoch in batches]

    first, second = epochs(0)
    assert not np.array_equal(first, second)
    again = epochs(0)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    found = locate(x, first, 3)
    assert all(f is not None for f in found)
    assert {abs(f[0]) for f in found} >= {0, 3} and 0.3 < np.mean([f[2] for f in found]) < 0.7
