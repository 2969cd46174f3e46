"""What a notebook's first cell needs: the quick-mode switch, seeds, quiet logs, plot style.

Every notebook starts with::

    from allcnn_lib.notebook import setup
    ctx = setup()

``ALLCNN_QUICK=1`` in the environment (set by ``make test``) is the one switch that makes every
notebook run on the shipped sample with tiny budgets; the saved outputs come from the standard
run (the full CIFAR-10 when it is present).
"""

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
    """The mode a notebook runs in, and the budget helpers it should use."""

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
    """Send file descriptor 2 to /dev/null for a while (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_logs() -> None:
    """Silence TensorFlow's and absl's start-up chatter and known harmless warnings.

    TensorFlow's CUDA probes ("Could not find cuda drivers ...", "failed call to cuInit") are
    printed by C++ before its log level is read, so the import and the first op run with
    stderr silenced.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        with silenced_stderr():
            import tensorflow as tf

            # the first op probes for CUDA and prints "failed call to cuInit" on CPU machines
            tf.constant(0.0) + 1.0
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*np.find_common_type.*")


def plot_style() -> None:
    """One plot style for every figure: PNG output, readable fonts, seaborn's whitegrid."""
    import matplotlib as mpl

    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.run_line_magic("matplotlib", "inline")
            shell.run_line_magic("config", "InlineBackend.figure_formats = ['png']")
    except ImportError:  # plain Python: nothing to configure
        pass
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (7, 4),
                         "axes.titleweight": "bold"})


def setup(seed: int = 0, *, plots: bool = True) -> NotebookContext:
    """Quiet the logs, seed every generator, set the plot style; return the mode.

    Seeds Python, NumPy and the Keras backend through ``keras.utils.set_random_seed``.
    """
    quiet_logs()
    import keras

    keras.utils.set_random_seed(seed)
    if plots:
        plot_style()
    return NotebookContext(quick=quick_mode(), seed=seed)


def machine_summary() -> str:
    """One line naming the Python, Keras, backend and CPU count, for a notebook's setup cell."""
    import keras

    return (f"Python {platform.python_version()}, Keras {keras.__version__} "
            f"({keras.backend.backend()} backend), {os.cpu_count()} CPU cores")
