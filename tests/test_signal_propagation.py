"""Tests of allcnn_lib.signal_propagation: deep ReLU stacks, activation and gradient statistics
(He et al. 2015, Section 2.2), what Keras' initializers sample, and the figure helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import keras
import matplotlib
import numpy as np
import pytest

from allcnn_lib.initializers import INITIALIZERS, expected_std, fans, uniform_limit
from allcnn_lib.models import all_cnn_c
from allcnn_lib.plots import layer_stats_figure, weight_histograms
from allcnn_lib.signal_propagation import (
    activation_stats,
    deep_relu_stack,
    gradient_stats,
    linear_layers,
    predicted_preactivation_std,
    propagation_stats,
    sample_kernel,
    std_ratio,
)

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parent.parent
DEPTH, WIDTH = 20, 256
IMAGES = 64
#: Keras' truncated normal: cut at 2 stds of a normal whose std is divided by this constant.
TRUNCATED_STD = 0.87962566103423978


@pytest.fixture(scope="module")
def images(cifar_sample):
    """64 real CIFAR-10 training images, per-channel standardized, and their labels."""
    x = cifar_sample.x_train[:IMAGES].astype(np.float32) / 255.0
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
    return x.astype(np.float32), cifar_sample.y_train[:IMAGES]


@pytest.fixture(scope="module")
def stacks():
    """20-layer, 256-wide dense ReLU stacks, one per initializer."""
    return {name: deep_relu_stack(DEPTH, WIDTH, name, seed=0)
            for name in ("gaussian", "glorot_normal", "he_normal")}


@pytest.fixture(scope="module")
def stack_stats(stacks, images):
    """Pre-activation stds of the 20 hidden layers (the classifier left out) per initializer."""
    x, _ = images
    hidden = [f"dense{k}" for k in range(1, DEPTH + 1)]
    return {name: activation_stats(model, x, hidden) for name, model in stacks.items()}


# --------------------------------------------------------------------------- networks


def test_deep_relu_stack_layout_and_per_layer_seeds():
    model = deep_relu_stack(3, 16, "he_normal", input_shape=(8, 8, 3), seed=5)
    names = [layer.name for layer in model.layers]
    assert names == ["image", "flatten", "dense1", "relu1", "dense2", "relu2", "dense3", "relu3",
                     "classifier", "softmax"]
    assert model.output.shape[-1] == 10
    assert [layer.name for layer in linear_layers(model)] == ["dense1", "dense2", "dense3",
                                                              "classifier"]
    k2, k3 = (model.get_layer(n).kernel.numpy() for n in ("dense2", "dense3"))
    assert not np.allclose(k2, k3), "equal-shaped layers must not start identical"
    again = deep_relu_stack(3, 16, "he_normal", input_shape=(8, 8, 3), seed=5)
    np.testing.assert_array_equal(again.get_layer("dense2").kernel.numpy(), k2)
    other = deep_relu_stack(3, 16, "he_normal", input_shape=(8, 8, 3), seed=6)
    assert not np.allclose(other.get_layer("dense2").kernel.numpy(), k2)


def test_deep_relu_stack_conv_kind():
    model = deep_relu_stack(2, 8, "glorot_uniform", input_shape=(8, 8, 3), kind="conv")
    assert [layer.name for layer in linear_layers(model)] == ["conv1", "conv2", "classifier"]
    assert tuple(model.get_layer("conv2").kernel.shape) == (3, 3, 8, 8)
    probabilities = model(np.ones((2, 8, 8, 3), np.float32))
    np.testing.assert_allclose(np.sum(probabilities, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(depth=0, width=4), dict(depth=2, width=0),
                                    dict(depth=2, width=4, kind="pool"),
                                    dict(depth=2, width=4, kind="conv", input_shape=(12,))])
def test_deep_relu_stack_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        deep_relu_stack(initializer="he_normal", **kwargs)


# --------------------------------------------------------------------------- activations


def test_he_keeps_relu_activation_std_gaussian_collapses_it(stack_stats):
    """He init keeps the pre-activation std within a factor 2 over 20 ReLU layers; Glorot
    halves the variance per layer (std x 2**-0.5); N(0, 0.01^2) shrinks it by ~0.11 a layer."""
    he, glorot, gaussian = (stack_stats[n] for n in ("he_normal", "glorot_normal", "gaussian"))
    assert all(0.5 < s < 2.5 for s in he.values()), he
    assert 0.5 < std_ratio(he) < 2.0
    assert 1e-4 < std_ratio(glorot) < 1e-2  # 2 ** (-19 / 2) = 1.4e-3
    assert std_ratio(gaussian) < 1e-15  # 0.113 ** 19 = 1e-18
    assert all(math.isfinite(s) and s > 0 for s in gaussian.values())


def test_measured_stds_follow_he_recursion(stacks, stack_stats, images):
    x, _ = images
    for name, stats in stack_stats.items():
        model = stacks[name]
        shapes = [tuple(model.get_layer(n).kernel.shape) for n in stats]
        predicted = predicted_preactivation_std(
            [expected_std(name, *fans(s)) for s in shapes], [s[0] for s in shapes],
            float(np.mean(x.astype(np.float64) ** 2)))
        ratio = np.asarray(list(stats.values())) / predicted
        assert np.all((ratio > 0.5) & (ratio < 2.0)), (name, ratio)


def test_activation_stats_defaults_order_and_post_activations(stacks, images):
    x, _ = images
    model = stacks["he_normal"]
    stats = activation_stats(model, x)
    assert list(stats) == [f"dense{k}" for k in range(1, DEPTH + 1)] + ["classifier"]
    relu = activation_stats(model, x, ["relu5"])
    pre = activation_stats(model, x, ["dense5"])
    # A ReLU of a zero-mean symmetric y keeps E[y^2]/2 and has std < that of y.
    assert 0.3 * pre["dense5"] < relu["relu5"] < pre["dense5"]


def test_all_cnn_c_activations_on_real_images(images):
    x = images[0][:8]
    he = activation_stats(all_cnn_c(dropout=False, initializer="he_normal"), x)
    gaussian = activation_stats(all_cnn_c(dropout=False, initializer="gaussian"), x)
    assert list(he) == [f"conv{k}" for k in range(1, 10)]
    assert all(0.3 < s < 3.0 for s in he.values()), he
    assert gaussian["conv9"] < 1e-5 * gaussian["conv1"], gaussian


# --------------------------------------------------------------------------- gradients


def _loss_of(model, x, y) -> float:
    p = keras.ops.convert_to_numpy(model(x, training=False)).astype(np.float64)
    return float(np.mean(-np.log(p[np.arange(len(y)), y])))


def test_kernel_gradient_std_matches_finite_differences():
    """The std that gradient_stats reports is that of the true gradient of the mean loss."""
    model = deep_relu_stack(2, 6, "he_normal", input_shape=(5,), num_classes=3, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    stats = gradient_stats(model, x, y)
    assert list(stats) == ["dense1", "dense2", "classifier"]
    eps = 1e-2
    for name in ("dense2", "classifier"):
        kernel = model.get_layer(name).kernel
        w = kernel.numpy()
        numeric = np.zeros(w.shape)
        for idx in np.ndindex(w.shape):
            for sign in (1, -1):
                shifted = w.copy()
                shifted[idx] += sign * eps
                kernel.assign(shifted)
                numeric[idx] += sign * _loss_of(model, x, y) / (2 * eps)
        kernel.assign(w)
        assert stats[name] == pytest.approx(numeric.std(), rel=2e-2), name


def test_gradient_reductions_mean_for_kernels_sum_for_outputs(stacks, images):
    """Duplicating the batch keeps the kernel gradient (mean loss) and the per-example
    output gradients (summed loss): both are independent of the batch size."""
    model = stacks["he_normal"]
    x, y = images
    one, two = (x[:4], y[:4]), (np.concatenate([x[:4]] * 2), np.concatenate([y[:4]] * 2))
    for wrt in ("kernel", "output"):
        a = gradient_stats(model, *one, ["dense3", "classifier"], wrt=wrt)
        b = gradient_stats(model, *two, ["dense3", "classifier"], wrt=wrt)
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4), (wrt, name)


def test_backpropagated_gradient_he_flat_glorot_vanishes_toward_input(stacks, images):
    x, y = images
    hidden = [f"dense{k}" for k in range(1, DEPTH + 1)]
    he = gradient_stats(stacks["he_normal"], x, y, hidden, wrt="output")
    glorot = gradient_stats(stacks["glorot_normal"], x, y, hidden, wrt="output")
    gaussian = gradient_stats(stacks["gaussian"], x, y, hidden, wrt="output")
    assert list(he) == hidden
    assert 0.5 < std_ratio(he) < 2.0, he
    assert std_ratio(glorot) > 100  # ~2 ** (19 / 2) = 724: smaller toward the input
    assert std_ratio(gaussian) > 1e15  # x 0.113 a layer toward the input: 0.113 ** -19


def test_gradient_stats_rejects_bad_arguments(stacks, images):
    x, y = images
    with pytest.raises(ValueError, match="wrt"):
        gradient_stats(stacks["he_normal"], x[:2], y[:2], wrt="bias")
    with pytest.raises(ValueError, match="no kernel"):
        gradient_stats(stacks["he_normal"], x[:2], y[:2], ["relu1"])


# --------------------------------------------------------------------------- initializers


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_sampled_std_matches_expected_std(name):
    shape = (3, 3, 96, 192)  # conv4 of All-CNN-C: 331,776 weights
    fan_in, fan_out = fans(shape)
    expected = expected_std(name, fan_in, fan_out, columns=shape[-1])
    assert np.std(sample_kernel(name, shape, seed=3)) == pytest.approx(expected, rel=0.01)


def test_sample_kernel_shapes_limits_and_seeds():
    shape = (3, 3, 192, 192)
    fan_in, fan_out = fans(shape)
    he_uniform = sample_kernel("he_uniform", shape, seed=0)
    assert he_uniform.shape == shape and he_uniform.dtype == np.float32
    limit = uniform_limit("he_uniform", fan_in, fan_out)
    assert np.abs(he_uniform).max() <= limit * (1 + 1e-6)
    assert np.abs(he_uniform).max() > 0.999 * limit
    he_normal = sample_kernel("he_normal", shape, seed=0)
    cut = 2 * expected_std("he_normal", fan_in, fan_out) / TRUNCATED_STD
    assert np.abs(he_normal).max() <= cut * (1 + 1e-6)  # truncated at 2 (rescaled) stds
    gaussian = sample_kernel("gaussian", shape, seed=0)
    assert np.abs(gaussian).max() > 4 * 0.01  # untruncated: 4-sigma values among 331,776
    np.testing.assert_array_equal(sample_kernel("he_normal", shape, seed=0), he_normal)
    assert not np.array_equal(sample_kernel("he_normal", shape, seed=1), he_normal)
    instance = keras.initializers.Constant(0.5)
    assert np.std(sample_kernel(instance, (4, 4))) == 0.0


def test_predicted_preactivation_std():
    # He: the first layer sees the input (no ReLU), then n Var(w) / 2 = 1 per layer.
    he = predicted_preactivation_std([math.sqrt(2 / 100)] * 4, [100] * 4, 3.0)
    np.testing.assert_allclose(he, math.sqrt(6.0))
    # A hand-computed chain: Var(y1) = 10 * 0.01 * 2 = 0.2; Var(y2) = 20 * 0.04 * 0.2 / 2.
    np.testing.assert_allclose(predicted_preactivation_std([0.1, 0.2], [10, 20], 2.0),
                               [math.sqrt(0.2), math.sqrt(0.08)])
    with pytest.raises(ValueError):
        predicted_preactivation_std([0.1], [10, 20], 1.0)


def test_std_ratio():
    assert std_ratio({"a": 2.0, "b": 3.0, "c": 1.0}) == 0.5
    assert math.isnan(std_ratio({"a": 0.0, "b": 1.0}))


# --------------------------------------------------------------------------- figures


def test_layer_stats_figure():
    import matplotlib.pyplot as plt

    stats = {"he": {"conv1": 1.0, "conv2": 1.1}, "gaussian": {"conv1": 1e-2, "conv2": 1e-4}}
    fig = layer_stats_figure(stats, title="t", ylabel="std of y", predicted={"he": [1, 1]})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "t"
    assert ax.get_ylabel() == "std of y" and ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "conv2"]
    assert len(ax.get_legend().get_texts()) == 3  # two initializers and the theory line
    plt.close(fig)
    with pytest.raises(ValueError, match="layers"):
        layer_stats_figure({"a": {"x": 1.0}, "b": {"y": 1.0}}, title="t", ylabel="y")
    with pytest.raises(ValueError):
        layer_stats_figure({}, title="t", ylabel="y")


def test_weight_histograms():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig = weight_histograms({"a": rng.normal(0, 1, 1000), "b": rng.uniform(-1, 1, 1000)},
                            title="weights")
    ax = fig.axes[0]
    assert ax.get_title() == "weights" and ax.get_xlabel() and ax.get_ylabel()
    assert len(ax.patches) == 2
    plt.close(fig)


# --------------------------------------------------------------------------- backends

BACKEND_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from allcnn_lib.signal_propagation import deep_relu_stack, gradient_stats

    weights = [np.asarray(w, np.float32) for w in json.loads(sys.stdin.read())]
    model = deep_relu_stack(2, 6, "he_normal", input_shape=(5,), num_classes=3)
    model.set_weights(weights)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    result = {"backend": keras.backend.backend(), "kernel": gradient_stats(model, x, y)}
    try:
        result["output"] = gradient_stats(model, x, y, wrt="output")
    except NotImplementedError:
        result["output"] = None
    print("RESULT " + json.dumps(result))
""")

#: torch costs ~12 CPU seconds (mostly its import): opt-in, as in test_initializers.
TORCH_OPT_IN = "ALLCNN_TEST_TORCH"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gradient_stats_agree_across_backends(backend):
    """The same weights and batch give the same gradient stds on another backend (run in a
    subprocess) as on this process' TensorFlow backend."""
    if find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    if backend == "torch" and os.environ.get(TORCH_OPT_IN, "") not in {"1", "true", "yes"}:
        pytest.skip(f"the torch run is opt-in: set {TORCH_OPT_IN}=1")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares with the TensorFlow backend in this process")
    model = deep_relu_stack(2, 6, "he_normal", input_shape=(5,), num_classes=3, seed=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    expected = {"kernel": gradient_stats(model, x, y),
                "output": gradient_stats(model, x, y, wrt="output")}
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    weights = json.dumps([w.tolist() for w in model.get_weights()])
    done = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], input=weights, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["backend"] == backend
    for name, value in expected["kernel"].items():
        assert result["kernel"][name] == pytest.approx(value, rel=1e-4), name
    if backend == "jax":
        assert result["output"] is None  # wrt="output" is TensorFlow and PyTorch only
    else:
        for name, value in expected["output"].items():
            assert result["output"][name] == pytest.approx(value, rel=1e-4), name


def test_propagation_stats_gives_the_three_statistics(stacks, images):
    x, y = images
    stats = propagation_stats(stacks["he_normal"], x[:8], y[:8], ["dense1", "classifier"])
    assert list(stats) == ["activation", "output_gradient", "kernel_gradient"]
    assert all(list(v) == ["dense1", "classifier"] for v in stats.values())


def test_layer_stats_figure_into_given_axes_without_legend():
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    stats = {"he": {"conv1": 1.0, "conv2": 1.1}}
    assert layer_stats_figure(stats, title="a", ylabel="y", ax=axes[0]) is fig
    layer_stats_figure(stats, title="b", ylabel="y", ax=axes[1], legend=False, log=False)
    assert axes[0].get_legend() is not None and axes[1].get_legend() is None
    assert axes[1].get_yscale() == "linear" and axes[1].get_title() == "b"
    plt.close(fig)
