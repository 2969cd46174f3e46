"""Tests of allcnn_lib.preprocessing on real CIFAR-10 images from the shipped sample.

Whitening: with N = 1,800 sample images and D = 3,072 dimensions the sample covariance of full
images is rank deficient, so "whitened covariance = I" is checked where N >> D: on 20,000
random 6x6x3 patches (D = 108) of real images, and on the images average-pooled 4x4 to 8x8x3
(D = 192 < N = 1,800). On the latter the check restricted to the top eigen-directions is made
with a realistic epsilon. Full 32x32x3 fits (a 3072x3072 eigendecomposition, several seconds)
are left to benchmarks/bench_zca.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from allcnn_lib import preprocessing as P
from allcnn_lib.preprocessing import PreprocessingFileError, Standardizer, ZCAWhitening

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def train_u8(cifar_sample) -> np.ndarray:
    return cifar_sample.x_train


@pytest.fixture(scope="module")
def train_f(train_u8) -> np.ndarray:
    return P.to_float(train_u8)


@pytest.fixture(scope="module")
def patches(train_f) -> np.ndarray:
    """20,000 random 6x6x3 patches of real images, [0, 1] floats (N >> D = 108)."""
    rng = np.random.default_rng(0)
    n = 20_000
    img = rng.integers(0, len(train_f), n)
    top = rng.integers(0, 32 - 6 + 1, n)
    left = rng.integers(0, 32 - 6 + 1, n)
    rows = top[:, None] + np.arange(6)
    cols = left[:, None] + np.arange(6)
    return train_f[img[:, None, None], rows[:, :, None], cols[:, None, :]]


@pytest.fixture(scope="module")
def pooled(train_f) -> np.ndarray:
    """The sample images average-pooled 4x4: (1800, 8, 8, 3), so D = 192 << N."""
    return pool(train_f)


def pool(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 8, 4, 8, 4, 3).mean(axis=(2, 4)).astype(np.float32)


def covariance(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    return flat.T @ flat / len(flat)


def candidates(image: np.ndarray, s: int) -> tuple[np.ndarray, list[tuple[int, int, bool]]]:
    """Every flip/shift of one image with |dy|, |dx| <= s, and their parameters."""
    params = [(dy, dx, f) for f in (False, True) for dy in range(-s, s + 1)
              for dx in range(-s, s + 1)]
    dy, dx, fl = (np.array(v) for v in zip(*params, strict=True))
    return P.shift_flip(np.repeat(image[None], len(params), 0), dy, dx, fl), params


def locate(src: np.ndarray, out: np.ndarray, s: int) -> list[tuple[int, int, bool] | None]:
    """For each output image, the (dy, dx, flip) with |dy|, |dx| <= s that produces it."""
    found = []
    for x, y in zip(src, np.asarray(out), strict=True):
        cands, params = candidates(x, s)
        hit = np.flatnonzero((cands == y.astype(cands.dtype)).all(axis=(1, 2, 3)))
        found.append(params[hit[0]] if len(hit) and (cands[hit[0]] == y).all() else None)
    return found


# --------------------------------------------------------------------------- scaling


def test_to_float_range_and_dtype(train_u8):
    x = P.to_float(train_u8)
    assert x.dtype == np.float32 and x.shape == train_u8.shape
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x * 255, train_u8.astype(np.float32))
    assert P.to_float(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    with pytest.raises(TypeError):
        P.to_float(np.zeros(3, np.int32))


def test_gcn_zero_mean_and_scale(train_u8):
    x = train_u8[:500]
    g = P.global_contrast_normalize(x)  # pylearn2 CIFAR10(gcn=55.)
    assert g.dtype == np.float32 and g.shape == x.shape
    flat = g.reshape(len(g), -1).astype(np.float64)
    np.testing.assert_allclose(flat.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 55.0, rtol=1e-5)
    # the exact formula, for one image
    v = x[7].reshape(-1).astype(np.float64)
    c = v - v.mean()
    np.testing.assert_allclose(g[7].reshape(-1), 55.0 * c / np.sqrt((c ** 2).sum()), rtol=1e-5)
    # scale invariant: uint8 and [0, 1] input give the same result
    np.testing.assert_allclose(P.global_contrast_normalize(P.to_float(x)), g, atol=2e-4)
    # use_std: per-image std (ddof=1, as pylearn2) equals the scale
    s = P.global_contrast_normalize(x, scale=2.0, use_std=True).reshape(len(x), -1)
    np.testing.assert_allclose(s.astype(np.float64).std(axis=1, ddof=1), 2.0, rtol=1e-5)
    # a constant image has nothing to normalize: zeros, not NaN
    flat_image = np.full((1, 32, 32, 3), 128, np.uint8)
    np.testing.assert_array_equal(P.global_contrast_normalize(flat_image), 0.0)


def test_standardizer_per_channel(train_u8, cifar_sample, tmp_path):
    st = Standardizer().fit(train_u8)
    z = st.transform(train_u8)
    assert z.dtype == np.float32 and z.shape == train_u8.shape
    z = z.astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(st.mean_, train_u8.reshape(-1, 3).mean(axis=0), rtol=1e-10)
    # other splits use the training statistics: close to, not exactly, standard
    v = st.transform(cifar_sample.x_val)
    assert not np.allclose(v.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_array_equal(P.per_channel_standardize(train_u8, st.mean_, st.std_),
                                  st.transform(train_u8))
    again = Standardizer.from_dict(st.to_dict())
    np.testing.assert_array_equal(again.transform(train_u8[:10]), st.transform(train_u8[:10]))
    path = st.save(tmp_path / "std")
    assert path.name == "std.npz"
    loaded = Standardizer.load(path)
    np.testing.assert_array_equal(loaded.mean_, st.mean_)
    np.testing.assert_array_equal(loaded.std_, st.std_)


# --------------------------------------------------------------------------- ZCA


def test_zca_whitened_patches_have_identity_covariance(patches):
    zca = ZCAWhitening(epsilon=1e-9, covariance_dtype="float64")
    z = zca.fit_transform(patches)
    assert z.shape == patches.shape and z.dtype == np.float32
    np.testing.assert_allclose(covariance(z), np.eye(108), atol=1e-3)
    np.testing.assert_allclose(z.reshape(len(z), -1).mean(axis=0), 0.0, atol=1e-3)
    w = zca.whitening_matrix_
    np.testing.assert_array_equal(w, w.T)  # ZCA: symmetric
    assert np.all(np.diff(zca.eigenvalues_) <= 0) and zca.eigenvalues_[-1] > 0
    # the whitened covariance is exactly U diag(lam / (lam + eps)) U^T for any epsilon
    eps = 1e-3
    mid = ZCAWhitening(epsilon=eps, covariance_dtype="float64").fit(patches)
    u, lam = mid.components_.T.astype(np.float64), mid.eigenvalues_
    np.testing.assert_allclose(covariance(mid.transform(patches)),
                               (u * (lam / (lam + eps))) @ u.T, atol=2e-4)
    # PCA whitening: also white, but the coordinates are the eigenbasis (not symmetric)
    pca = ZCAWhitening(epsilon=1e-9, mode="pca", covariance_dtype="float64")
    zp = pca.fit_transform(patches)
    np.testing.assert_allclose(covariance(zp), np.eye(108), atol=1e-3)
    assert not np.allclose(pca.whitening_matrix_, pca.whitening_matrix_.T, atol=1e-3)
    # ZCA = U^T-rotated PCA
    np.testing.assert_allclose(zp.reshape(len(zp), -1) @ pca.components_,
                               z.reshape(len(z), -1), atol=2e-2)


def test_zca_on_real_images_n_greater_than_d(pooled, cifar_sample):
    zca = ZCAWhitening(epsilon=1e-10, covariance_dtype="float64").fit(pooled)
    np.testing.assert_allclose(covariance(zca.transform(pooled)), np.eye(192), atol=1e-3)
    # a realistic epsilon: white in the top eigen-directions (lam >> eps), shrunk below
    eps = 1e-3
    zca = ZCAWhitening(epsilon=eps).fit(pooled)
    u, lam = zca.components_.astype(np.float64), zca.eigenvalues_
    top = lam > 100 * eps
    assert 10 <= top.sum() < 192
    in_basis = u @ covariance(zca.transform(pooled)) @ u.T
    np.testing.assert_allclose(np.diag(in_basis)[top], 1.0, atol=0.011)
    assert np.diag(in_basis)[~top].min() < 0.5
    # held-out images are only approximately white
    val_var = np.diag(u @ covariance(zca.transform(pool(P.to_float(cifar_sample.x_val)))) @ u.T)
    assert 0.5 < np.median(val_var[:20]) < 2.0


def test_flip_invariant_fit_equals_fit_on_mirrored_set(patches):
    fast = ZCAWhitening(epsilon=1e-4, covariance_dtype="float64", flip_invariant=True)
    fast.fit(patches)
    both = np.concatenate([patches, P.flip_horizontal(patches)])
    slow = ZCAWhitening(epsilon=1e-4, covariance_dtype="float64").fit(both)
    np.testing.assert_allclose(fast.mean_, slow.mean_, atol=1e-12)
    np.testing.assert_allclose(fast.eigenvalues_, slow.eigenvalues_, rtol=1e-6, atol=1e-12)
    w = fast.whitening_matrix_
    np.testing.assert_allclose(w, slow.whitening_matrix_, atol=1e-4 * np.abs(w).max())
    mirror = np.arange(108).reshape(6, 6, 3)[:, ::-1].reshape(-1)
    np.testing.assert_allclose(w[mirror][:, mirror], w, atol=1e-5 * np.abs(w).max())
    x = patches[:100]  # so whitening commutes with the flip
    np.testing.assert_allclose(fast.transform(P.flip_horizontal(x)),
                               P.flip_horizontal(fast.transform(x)), atol=1e-3)
    plain = ZCAWhitening(epsilon=1e-4, covariance_dtype="float64").fit(patches)
    assert not np.allclose(plain.whitening_matrix_, w, atol=1e-4 * np.abs(w).max())
    with pytest.raises(ValueError, match="even width"):
        ZCAWhitening(flip_invariant=True).fit(patches[:, :, :5])


def test_larger_epsilon_shrinks_noise_amplification(patches):
    rng = np.random.default_rng(1)
    x = patches[:2000]
    noise = (rng.random(x.shape, np.float32) - 0.5) / 255  # 8-bit quantization noise
    gains = {}
    for eps in (1e-6, 1e-4, 1e-2, 1e-1):
        zca = ZCAWhitening(epsilon=eps).fit(patches)
        spectral = np.linalg.norm(zca.whitening_matrix_.astype(np.float64), 2)
        np.testing.assert_allclose(spectral, zca.max_gain(), rtol=1e-3)
        d = zca.transform(x + noise) - zca.transform(x)
        gains[eps] = (spectral, np.linalg.norm(d) / np.linalg.norm(noise))
    spectral, noise_gain = (np.array(v) for v in zip(*gains.values(), strict=True))
    assert np.all(np.diff(spectral) < 0) and np.all(np.diff(noise_gain) < 0)
    assert gains[1e-6][1] > 10 * gains[1e-2][1]
    assert gains[1e-6][0] > 100  # up to 1/sqrt(1e-6) = 1000x for near-empty directions


def test_with_epsilon_equals_a_refit(patches):
    fitted = ZCAWhitening(epsilon=1e-2).fit(patches)
    x = patches[:50]
    for eps, mode in ((1e-4, None), (0.1, None), (1e-2, "pca")):
        again = ZCAWhitening(epsilon=eps, mode=mode or "zca").fit(patches)
        other = fitted.with_epsilon(eps, mode)
        assert (other.epsilon, other.mode) == (eps, mode or "zca")
        np.testing.assert_allclose(other.transform(x), again.transform(x), rtol=1e-4,
                                   atol=1e-4)
        assert other.max_gain() == pytest.approx(again.max_gain())
    assert fitted.epsilon == 1e-2 and fitted.mode == "zca"  # the original is unchanged
    with pytest.raises(RuntimeError, match="not fitted"):
        ZCAWhitening().with_epsilon(0.1)


def test_zca_is_deterministic_and_any_batch(pooled):
    a = ZCAWhitening(epsilon=1e-2).fit(pooled)
    b = ZCAWhitening(epsilon=1e-2).fit(pooled.copy())
    for key in ("mean_", "eigenvalues_", "components_", "whitening_matrix_"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_array_equal(a.transform(pooled), a.transform(pooled))
    np.testing.assert_array_equal(a.transform(pooled), b.transform(pooled))
    whole = a.transform(pooled)
    np.testing.assert_allclose(a.transform(pooled[:7]), whole[:7], atol=1e-5)
    np.testing.assert_allclose(a.transform(pooled[3]), whole[3], atol=1e-5)  # one sample
    with pytest.raises(ValueError, match="shape"):
        a.transform(pooled[:, :4])
    with pytest.raises(TypeError, match="to_float"):
        ZCAWhitening().fit((pooled * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="singular"):
        ZCAWhitening(epsilon=0.0).fit(pooled[:100])  # N < D = 192
    with pytest.raises(RuntimeError, match="not fitted"):
        ZCAWhitening().transform(pooled)


def test_zca_save_load_round_trip(pooled, tmp_path):
    zca = ZCAWhitening(epsilon=1e-2, mode="pca", flip_invariant=True).fit(pooled)
    path = zca.save(tmp_path / "sub" / "zca")
    assert path == tmp_path / "sub" / "zca.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["zca.npz"]  # no temporary left
    loaded = ZCAWhitening.load(path)
    assert (loaded.epsilon, loaded.mode, loaded.flip_invariant, loaded.feature_shape_,
            loaded.n_samples_) == (1e-2, "pca", True, (8, 8, 3), len(pooled))
    for key in ("mean_", "eigenvalues_", "components_", "whitening_matrix_"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(zca, key))
    np.testing.assert_array_equal(loaded.transform(pooled[:50]), zca.transform(pooled[:50]))
    zca.save(path)  # overwrite in place
    np.testing.assert_array_equal(ZCAWhitening.load(path).mean_, zca.mean_)


def test_zca_load_rejects_bad_files(pooled, tmp_path):
    good = ZCAWhitening(epsilon=1e-2).fit(pooled[:, :4, :4]).save(tmp_path / "good.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    other = Standardizer().fit(pooled).save(tmp_path / "standardizer.npz")
    for bad, why in ((garbage, "readable"), (truncated, "readable"), (single, "not an .npz"),
                     (other, "not a saved ZCAWhitening")):
        with pytest.raises(PreprocessingFileError, match=why) as err:
            ZCAWhitening.load(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ZCAWhitening.load(tmp_path / "missing.npz")


def test_gcn_zca_pipeline(cifar_sample):
    x = cifar_sample.x_train[:, 12:20, 12:20]  # small crops keep the test fast
    zca, (train, val) = P.gcn_zca(x, cifar_sample.x_val[:, 12:20, 12:20])
    assert zca.epsilon == P.PAPER_ZCA_EPSILON and zca.feature_shape_ == (8, 8, 3)
    assert train.shape == x.shape and val.shape == (len(cifar_sample.x_val), 8, 8, 3)
    assert train.dtype == val.dtype == np.float32
    expected = zca.transform(P.global_contrast_normalize(cifar_sample.x_val[:, 12:20, 12:20]))
    np.testing.assert_array_equal(val, expected)


# --------------------------------------------------------------------------- augmentation


def test_flip_horizontal_is_exact_mirror(train_u8):
    x = train_u8[:16]
    f = P.flip_horizontal(x)
    assert f.shape == x.shape and f.dtype == x.dtype
    np.testing.assert_array_equal(P.flip_horizontal(f), x)
    for j in (0, 5, 31):
        np.testing.assert_array_equal(f[:, :, j], x[:, :, 31 - j])
    np.testing.assert_array_equal(P.flip_horizontal(x[3]), f[3])
    assert not np.array_equal(f, x)


@pytest.mark.parametrize("dy,dx", [(0, 0), (2, 0), (0, -3), (-1, 3), (5, -7), (31, 0)])
def test_shift_image_moves_pixels_and_zero_fills(train_u8, dy, dx):
    image = train_u8[11]
    out = P.shift_image(image, dy, dx)
    assert out.shape == image.shape and out.dtype == image.dtype
    for i in range(32):
        for j in range(32):
            if 0 <= i - dy < 32 and 0 <= j - dx < 32:
                assert (out[i, j] == image[i - dy, j - dx]).all()
            else:
                assert (out[i, j] == 0).all()
    filled = P.shift_image(image.astype(np.float32), dy, dx, fill=-1.0)
    covered = np.zeros((32, 32), bool)
    covered[max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = True
    assert (filled[~covered] == -1.0).all() and (filled[covered] >= 0).all()


def test_shift_flip_matches_primitives(train_u8):
    rng = np.random.default_rng(3)
    x = train_u8[:40]
    dy, dx = rng.integers(-4, 5, 40), rng.integers(-4, 5, 40)
    fl = rng.random(40) < 0.5
    out = P.shift_flip(x, dy, dx, fl)
    for k in range(40):
        src = P.flip_horizontal(x[k]) if fl[k] else x[k]
        np.testing.assert_array_equal(out[k], P.shift_image(src, dy[k], dx[k]))


def test_random_shift_flip_bounds_and_flip_rate(train_u8):
    x = train_u8
    out, dy, dx, fl = P.random_shift_flip(x, np.random.default_rng(0), max_shift=0.1,
                                          return_params=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.abs(dy).max() == 3 and np.abs(dx).max() == 3  # 10% of 32 px, rounded
    assert set(np.unique(dy)) == set(range(-3, 4))
    assert 0.45 < fl.mean() < 0.55
    np.testing.assert_array_equal(out, P.shift_flip(x, dy, dx, fl))
    # locating the content: every output is a flip/shift of its input within 3 px
    found = locate(x[:100], out[:100], 3)
    assert all(f is not None for f in found)
    assert [f[2] for f in found] == fl[:100].tolist()
    # seeded: reproducible; float data and fill values work; max_shift validated
    np.testing.assert_array_equal(P.random_shift_flip(x[:20], 5), P.random_shift_flip(x[:20], 5))
    xf = P.to_float(x[:20])
    o = P.random_shift_flip(xf, 1, max_shift=4, flip=False, fill=-1.0)
    assert o.dtype == np.float32 and o.min() == -1.0
    assert P.random_shift_flip(x[0], 1).shape == x[0].shape
    with pytest.raises(ValueError):
        P.random_shift_flip(x[:2], 0, max_shift=1.5)
    with pytest.raises(ValueError):
        P.random_shift_flip(x[:2], 0, max_shift=32)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_keras_ops_and_tf_versions_match_numpy(train_u8, dtype):
    rng = np.random.default_rng(4)
    x = train_u8[:32].astype(dtype)
    dy, dx = rng.integers(-5, 6, 32), rng.integers(-5, 6, 32)
    fl = rng.random(32) < 0.5
    expected = P.shift_flip(x, dy, dx, fl)
    via_ops = np.asarray(P.ops_shift_flip(x, dy, dx, fl))
    via_tf = P.tf_shift_flip(x, dy, dx, fl).numpy()
    assert via_ops.dtype == via_tf.dtype == dtype
    np.testing.assert_array_equal(via_ops, expected)
    np.testing.assert_array_equal(via_tf, expected)
    np.testing.assert_array_equal(P.tf_shift_flip(x[0], 1, -2, True).numpy(),
                                  P.shift_image(P.flip_horizontal(x[0]), 1, -2))


def test_keras_layer_semantics(train_u8):
    x = train_u8[:64]
    layer = P.RandomShiftFlip(max_shift=3, seed=7)
    out = np.asarray(layer(x))
    assert out.shape == x.shape and out.dtype == np.float32
    found = locate(x, out, 3)
    assert all(f is not None for f in found)
    assert 0.25 < np.mean([f[2] for f in found]) < 0.75
    assert len({f[:2] for f in found}) > 10
    np.testing.assert_array_equal(np.asarray(P.RandomShiftFlip(3, seed=7)(x)), out)
    assert not np.array_equal(np.asarray(layer(x)), out)  # the generator moves on
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    # max_shift=0: each image is exactly itself or its mirror
    mirror_only = np.asarray(P.RandomShiftFlip(0, seed=1)(x))
    is_mirror = (mirror_only == P.flip_horizontal(x)).all(axis=(1, 2, 3))
    assert np.all(is_mirror | (mirror_only == x).all(axis=(1, 2, 3)))
    assert 0 < is_mirror.sum() < 64
    np.testing.assert_array_equal(np.asarray(P.RandomShiftFlip(0, flip=False)(x)), x)
    config = layer.get_config()
    assert P.RandomShiftFlip.from_config(config).max_shift == 3


def test_keras_layer_and_tf_function_in_tf_data(train_u8, cifar_sample):
    import tensorflow as tf

    x, y = train_u8[:64], cifar_sample.y_train[:64]

    def run(layer):
        ds = tf.data.Dataset.from_tensor_slices(x).batch(16).map(layer)
        return np.concatenate([b.numpy() for b in ds])

    out = run(P.RandomShiftFlip(3, seed=3))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert all(f is not None for f in locate(x, out, 3))
    np.testing.assert_array_equal(run(P.RandomShiftFlip(3, seed=3)), out)

    # pure-TF stateless version and the reproducible dataset helper
    a = P.tf_random_shift_flip(x, y, 3, seed=[1, 2])
    b = P.tf_random_shift_flip(x, y, 3, seed=[1, 2])
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(np.asarray(a[1]), y)
    assert a[0].dtype == tf.uint8 and all(f is not None for f in locate(x, a[0].numpy(), 3))
    unknown = tf.TensorSpec([None, None, None, 3], tf.uint8)  # int max_shift: no static size
    graph_fn = tf.function(lambda b: P.tf_random_shift_flip(b, None, 3, [1, 2]), [unknown])
    np.testing.assert_array_equal(graph_fn(x).numpy(), a[0].numpy())

    def epochs(seed):
        base = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        ds = P.augment_dataset(base, max_shift=3, seed=seed)
        return [np.concatenate([b[0].numpy() for b in ds]) for _ in range(2)]

    first, second = epochs(0)
    assert not np.array_equal(first, second)  # new augmentations every epoch
    again = epochs(0)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    assert all(f is not None for f in locate(x, first, 3))


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_keras_layer_on_jax_backend(tmp_path):
    script = textwrap.dedent("""
        import numpy as np, keras
        assert keras.backend.backend() == "jax"
        from allcnn_lib import preprocessing as P
        from allcnn_lib.data import load_cifar10
        x = load_cifar10(sample=True, verbose=False).x_train[:16]
        out = np.asarray(P.RandomShiftFlip(3, flip=False, seed=2)(x))
        assert out.dtype == np.float32 and out.shape == x.shape
        for src, y in zip(x, out):
            hits = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                    if np.array_equal(P.shift_image(src, dy, dx).astype(np.float32), y)]
            assert hits, "not a shift within 3 px"
        again = np.asarray(P.RandomShiftFlip(3, flip=False, seed=2)(x))
        assert np.array_equal(out, again)
        m = np.asarray(P.RandomShiftFlip(0, seed=1)(x))
        mirrored = (m == P.flip_horizontal(x)).all(axis=(1, 2, 3))
        assert np.all(mirrored | (m == x).all(axis=(1, 2, 3)))
        rng = np.random.default_rng(0)
        dy, dx, fl = rng.integers(-4, 5, 16), rng.integers(-4, 5, 16), rng.random(16) < .5
        assert np.array_equal(np.asarray(P.ops_shift_flip(x, dy, dx, fl)),
                              P.shift_flip(x, dy, dx, fl))
        model = keras.Sequential([keras.Input((32, 32, 3)), P.RandomShiftFlip(3, seed=0)])
        assert np.array_equal(np.asarray(model(x, training=False)), x.astype(np.float32))
        assert not np.array_equal(np.asarray(model(x, training=True)), x)
        print("JAX-OK")
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "JAX-OK" in proc.stdout, proc.stderr[-3000:]
