"""Tests of allcnn_lib.initializers: named initializers, orthonormal kernels and LSUV
(Mishkin & Matas 2015, Algorithm 1) on All-CNN-C with real CIFAR-10 images."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from importlib.util import find_spec
from pathlib import Path

import keras
import numpy as np
import pytest

from allcnn_lib.initializers import (
    INITIALIZERS,
    UNIFORM_INITIALIZERS,
    LSUVReport,
    expected_std,
    fans,
    get_initializer,
    lsuv,
    lsuv_seed_rebuild,
    orthonormal_kernel,
    orthonormality_error,
    seed_orthonormal,
    uniform_limit,
)
from allcnn_lib.models import all_cnn_c, conv_layers
from allcnn_lib.signal_propagation import activation_stats

REPO = Path(__file__).resolve().parent.parent
TOL_VAR = 0.1
HELD_OUT_TOL = 0.25  # a different batch of real images: sampling noise on top of Tol_var
FIT_IMAGES = 64


# --------------------------------------------------------------------------- helpers & fixtures


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] -> per-channel standardized with training statistics."""
    return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


@pytest.fixture(scope="module")
def batches(cifar_sample):
    """(fitting batch, held-out batch) of real images: training and validation parts."""
    train = cifar_sample.x_train.astype(np.float32) / 255.0
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    fit = standardize(cifar_sample.x_train[:FIT_IMAGES], mean, std)
    held_out = standardize(cifar_sample.x_val[:FIT_IMAGES], mean, std)
    return fit, held_out


def output_variances(model: keras.Model, layers, batch: np.ndarray) -> dict[str, float]:
    """Variance of each layer's own output on ``batch`` (inference mode), from one probe:
    ``signal_propagation.activation_stats`` (float64 std), squared."""
    return {name: std**2 for name, std in activation_stats(model, batch, layers).items()}


def kernel_of(layer) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)


@pytest.fixture(scope="module")
def lsuv_allcnn(batches):
    """All-CNN-C (paper variant) after LSUV on the fitting batch: (model, report)."""
    keras.utils.set_random_seed(0)
    model = all_cnn_c(variant="paper")
    report = lsuv(model, batches[0], tol_var=TOL_VAR, seed=0)
    print("\n" + report.to_text())
    return model, report


def small_cnn(*, relu_inside: bool = False, dead_after: str | None = None,
              use_bias: bool = True) -> keras.Model:
    """A three-conv + dense chain on 32x32x3, fast enough to build many times."""
    act = "relu" if relu_inside else None
    x = inputs = keras.Input((32, 32, 3))
    for name, filters, stride in (("c1", 16, 1), ("c2", 24, 2), ("c3", 10, 1)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", activation=act,
                                use_bias=use_bias, name=name)(x)
        if name == dead_after:
            x = keras.layers.Rescaling(0.0, name="kill")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="dense")(x)
    return keras.Model(inputs, outputs)


def residual_cnn() -> keras.Model:
    """c3 reads c1's and c2's outputs (a skip connection), so its probe cannot start at c2."""
    inputs = keras.Input((32, 32, 3))
    a = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inputs)
    b = keras.layers.Conv2D(16, 3, padding="same", name="c2")(keras.layers.ReLU()(a))
    s = keras.layers.Add()([a, b])
    c = keras.layers.Conv2D(8, 3, padding="same", name="c3")(keras.layers.ReLU()(s))
    return keras.Model(inputs, c)


# --------------------------------------------------------------------------- named initializers


@pytest.mark.parametrize("name", list(INITIALIZERS))
def test_named_initializer_std_matches_formula(name):
    shape = (3, 3, 192, 192)
    fan_in, fan_out = fans(shape)
    sample = keras.ops.convert_to_numpy(get_initializer(name, seed=1)(shape))
    want = expected_std(name, fan_in, fan_out, columns=shape[-1])
    assert sample.shape == shape
    assert abs(sample.std() / want - 1.0) < 0.02, (name, sample.std(), want)
    assert abs(sample.mean()) < 0.05 * want
    if name in UNIFORM_INITIALIZERS:
        limit = uniform_limit(name, fan_in, fan_out)
        assert np.abs(sample).max() <= limit
        assert np.abs(sample).max() > 0.99 * limit  # fills the interval, not a narrower one


def test_expected_std_formulas_and_fans():
    assert fans((3, 3, 3, 96)) == (27, 864)
    assert fans((1, 1, 192, 10)) == (192, 10)
    assert fans((192, 10)) == (192, 10)
    assert expected_std("gaussian", 27, 864) == 0.01
    assert expected_std("glorot_normal", 27, 864) == pytest.approx(math.sqrt(2 / 891))
    assert expected_std("glorot_uniform", 27, 864) == pytest.approx(math.sqrt(6 / 891) / 3**0.5)
    assert expected_std("he_normal", 864, 864) == pytest.approx(math.sqrt(2 / 864))
    assert uniform_limit("he_uniform", 864, 1) == pytest.approx(math.sqrt(6 / 864))
    assert expected_std("orthogonal", 27, 864, columns=96) == pytest.approx(1 / math.sqrt(96))
    # Keras' truncated normals divide by the std of N(0, 1) truncated at +-2 to keep the formula:
    # Var = 1 - 2 a phi(a) / (2 Phi(a) - 1) with a = 2.
    phi_2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    truncated_std = math.sqrt(1 - 4 * phi_2 / math.erf(2 / math.sqrt(2)))
    assert truncated_std == pytest.approx(0.87962566103423978, rel=1e-12)
    with pytest.raises(ValueError, match="he_normal"):
        expected_std("xavier", 1, 1)


def test_get_initializer_names_passthrough_and_errors():
    assert isinstance(get_initializer("gaussian"), keras.initializers.RandomNormal)
    assert get_initializer("gaussian").stddev == 0.01
    assert isinstance(get_initializer("He-Normal"), keras.initializers.HeNormal)
    custom = keras.initializers.RandomUniform(-1, 1)
    assert get_initializer(custom) is custom
    with pytest.raises(ValueError) as err:
        get_initializer("xavier")
    for name in INITIALIZERS:
        assert name in str(err.value)
    with pytest.raises(TypeError):
        get_initializer(0.01)
    a = keras.ops.convert_to_numpy(get_initializer("he_normal", seed=3)((3, 3, 3, 8)))
    b = keras.ops.convert_to_numpy(get_initializer("he_normal", seed=3)((3, 3, 3, 8)))
    np.testing.assert_array_equal(a, b)


def test_models_builder_uses_course_names():
    model = all_cnn_c(initializer="gaussian", weight_decay=None)
    stds = [kernel_of(layer).std() for layer in conv_layers(model)]
    assert all(abs(s / 0.01 - 1) < 0.1 for s in stds), stds


# --------------------------------------------------------------------------- orthonormal kernels


@pytest.mark.parametrize("shape", [(3, 3, 3, 96), (3, 3, 96, 96), (1, 1, 192, 10), (64, 10)])
def test_orthonormal_kernel_filters_are_orthonormal(shape):
    w = orthonormal_kernel(shape, np.random.default_rng(0))
    assert w.shape == shape and w.dtype == np.float32
    flat = w.reshape(-1, shape[-1]).astype(np.float64)  # fan-in x filters
    if shape[-1] <= flat.shape[0]:
        gram = flat.T @ flat  # one orthonormal column per filter
    else:  # conv1: 96 filters in a 27-dimensional input space; the rows are orthonormal
        gram = flat @ flat.T
    np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-5)
    assert orthonormality_error(w) < 1e-5
    np.testing.assert_array_equal(w, orthonormal_kernel(shape, np.random.default_rng(0)))


@pytest.mark.parametrize("shape", [(3, 3, 3, 96), (3, 3, 96, 96), (1, 1, 192, 10)])
def test_seed_orthonormal_mixes_channels_last_axes(shape):
    w = seed_orthonormal(shape, np.random.default_rng(0))
    assert w.shape == shape
    # Not orthonormal: wrong scale (only kh rows of length kw*cin*cout are unit vectors) ...
    assert orthonormality_error(w) > 0.5
    # ... and not even orthogonal up to scale: filters are correlated, norms differ.
    assert orthonormality_error(w, equal_norms=True) > 0.05


def test_seed_orthonormal_is_right_for_theano_layout_and_dense():
    kh, kw, cin, cout = 3, 3, 32, 32
    theano = seed_orthonormal((cout, cin, kh, kw), np.random.default_rng(0))
    channels_last = theano.transpose(2, 3, 1, 0)  # (cout, cin, kh, kw) -> (kh, kw, cin, cout)
    assert orthonormality_error(channels_last) < 1e-5
    assert orthonormality_error(seed_orthonormal((192, 10), np.random.default_rng(0))) < 1e-5


# --------------------------------------------------------------------------- LSUV on All-CNN-C


@pytest.fixture(scope="module")
def allcnn_variances(lsuv_allcnn, batches):
    """Conv output variances of the LSUV'd All-CNN-C on the fitting and held-out batches (one
    forward pass of both)."""
    model, _ = lsuv_allcnn
    convs = conv_layers(model)
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    outs = probe([np.concatenate(batches)], training=False)
    n = len(batches[0])
    result = {"fit": {}, "held_out": {}}
    for layer, y in zip(convs, outs, strict=True):
        y = keras.ops.convert_to_numpy(y)
        result["fit"][layer.name] = float(np.var(y[:n], dtype=np.float64))
        result["held_out"][layer.name] = float(np.var(y[n:], dtype=np.float64))
    print("\nconv output variances after LSUV:",
          {k: {n: round(v, 3) for n, v in d.items()} for k, d in result.items()})
    return result


def test_lsuv_unit_variance_on_fitting_batch(lsuv_allcnn, allcnn_variances):
    model, report = lsuv_allcnn
    assert report.layer_names == [layer.name for layer in conv_layers(model)] == [
        f"conv{i}" for i in range(1, 10)]
    assert all(r.status == "ok" and r.iterations >= 1 for r in report)
    variances = allcnn_variances["fit"]
    for record in report:
        assert abs(variances[record.name] - 1.0) < TOL_VAR, (record.name, variances)
        assert variances[record.name] == pytest.approx(record.var_after, rel=1e-3)
    # Orthonormal pre-init: conv2..conv9 see ReLUs of unit-variance pre-activations (about
    # half the variance) through an orthonormal map.
    assert all(0.2 < r.var_before < 0.8 for r in report[1:]), report


def test_lsuv_variance_on_held_out_batch(allcnn_variances):
    variances = allcnn_variances["held_out"]
    for name, var in variances.items():
        assert abs(var - 1.0) < HELD_OUT_TOL, (name, variances)


def test_lsuv_kernels_are_scaled_orthonormal(lsuv_allcnn):
    model, report = lsuv_allcnn
    for layer in conv_layers(model):
        w = kernel_of(layer)
        flat = w.reshape(-1, w.shape[-1])
        gram = flat.T @ flat if flat.shape[1] <= flat.shape[0] else flat @ flat.T
        c = report[layer.name].scale ** 2  # W^T W = c I with c the LSUV factor squared
        np.testing.assert_allclose(gram / c, np.eye(len(gram)), atol=1e-4, err_msg=layer.name)
        assert orthonormality_error(w, equal_norms=True) < 1e-4
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), 0.0)


def test_lsuv_report_table_and_rows(lsuv_allcnn):
    _, report = lsuv_allcnn
    assert isinstance(report, LSUVReport) and len(report) == 9
    text = str(report)
    assert text == report.to_text()
    lines = text.splitlines()
    assert "Tol_var=0.1" in lines[0] and "T_max=10" in lines[0]
    assert lines[1].split()[:5] == ["layer", "kind", "output", "Var", "before"]
    assert [line.split()[0] for line in lines[3:]] == report.layer_names
    assert len({len(line) for line in lines[1:3]}) == 1  # header as wide as the rule
    rows = report.as_rows()
    assert rows[0]["layer"] == "conv1" and rows[0]["output_shape"] == [32, 32, 96]
    assert rows[6]["output_shape"] == [6, 6, 192]  # conv7 is "valid" in the paper variant
    json.dumps(rows)
    assert report["conv9"].kind == "Conv2D" and not report["conv9"].warned


def test_model_trains_after_lsuv(lsuv_allcnn, batches, cifar_sample):
    model, _ = lsuv_allcnn
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    x, y = batches[0][:8], cifar_sample.y_train[:8]
    clone.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", run_eagerly=True)
    crossentropy = keras.losses.SparseCategoricalCrossentropy()

    def loss() -> float:  # inference mode: no dropout noise, no weight decay term
        return float(keras.ops.convert_to_numpy(crossentropy(y, clone(x, training=False))))

    before_loss, before = loss(), kernel_of(clone.get_layer("conv1"))
    steps = [float(clone.train_on_batch(x, y)) for _ in range(2)]
    after_loss = loss()
    assert all(math.isfinite(v) for v in [before_loss, *steps, after_loss]), steps
    assert after_loss < before_loss, (before_loss, steps, after_loss)
    assert not np.allclose(kernel_of(clone.get_layer("conv1")), before)


def test_lsuv_batch_norm_model(batches):
    x = batches[0][:16]
    model = all_cnn_c(batch_norm=True)
    report = lsuv(model, x, seed=1)
    assert all(r.status == "ok" for r in report), report
    convs = conv_layers(model)
    assert all(layer.bias is None for layer in convs)
    # Fresh batch norm in inference mode is ~identity: its outputs keep unit variance too.
    bns = [model.get_layer(f"bn{i}") for i in range(1, 10)]
    variances = output_variances(model, convs + bns, x)
    assert all(abs(v - 1) < TOL_VAR for v in variances.values()), variances


# --------------------------------------------------------------------------- LSUV edge cases


def test_zero_variance_layer_warns_and_stays_finite(batches):
    model = small_cnn(dead_after="c1")  # everything after c1 is multiplied by 0
    with pytest.warns(RuntimeWarning, match="'c2'") as caught:
        report = lsuv(model, batches[0][:16], seed=0)
    named = " ".join(str(w.message) for w in caught)
    assert "'c1'" not in named and "'c3'" in named and "'dense'" in named
    assert report["c1"].status == "ok"
    assert [report[n].status for n in ("c2", "c3", "dense")] == ["zero variance"] * 3
    assert all(r.warned for r in report[1:]) and report["c2"].iterations == 0
    for layer in model.layers:
        for w in layer.get_weights():
            assert np.all(np.isfinite(w)), layer.name
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(model(batches[0][:4]))))


def test_all_zero_input_without_bias_warns_for_every_layer():
    model = small_cnn(use_bias=False)
    with pytest.warns(RuntimeWarning, match="variance 0"):
        report = lsuv(model, np.zeros((8, 32, 32, 3), np.float32), seed=0)
    assert all(r.status == "zero variance" for r in report)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_non_finite_batch_warns():
    batch = np.full((4, 32, 32, 3), np.nan, np.float32)
    with pytest.warns(RuntimeWarning, match="'c1' has output variance nan"):
        report = lsuv(small_cnn(), batch, seed=0)
    assert report["c1"].status == "non-finite"


def test_recompute_matches_linear_shortcut_and_relu_inside(batches):
    x = batches[0][:32]
    a, b = small_cnn(), small_cnn()
    ra = lsuv(a, x, seed=5)
    rb = lsuv(b, x, seed=5, recompute=True)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for wa, wb in zip(la.get_weights(), lb.get_weights(), strict=True):
            np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-6)
    assert [r.var_after for r in ra] == pytest.approx([r.var_after for r in rb], rel=1e-4)
    # A conv with a built-in ReLU: its output is post-activation and must be re-measured.
    model = small_cnn(relu_inside=True)
    report = lsuv(model, x, seed=0)
    convs = [model.get_layer(n) for n in ("c1", "c2", "c3")]
    variances = output_variances(model, convs, x)
    assert all(abs(v - 1) < TOL_VAR for v in variances.values()), (variances, str(report))


def test_carried_scale_matches_recompute_on_allcnn(batches):
    """All-CNN-C: the scale carried unapplied through ReLU and dropout (and the skipped bias
    add) gives the kernels and variances that re-running every layer gives."""
    x = batches[0][:32]
    models = []
    for recompute in (False, True):
        keras.utils.set_random_seed(11)
        model = all_cnn_c(variant="paper")
        models.append((model, lsuv(model, x, seed=2, recompute=recompute)))
    (a, ra), (b, rb) = models
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-6)
    assert [r.var_before for r in ra] == pytest.approx([r.var_before for r in rb], rel=1e-4)
    assert [r.var_after for r in ra] == pytest.approx([r.var_after for r in rb], rel=1e-4)
    variances = output_variances(a, conv_layers(a), x)
    assert all(abs(v - 1) < 1e-3 for v in variances.values()), variances


def test_skip_connections_and_small_layers(batches):
    x = batches[0][:16]
    model = residual_cnn()
    lsuv(model, x, seed=0)
    convs = [model.get_layer(n) for n in ("c1", "c2", "c3")]
    variances = output_variances(model, convs, x)
    assert all(abs(v - 1) < TOL_VAR for v in variances.values()), variances

    model = small_cnn()
    dense_before = model.get_layer("dense").get_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing to warn about
        report = lsuv(model, x, skip_smaller_than=32, seed=0)
    assert report["dense"].status == "skipped" and report["dense"].skipped
    assert not report["dense"].warned
    for before, after in zip(dense_before, model.get_layer("dense").get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_lsuv_under_mixed_precision(batches):
    """training.fit may build the model under mixed_bfloat16: outputs are bfloat16 there."""
    x = batches[0][:16]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = small_cnn()
        report = lsuv(model, x, seed=0)
    finally:
        keras.config.set_dtype_policy(previous)
    assert all(r.status == "ok" for r in report), report
    convs = [model.get_layer(n) for n in ("c1", "c2", "c3")]
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    for layer, y in zip(convs, probe([x], training=False), strict=True):
        var = float(np.var(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))))
        assert abs(var - 1) < TOL_VAR, (layer.name, var)


def test_lsuv_seed_rebuild_reaches_unit_variance_without_orthogonal_filters(batches):
    x = batches[0][:16]
    model = small_cnn()
    report = lsuv_seed_rebuild(model, x, seed=0)  # skips layers with < 32 outputs per image
    assert report.method == "lsuv_seed_rebuild"
    assert report["dense"].status == "skipped"  # 10 outputs, as LSUV-keras would
    convs = [model.get_layer(n) for n in ("c1", "c2", "c3")]
    variances = output_variances(model, convs, x)
    assert all(abs(v - 1) <= TOL_VAR for v in variances.values()), variances
    assert orthonormality_error(kernel_of(model.get_layer("c2")), equal_norms=True) > 0.05


# --------------------------------------------------------------------------- backends

BACKEND_SCRIPT = textwrap.dedent("""
    import json
    import keras, numpy as np
    from allcnn_lib.data import load_cifar10
    from allcnn_lib.initializers import lsuv
    from allcnn_lib.models import all_cnn_c, conv_layers

    x = load_cifar10(sample=True).x_train[:16].astype("float32") / 255.0 - 0.5
    model = all_cnn_c()
    report = lsuv(model, x, seed=0)
    convs = conv_layers(model)
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    outs = probe([x], training=False)
    var = {l.name: float(np.var(keras.ops.convert_to_numpy(y))) for l, y in zip(convs, outs)}
    print("RESULT " + json.dumps({"backend": keras.backend.backend(), "var": var,
                                  "status": [r.status for r in report]}))
""")

BACKENDS = ("tensorflow", "jax", "torch")
BACKEND_TIMEOUT_S = 240
#: torch costs ~12 CPU seconds more (mostly its import); test_models already trains on torch.
TORCH_OPT_IN = "ALLCNN_TEST_TORCH"


def backend_available(backend: str) -> bool:
    if backend == "torch" and os.environ.get(TORCH_OPT_IN, "") not in {"1", "true", "yes"}:
        return False
    return find_spec(backend) is not None


def start_backend_run(backend: str, folder: Path):
    """Run BACKEND_SCRIPT under ``backend`` in a subprocess; output goes to files in folder."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    # XLA's CPU optimizer dominates jax's eager op-by-op run (17 -> 10 CPU seconds).
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    stdout, stderr = open(folder / "stdout", "w+"), open(folder / "stderr", "w+")
    process = subprocess.Popen([sys.executable, "-c", BACKEND_SCRIPT], cwd=REPO, env=env,
                               stdout=stdout, stderr=stderr, text=True)
    return process, stdout, stderr


@pytest.fixture(scope="module", autouse=True)
def backend_runs(request, tmp_path_factory):
    """Start the selected backends' subprocesses as this module starts, so that they run
    alongside the in-process tests; each backend's test then waits for its own."""
    selected = {item.callspec.params["backend"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_lsuv_runs_on_backend"}
    selected.discard(keras.backend.backend())  # this process runs that one itself
    runs = {b: start_backend_run(b, tmp_path_factory.mktemp(f"lsuv_{b}"))
            for b in BACKENDS if b in selected and backend_available(b)}
    yield runs
    for process, stdout, stderr in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
        stderr.close()


def read_from_start(stream) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lsuv_runs_on_backend(backend, backend_runs, tmp_path, request):
    """LSUV on All-CNN-C gives unit conv output variances on every backend: this process' own
    backend through the module's All-CNN-C fixture, the others in subprocesses (16 images)."""
    if backend == "torch" and find_spec("torch") is not None and not backend_available("torch"):
        pytest.skip(f"LSUV on torch is opt-in: set {TORCH_OPT_IN}=1")
    if find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    if backend == keras.backend.backend():  # this process' backend: the All-CNN-C fixture
        _, report = request.getfixturevalue("lsuv_allcnn")
        variances = request.getfixturevalue("allcnn_variances")["fit"]
        check_backend_result({"backend": keras.backend.backend(), "var": variances,
                              "status": [r.status for r in report]}, backend)
        return
    if backend not in backend_runs:
        backend_runs[backend] = start_backend_run(backend, tmp_path)
    process, stdout, stderr = backend_runs[backend]
    try:
        returncode = process.wait(timeout=BACKEND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = f"killed after {BACKEND_TIMEOUT_S} s"
    out, err = read_from_start(stdout), read_from_start(stderr)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert returncode == 0 and lines, f"exit {returncode}\n{out[-2000:]}\n{err[-3000:]}"
    check_backend_result(json.loads(lines[-1][len("RESULT "):]), backend)


def check_backend_result(result: dict, backend: str) -> None:
    assert result["backend"] == backend
    assert result["status"] == ["ok"] * 9
    assert all(abs(v - 1) < TOL_VAR for v in result["var"].values()), result
