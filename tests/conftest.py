"""Shared fixtures: real CIFAR-10 images from the shipped sample (always present)."""

from __future__ import annotations

import os

import pytest

from allcnn_lib.data import CIFAR10, DEFAULT_DATA_DIR, load_cifar10
from allcnn_lib.runs import ARCHS


@pytest.fixture(scope="session")
def cifar_sample() -> CIFAR10:
    """The shipped sample: 1,800 train, 200 validation, 1,000 test real images (uint8 NHWC)."""
    return load_cifar10(sample=True)


@pytest.fixture(scope="session")
def full_cifar10_dir():
    """The unpacked full set under data/, or skip (CI unpacks it when ../shared/ is there)."""
    folder = DEFAULT_DATA_DIR / "cifar-10-batches-py"
    if not (folder / "test_batch").is_file():
        pytest.skip("full CIFAR-10 not unpacked under data/ (optional)")
    return folder


@pytest.fixture(scope="session")
def no_tensorflow_env(tmp_path_factory) -> dict[str, str]:
    """An environment for ``allcnn`` processes in which ``import tensorflow`` ends the process
    with a marker line: a check that passes there provably runs before TensorFlow starts."""
    fake = tmp_path_factory.mktemp("no_tensorflow") / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('TENSORFLOW WAS IMPORTED')\n")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONDONTWRITEBYTECODE": "1",
           "ALLCNN_QUICK": "1", "PYTHONPATH": os.pathsep.join(
               [str(fake.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("ALLCNN_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def paper_models() -> dict:
    """Model C, Strided-CNN-C and All-CNN-C as the paper specifies them (seeded), per module."""
    import keras

    from allcnn_lib.models import build_model

    keras.utils.set_random_seed(0)
    return {arch: build_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def repository_models() -> dict:
    """The same three networks as the original repository built them (seeded), per module."""
    import keras

    from allcnn_lib.models import build_model

    keras.utils.set_random_seed(0)
    return {arch: build_model(arch, variant="repository") for arch in ARCHS}


def pytest_configure(config):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
