"""Figures for the notebooks and the command line (matplotlib and seaborn; PNG).

Every function draws one figure with a title and labelled axes, and returns the Figure so that
callers can save it (``fig.savefig(path)``).
"""

from __future__ import annotations

import csv
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

# --------------------------------------------------------------------------- images


def image_row(images: Sequence[np.ndarray], captions: Sequence[str], *, title: str = "",
              size: float = 2.8) -> Figure:
    """A row of images with a caption under each (uint8 HWC, or floats in [0, 1])."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.6),
                             squeeze=False)
    for ax, image, caption in zip(axes[0], images, captions, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_xlabel(textwrap.fill(caption, width=int(size * 10)), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
               per_class: int = 8, title: str = "", predictions: np.ndarray | None = None
               ) -> Figure:
    """A grid with one row per class and ``per_class`` images of it, class names on the left.

    With ``predictions``, each image's title gives the predicted class (red when wrong).
    """
    n_classes = len(class_names)
    fig, axes = plt.subplots(n_classes, per_class, figsize=(per_class * 0.9, n_classes * 0.95),
                             squeeze=False)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if j < len(idx):
                ax.imshow(images[idx[j]], interpolation="nearest")
                if predictions is not None:
                    p = int(predictions[idx[j]])
                    ax.set_title(class_names[p], fontsize=7, color="k" if p == c else "r")
            if j == 0:
                ax.set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.2, w_pad=0.2)
    return fig


def image_table(rows: Mapping[str, Sequence[np.ndarray]], column_titles: Sequence[str], *,
                title: str = "", size: float = 1.5) -> Figure:
    """A table of images: one row per entry of ``rows`` (its label on the left), one column per
    image, ``column_titles`` above the first row (uint8 HWC, or floats in [0, 1])."""
    fig, axes = plt.subplots(len(rows), len(column_titles), squeeze=False,
                             figsize=(size * len(column_titles) + 1.2, size * len(rows) + 0.5))
    for i, (label, images) in enumerate(rows.items()):
        for j, image in enumerate(images):
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if i == 0:
                ax.set_title(column_titles[j], fontsize=8)
        axes[i, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig


def tile_images(images: np.ndarray, columns: int, *, pad: int = 1,
                fill: float = 1.0) -> np.ndarray:
    """``(N, h, w, 3)`` images in [0, 1] as one mosaic of ``columns`` per row, ``pad`` pixels
    of ``fill`` between them (for many small images, such as first-layer filters)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    mosaic = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        mosaic[top:top + h, left:left + w] = image
    return mosaic


def heat_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5,
                 cmap: str = "jet") -> np.ndarray:
    """``image`` (uint8 HWC) blended with the colour-mapped ``heat`` (HW, scaled to [0, 1]
    here), as an RGB float image in [0, 1]."""
    heat = np.asarray(heat, np.float64)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colours = plt.get_cmap(cmap)(heat)[..., :3]
    return (1 - alpha) * np.asarray(image, np.float64) / 255.0 + alpha * colours


# --------------------------------------------------------------------------- data statistics


def class_balance(splits: Mapping[str, np.ndarray], class_names: Sequence[str], *,
                  title: str = "Images per class") -> Figure:
    """Grouped bars: the number of images of each class in each split."""
    import seaborn as sns

    rows = [(name, class_names[c], int(n))
            for name, labels in splits.items()
            for c, n in enumerate(np.bincount(labels, minlength=len(class_names)))]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(x=[r[1] for r in rows], y=[r[2] for r in rows], hue=[r[0] for r in rows], ax=ax)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def pixel_histograms(images: np.ndarray, *, title: str = "Pixel values") -> Figure:
    """Histograms of the 8-bit values of each colour channel."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for channel, color in enumerate(("tab:red", "tab:green", "tab:blue")):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        ax.plot(np.arange(256), counts / counts.sum() * 100, color=color,
                label="RGB"[channel])
    ax.set_xlabel("pixel value (0-255)")
    ax.set_ylabel("share of pixels (%)")
    ax.set_xlim(0, 255)
    ax.set_title(title)
    ax.legend(title="channel")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- training runs


def read_columns(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A CSV file with a header (``history.csv``, ``batches.csv``) as float columns."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(np.nan)
    return {k: np.asarray(v, float) for k, v in columns.items()}


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with TensorBoard's start-up correction (``weight`` in [0, 1))."""
    values = np.asarray(values, float)
    out = np.empty_like(values)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = avg / norm
    return out


def training_curves(history: Mapping[str, Sequence[float]] | str | os.PathLike,
                    metric: str = "accuracy", *,
                    batches: Mapping[str, Sequence[float]] | str | os.PathLike | None = None,
                    smoothing: float = 0.9, title: str | None = None) -> Figure:
    """``metric`` ("accuracy" or "loss") against epochs: training and validation per epoch and,
    with ``batches`` (``batches.csv``), every training batch, faint, with a smoothed line.

    ``history`` is ``history.csv`` (a path) or its columns (epochs counted from 0, as Keras'
    CSVLogger writes them); each epoch's value is drawn at its end (x = epoch + 1).
    """
    if not isinstance(history, Mapping):
        history = read_columns(history)
    if batches is not None and not isinstance(batches, Mapping):
        batches = read_columns(batches)
    epochs = np.asarray(history.get("epoch", np.arange(len(history.get(metric, [])))), float)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if batches is not None and len(batches.get(metric, ())):
        steps_per_epoch = float(np.nanmax(batches["batch"])) + 1
        x = (np.asarray(batches["step"], float) + 1) / steps_per_epoch
        ax.plot(x, batches[metric], color="tab:blue", alpha=0.2, lw=0.8,
                label="training, per batch")
        ax.plot(x, smooth(batches[metric], smoothing), color="tab:blue", lw=1.2, alpha=0.7,
                label=f"training, per batch (smoothed {smoothing})")
    if metric in history:
        ax.plot(epochs + 1, history[metric], "o-", color="tab:blue", ms=3,
                label="training (epoch mean)")
    if f"val_{metric}" in history:
        ax.plot(epochs + 1, history[f"val_{metric}"], "s-", color="tab:orange", ms=3,
                label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.set_title(title or f"Training and validation {metric}")
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix_plot(confusion: np.ndarray, class_names: Sequence[str], *,
                          normalize: bool = True, title: str = "Confusion matrix") -> Figure:
    """A seaborn heatmap of a confusion matrix (rows: true class, columns: predicted class).

    ``normalize`` shows each row as shares of the true class (the diagonal is the per-class
    accuracy); the cells are annotated either way.
    """
    import seaborn as sns

    cm = np.asarray(confusion, float)
    values = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(8, 6.8))
    sns.heatmap(values, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues",
                xticklabels=class_names, yticklabels=class_names, square=True, cbar=True,
                vmin=0, vmax=1 if normalize else None, annot_kws={"fontsize": 8}, ax=ax)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120,
                close: bool = False) -> Path:
    """Save ``fig`` as PNG atomically (temporary file, then ``os.replace``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if close:
            plt.close(fig)
    return path


def save_run_plots(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw ``accuracy.png`` and ``loss.png`` of a run folder from its CSV files."""
    run_dir = Path(run_dir)
    history_csv = run_dir / "history.csv"
    if not history_csv.is_file():
        raise FileNotFoundError(f"{history_csv}: no such file (not a training run folder?)")
    history = read_columns(history_csv)
    batches_csv = run_dir / "batches.csv"
    batches = read_columns(batches_csv) if batches_csv.is_file() else None
    out = {}
    for metric in ("accuracy", "loss"):
        fig = training_curves(history, metric, batches=batches,
                              title=f"{run_dir.name}: {metric}")
        out[metric] = save_figure(fig, run_dir / f"{metric}.png", close=True)
    return out
