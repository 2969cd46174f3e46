"""Figures for the notebooks and the command line (matplotlib and seaborn; PNG).

Every function draws one figure with a title and labelled axes, and returns the Figure so that
callers can save it (``fig.savefig(path)``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

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
