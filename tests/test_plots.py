"""Tests of allcnn_lib.plots: each figure has its title, labels and the drawn data; the image
helpers; atomic saving of a run folder's curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from allcnn_lib import plots  # noqa: E402

NAMES = [f"class {i}" for i in range(10)]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_plot_cams():
    images = np.zeros((3, 32, 32, 3), np.uint8)
    cams = np.random.default_rng(0).random((3, 32, 32))
    fig = plots.plot_cams(images, cams, [0, 1, 2], [0, 2, 2], NAMES)
    assert fig.axes[0].get_title() == "true: class 0"
    wrong = fig.axes[3 + 1].xaxis.label  # second image of the bottom row was misclassified
    assert matplotlib.colors.to_hex(wrong.get_color()) == "#ff0000"


def test_layer_stats_figure():
    stats = {"he": {"conv1": 1.0, "conv2": 1.1}, "gaussian": {"conv1": 1e-2, "conv2": 1e-4}}
    fig = plots.layer_stats_figure(stats, title="t", ylabel="std of y", predicted={"he": [1, 1]})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "t" and ax.get_ylabel() == "std of y"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "conv2"]
    assert len(ax.get_legend().get_texts()) == 3  # two initializers and the theory line
    with pytest.raises(ValueError, match="layers"):
        plots.layer_stats_figure({"a": {"x": 1.0}, "b": {"y": 1.0}}, title="t", ylabel="y")
    fig, axes = plt.subplots(1, 2)
    assert plots.layer_stats_figure(stats, title="a", ylabel="y", ax=axes[0]) is fig
    plots.layer_stats_figure(stats, title="b", ylabel="y", ax=axes[1], legend=False)
    assert axes[0].get_legend() is not None and axes[1].get_legend() is None


def test_image_row(cifar_sample):
    x = cifar_sample.x_train
    fig = plots.image_row(list(x[:2]), ["a", "b"], title="row")
    assert [ax.get_xlabel() for ax in fig.axes] == ["a", "b"]


def test_heat_overlay():
    blended = plots.heat_overlay(np.zeros((4, 4, 3), np.uint8), np.arange(16.0).reshape(4, 4))
    assert blended.shape == (4, 4, 3) and 0 <= blended.min() and blended.max() <= 1


def test_save_run_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text("epoch,accuracy,loss,val_accuracy,val_loss\n"
                                     "0,0.2,2.0,0.25,1.9\n1,0.3,1.8,0.3,1.8\n")
    (run / "batches.csv").write_text("epoch,batch,step,accuracy,loss\n"
                                     "0,0,0,0.1,2.1\n0,1,1,0.3,1.9\n1,0,2,0.3,1.8\n")
    files = plots.save_run_plots(run, tmp_path / "out")
    assert sorted(p.name for p in files.values()) == ["accuracy.png", "loss.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["accuracy.png", "loss.png"]
    assert files["loss"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="history.csv"):
        plots.save_run_plots(tmp_path / "missing")
