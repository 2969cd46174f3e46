"""A notebook's first cell: ``ctx = setup()``. ``ALLCNN_QUICK=1`` (``make test``) runs a notebook
on the shipped sample with tiny budgets (``ctx.budget``); saved outputs are the standard run's."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from allcnn_lib.data import quick_mode


@dataclass(frozen=True)
class NotebookContext:
    quick: bool
    seed: int

    def budget(self, standard: int, quick: int) -> int:
        """``standard`` in the standard run, ``quick`` in quick mode (epochs, images, steps)."""
        return quick if self.quick else standard

    def __str__(self) -> str:
        mode = "quick (ALLCNN_QUICK=1: shipped sample, tiny budgets)" if self.quick else "standard"
        return f"mode: {mode}; seed: {self.seed}"


@contextlib.contextmanager
def silenced_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a while (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def setup(seed: int = 0) -> NotebookContext:
    """Quiet TensorFlow's start-up (its CUDA probe prints from C++), seed Python, NumPy and
    Keras, and set one plot style."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        with silenced_stderr():
            import tensorflow as tf

            tf.constant(0.0) + 1.0  # the first op probes for CUDA ("failed call to cuInit")
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import keras
    import matplotlib as mpl
    import seaborn as sns
    from IPython import get_ipython

    keras.utils.set_random_seed(seed)
    if (shell := get_ipython()) is not None:
        shell.run_line_magic("matplotlib", "inline")
        shell.run_line_magic("config", "InlineBackend.figure_formats = ['png']")
    sns.set_theme(context="notebook", style="whitegrid")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (7, 4),
                         "axes.titleweight": "bold"})
    return NotebookContext(quick=quick_mode(), seed=seed)


def machine_summary() -> str:
    """One line naming the Python, Keras, backend and CPU count."""
    import keras

    return (f"Python {platform.python_version()}, Keras {keras.__version__} "
            f"({keras.backend.backend()} backend), {os.cpu_count()} CPU cores")
