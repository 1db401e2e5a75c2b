"""PNG plots with matplotlib's Agg backend (no display needed).

    plot_accuracy_curve(path, classes_seen, accuracies, label="GLFC")
    plot_matrix(path, matrix, title, xlabel, ylabel)           # accuracy matrix or correlation heatmap
    plot_image_grid(path, images[N,C,H,W] in [0,1], titles)    # e.g. reconstructed prototypes
    plot_curves(path, {"name": (x, y)}, xlabel, ylabel)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_accuracy_curve", "plot_matrix", "plot_image_grid", "plot_curves"]


def _save(fig, path) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_curves(path, curves: dict, xlabel: str, ylabel: str, title: str = "") -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(list(x), list(y), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or any(curves):
        ax.legend()
    return _save(fig, path)


def plot_accuracy_curve(path, classes_seen: Sequence[int], accuracies: Sequence[float], label: str = "",
                        title: str = "Accuracy on all seen classes") -> str:
    return plot_curves(path, {label or "accuracy": (classes_seen, accuracies)}, "classes seen",
                       "top-1 accuracy (%)", title)


def plot_matrix(path, matrix, title: str = "", xlabel: str = "", ylabel: str = "",
                vmin: Optional[float] = None, vmax: Optional[float] = None, annotate: bool = True,
                cmap: str = "viridis") -> str:
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * data.shape[1], 1.0 + 0.45 * data.shape[0]) if data.shape[1] > 6
                           else (5, 4))
    im = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap)
    fig.colorbar(im, ax=ax)
    # percentages as integers, correlations and other unit-scale values with 2 decimals
    fmt = ".0f" if np.nanmax(np.abs(data)) > 1.5 else ".2f"
    if annotate and data.size <= 400:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, format(data[i, j], fmt),
                            ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def plot_image_grid(path, images, titles: Optional[Sequence[str]] = None, ncols: int = 8,
                    title: str = "") -> str:
    """images: array/tensor [N, C, H, W] with values in [0, 1] (clipped)."""
    imgs = np.asarray(images.detach().cpu().float() if hasattr(images, "detach") else images)
    n = max(1, imgs.shape[0])
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows + (0.3 if title else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= imgs.shape[0]:
            continue
        img = np.clip(imgs[k].transpose(1, 2, 0), 0, 1)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
        if titles is not None and k < len(titles):
            ax.set_title(str(titles[k]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
