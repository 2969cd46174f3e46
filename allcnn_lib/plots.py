"""The figures that several notebooks or the command line draw (matplotlib and seaborn); a
figure that one notebook alone draws is drawn there. Each function draws one titled figure with
labelled axes and returns it; ``save_figure`` writes a PNG."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from allcnn_lib.runs import BATCHES_CSV, HISTORY_CSV, read_columns

# --------------------------------------------------------------------------- images


def _show(ax, image, **kwargs) -> None:
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set(xticks=[], yticks=[])
    ax.grid(False)


def image_row(images: Sequence[np.ndarray], captions: Sequence[str], *, title: str = "",
              size: float = 2.8) -> Figure:
    """A row of images (uint8 HWC, or floats in [0, 1]) with a caption under each."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.6),
                             squeeze=False)
    for ax, image, caption in zip(axes[0], images, captions, strict=True):
        _show(ax, image)
        ax.set_xlabel(textwrap.fill(caption, width=int(size * 10)), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``image`` (uint8 HWC) half and half with the colour-mapped ``heat`` (HW, scaled to
    [0, 1] here), as an RGB float image in [0, 1]."""
    heat = np.asarray(heat, np.float64) - np.min(heat)
    colours = plt.get_cmap("jet")(heat / heat.max() if heat.max() > 0 else heat)[..., :3]
    return 0.5 * np.asarray(image, np.float64) / 255.0 + 0.5 * colours


# --------------------------------------------------------------------------- training runs


def training_curves(history: Mapping[str, Sequence[float]] | str | os.PathLike,
                    metric: str = "accuracy", *,
                    batches: Mapping[str, Sequence[float]] | str | os.PathLike | None = None,
                    title: str | None = None) -> Figure:
    """``metric`` against epochs: training and validation per epoch (``history.csv`` or its
    columns) and, with ``batches`` (``batches.csv``), every batch, faint, and its exponential
    moving average (weight 0.9, bias-corrected as TensorBoard's). Epoch e is drawn at e + 1."""
    history = history if isinstance(history, Mapping) else read_columns(history)
    batches = batches if batches is None or isinstance(batches, Mapping) else read_columns(batches)
    epochs = np.asarray(history.get("epoch", np.arange(len(history.get(metric, [])))), float) + 1
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if batches is not None and len(batches.get(metric, ())):
        x = (np.asarray(batches["step"], float) + 1) / (np.nanmax(batches["batch"]) + 1)
        ax.plot(x, batches[metric], color="tab:blue", alpha=0.2, lw=0.8,
                label="training, per batch")
        ax.plot(x, pd.Series(batches[metric]).ewm(alpha=0.1).mean(), color="tab:blue", lw=1.2,
                alpha=0.7, label="training, per batch (smoothed 0.9)")
    if metric in history:
        ax.plot(epochs, history[metric], "o-", color="tab:blue", ms=3,
                label="training (epoch mean)")
    validation = np.asarray(history.get(f"val_{metric}", []), float)
    has_validation = bool(np.isfinite(validation).any())  # none when trained on all images
    if has_validation:
        ax.plot(epochs, validation, "s-", color="tab:orange", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel=metric, title=title or (
        f"Training and validation {metric}" if has_validation else f"Training {metric}"))
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix_plot(confusion: np.ndarray, class_names: Sequence[str], *,
                          title: str = "Confusion matrix") -> Figure:
    """A heat map of a confusion matrix (rows: true class, columns: predicted class), each row
    as shares of its true class (the diagonal is the per-class accuracy)."""
    cm = np.asarray(confusion, float)
    fig, ax = plt.subplots(figsize=(8, 6.8))
    sns.heatmap(cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), annot=True, fmt=".2f",
                cmap="Blues", xticklabels=class_names, yticklabels=class_names, square=True,
                vmin=0, vmax=1, annot_kws={"fontsize": 8}, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, close: bool = False) -> Path:
    """Save ``fig`` as PNG atomically (a temporary file, then ``os.replace``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if close:
            plt.close(fig)
    return path


def save_run_plots(run_dir: str | os.PathLike,
                   out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Draw ``accuracy.png`` and ``loss.png`` of a run folder into ``out_dir`` (default: the
    run folder) from its ``history.csv`` and ``batches.csv``."""
    run_dir = Path(run_dir)
    history = read_columns(run_dir / HISTORY_CSV)
    if not history:
        raise FileNotFoundError(f"{run_dir}: no history.csv (not a training run folder?)")
    batches = read_columns(run_dir / BATCHES_CSV) or None
    return {metric: save_figure(training_curves(history, metric, batches=batches,
                                                title=f"{run_dir.name}: {metric}"),
                                Path(out_dir or run_dir) / f"{metric}.png", close=True)
            for metric in ("accuracy", "loss")}


# --------------------------------------------------------------------------- class maps

def plot_cams(images: np.ndarray, cams: np.ndarray, true_labels: Sequence[int],
              predicted: Sequence[int], class_names: Sequence[str], *,
              title: str = "Class activation maps of the predicted class") -> Figure:
    """Top row: the images (uint8) with their true class; bottom row: each with the class
    activation map of its predicted class on top (``heat_overlay``), red when wrong."""
    fig, axes = plt.subplots(2, len(images), figsize=(1.55 * len(images) + 0.9, 4.0),
                             squeeze=False)
    for i, (image, cam, true, pred) in enumerate(zip(images, cams, true_labels, predicted,
                                                     strict=True)):
        _show(axes[0, i], image)
        _show(axes[1, i], heat_overlay(image, cam))
        axes[0, i].set_title(f"true: {class_names[int(true)]}", fontsize=9)
        axes[1, i].set_xlabel(f"pred: {class_names[int(pred)]}", fontsize=9,
                              color="r" if int(pred) != int(true) else "k")
    axes[1, 0].set_ylabel("CAM of\npredicted class", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- signal propagation


def layer_stats_figure(stats: Mapping[str, Mapping[str, float]], *, title: str, ylabel: str,
                       xlabel: str = "layer (forward order)",
                       predicted: Mapping[str, Sequence[float]] | None = None,
                       legend: bool = True, ax=None) -> Figure:
    """One line per initializer (label -> {layer: value}, the same layers in each) of a
    per-layer statistic on a log scale, ``predicted`` (label -> values) dashed in the same
    colour; into ``ax`` if given (the caller lays it out). Names label up to 12 layers."""
    if not stats:
        raise ValueError("nothing to plot")
    own_figure = ax is None
    fig, ax = plt.subplots(figsize=(7.5, 4.4)) if own_figure else (ax.figure, ax)
    names = list(next(iter(stats.values())))
    x = np.arange(1, len(names) + 1)
    for i, (label, values) in enumerate(stats.items()):
        if list(values) != names:
            raise ValueError(f"{label!r} has layers {list(values)}, expected {names}")
        line, = ax.plot(x, list(values.values()), marker="osD^vP*X"[i % 8], ms=4, label=label)
        if predicted and label in predicted:
            ax.plot(x, predicted[label], ls="--", color=line.get_color(), alpha=0.8)
    if predicted:
        ax.plot([], [], ls="--", color="grey", label="predicted (He et al., Eq. 9)")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale="log")
    if len(names) <= 12:
        ax.set_xticks(x, names, fontsize=9)
    if legend:
        ax.legend(fontsize=9)
    if own_figure:
        fig.tight_layout()
    return fig


