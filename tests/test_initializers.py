"""Tests of allcnn_lib.initializers: named initializers and LSUV
(Mishkin & Matas 2015, Algorithm 1) on All-CNN-C with real CIFAR-10 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import keras
import numpy as np
import pytest

from allcnn_lib.initializers import (
    INITIALIZERS,
    get_initializer,
    lsuv,
)
from allcnn_lib.models import all_cnn_c, conv_layers
from allcnn_lib.preprocessing import Standardizer

REPO = Path(__file__).resolve().parent.parent
TOL_VAR = 0.1
HELD_OUT_TOL = 0.25  # a different batch of real images: sampling noise on top of Tol_var


@pytest.fixture(scope="module")
def batches(cifar_sample):
    """(fitting batch, held-out batch) of 64 standardized real images each."""
    standardizer = Standardizer().fit(cifar_sample.x_train)
    return (standardizer.transform(cifar_sample.x_train[:64]),
            standardizer.transform(cifar_sample.x_val[:64]))


def output_variances(model: keras.Model, layers, batch: np.ndarray) -> dict[str, float]:
    """Variance of each layer's own output on ``batch``, in inference mode."""
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = probe([batch], training=False)
    return {layer.name: float(np.var(keras.ops.convert_to_numpy(
        keras.ops.cast(y, "float32")), dtype=np.float64)) for layer, y in zip(layers, outputs,
                                                                           strict=True)}


def kernel_of(layer) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)


def small_cnn(*, dead_after: str | None = None) -> keras.Model:
    """A three-conv + dense chain on 32x32x3, fast enough to build many times."""
    x = inputs = keras.Input((32, 32, 3))
    for name, filters, stride in (("c1", 16, 1), ("c2", 24, 2), ("c3", 10, 1)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=name)(x)
        if name == dead_after:
            x = keras.layers.Rescaling(0.0, name="kill")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="dense")(x))


# --------------------------------------------------------------------------- named initializers


def test_get_initializer_names_passthrough_and_errors():
    assert get_initializer("gaussian").stddev == 0.01
    assert isinstance(get_initializer("He-Normal"), keras.initializers.HeNormal)
    custom = keras.initializers.RandomUniform(-1, 1)
    assert get_initializer(custom) is custom
    with pytest.raises(ValueError) as err:
        get_initializer("xavier")
    assert all(name in str(err.value) for name in INITIALIZERS)
    with pytest.raises(TypeError):
        get_initializer(0.01)
    a, b = (keras.ops.convert_to_numpy(get_initializer("he_normal", seed=3)((3, 3, 3, 8)))
            for _ in range(2))
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- LSUV


@pytest.fixture(scope="module")
def lsuv_allcnn(batches):
    """All-CNN-C (paper variant) after LSUV on the fitting batch: (model, report)."""
    keras.utils.set_random_seed(0)
    model = all_cnn_c(variant="paper")
    return model, lsuv(model, batches[0], tol_var=TOL_VAR, seed=0)


def test_lsuv_unit_variance_on_fitting_and_held_out_batches(lsuv_allcnn, batches):
    model, report = lsuv_allcnn
    convs = conv_layers(model)
    assert list(report) == [layer.name for layer in convs] == [f"conv{i}" for i in range(1, 10)]
    fit, held_out = (output_variances(model, convs, batch) for batch in batches)
    for name, record in report.items():
        assert record["iterations"] >= 1
        assert abs(fit[name] - 1.0) < TOL_VAR, (name, fit)
        assert fit[name] == pytest.approx(record["var_after"], rel=1e-3)
        assert abs(held_out[name] - 1.0) < HELD_OUT_TOL, (name, held_out)
    # conv2..conv9 read ReLUs of unit-variance pre-activations: about half the variance
    assert all(0.2 < report[f"conv{i}"]["var_before"] < 0.8 for i in range(2, 10)), report


def test_lsuv_kernels_are_scaled_orthonormal(lsuv_allcnn, batches):
    model, report = lsuv_allcnn
    for layer in conv_layers(model):
        w = kernel_of(layer)
        flat = w.reshape(-1, w.shape[-1])
        gram = flat.T @ flat if flat.shape[1] <= flat.shape[0] else flat @ flat.T
        c = report[layer.name]["scale"] ** 2  # W^T W = c I, c the LSUV factor squared
        np.testing.assert_allclose(gram / c, np.eye(len(gram)), atol=1e-4, err_msg=layer.name)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), 0.0)
    # the first kernel is the one Keras' Orthogonal draws with the same seed (notebook 03)
    first = keras.ops.convert_to_numpy(
        keras.initializers.Orthogonal(seed=keras.random.SeedGenerator(0))((3, 3, 3, 96)))
    np.testing.assert_allclose(kernel_of(model.get_layer("conv1")),
                               first * report["conv1"]["scale"], rtol=1e-5, atol=1e-7)


def test_lsuv_batch_norm_and_mixed_precision(batches):
    x = batches[0][:16]
    model = all_cnn_c(batch_norm=True)
    lsuv(model, x, seed=1)
    # fresh batch norm in inference mode is ~identity: its outputs keep unit variance too
    layers = conv_layers(model) + [model.get_layer(f"bn{i}") for i in range(1, 10)]
    variances = output_variances(model, layers, x)
    assert all(abs(v - 1) < TOL_VAR for v in variances.values()), variances
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # training's --mixed-precision
    try:
        model = small_cnn()
        lsuv(model, x, seed=0)
    finally:
        keras.config.set_dtype_policy(previous)
    layers = [model.get_layer(name) for name in ("c1", "c2", "c3", "dense")]
    variances = output_variances(model, layers, x)
    assert all(abs(v - 1) < TOL_VAR for v in variances.values()), variances


def test_lsuv_leaves_a_dead_layer_unscaled_and_refuses_a_branching_model(batches):
    model = small_cnn(dead_after="c1")  # everything after c1 is multiplied by 0
    with pytest.warns(RuntimeWarning) as caught:  # one line per dead layer, c2 and after it
        report = lsuv(model, batches[0][:16], seed=0)
    assert [str(w.message).split()[1] for w in caught] == ["c2", "c3", "dense"]
    assert "variance 0 on this batch (dead or overflowing)" in str(caught[0].message)
    assert report["c1"]["iterations"] == 1
    assert report["c2"]["iterations"] == 0 and report["c2"]["var_after"] == 0
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    inputs = keras.Input((32, 32, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    residual = keras.Model(inputs, keras.layers.Add(name="sum")([a, b]))
    with pytest.raises(ValueError, match="chain of layers.*'sum'"):
        lsuv(residual, batches[0][:4])


BACKEND_SCRIPT = textwrap.dedent("""
    import json
    import os
    import sys
    from allcnn_lib.data import load_cifar10
    from allcnn_lib.initializers import lsuv
    from allcnn_lib.models import all_cnn_c

    x = load_cifar10(sample=True).x_train[:16].astype("float32") / 255.0 - 0.5
    print("RESULT " + json.dumps(lsuv(all_cnn_c(), x, seed=0)))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: jax + TensorFlow threads can hang there under load
""")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lsuv_runs_on_other_backends(backend):
    """LSUV reaches unit variance on jax and torch too (torch opt-in: ALLCNN_TEST_TORCH=1)."""
    if find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    if backend == "torch" and os.environ.get("ALLCNN_TEST_TORCH", "") not in {"1", "true"}:
        pytest.skip("LSUV on torch is opt-in: set ALLCNN_TEST_TORCH=1")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # eager jax: compile less
    proc = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("RESULT "):])
    assert len(report) == 9
    assert all(abs(r["var_after"] - 1) < TOL_VAR for r in report.values()), report
