"""The pictures: matplotlib (Agg, no display) figures written as PNG atomically, at fixed pixel sizes.

- :func:`plot_norm_histogram`: paper Fig. 2, the last block's projection norms (log counts);
- :func:`plot_attention`: paper Fig. 4, CLS attention maps with and without ITAE;
- :func:`plot_embedding_map`: the report's 2-D map of the embeddings, coloured by cluster.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itae_export.files import atomic_write_bytes

if TYPE_CHECKING:
    from itae_export.calibrate.inspection import AttentionMaps, NormSample


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path, dpi: int) -> Path:
    """PNG through memory, then an atomic rename (never a half-written picture)."""

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _mpl().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


HIST_SIZE = (800, 450)  # pixels of the histogram PNG


def plot_norm_histogram(sample: NormSample, path: str | os.PathLike, *, theta: float, suggestion=None,
                        title: str = "") -> Path:
    """Paper Fig. 2: counts (log scale) of the candidate tokens' norms; current and suggested theta marked."""
    plt = _mpl()
    dpi = 100
    fig, ax = plt.subplots(figsize=(HIST_SIZE[0] / dpi, HIST_SIZE[1] / dpi), dpi=dpi)
    R = sample.num_register_tokens
    all_norms = sample.norms.ravel()
    hi = max(float(all_norms.max()), theta, suggestion.theta if suggestion is not None else 0.0)
    bins = np.linspace(0.0, hi * 1.05, 121)
    ax.hist(sample.norms[:, R:].ravel(), bins=bins, color="#4c72b0", alpha=0.85, label="patch tokens")
    if R:
        ax.hist(sample.norms[:, :R].ravel(), bins=bins, color="#dd8452", alpha=0.85, label="register tokens")
    ax.set_yscale("log")
    ax.axvline(theta, color="#c44e52", ls="--", lw=1.8, label=f"current theta {theta:g}")
    if suggestion is not None:
        if suggestion.bimodal:
            ax.axvline(suggestion.theta, color="#2ca02c", lw=1.8,
                       label=f"suggested theta {suggestion.theta:.3g} (confidence {suggestion.confidence:.2f})")
        else:
            ax.axvline(suggestion.theta, color="#7f7f7f", lw=1.2, ls=":",
                       label=f"valley candidate {suggestion.theta:.3g}: NO bimodality")
    ax.set_xlabel(f"L2 norm of the last block's {sample.source} / sqrt(d)")
    ax.set_ylabel("tokens (log scale)")
    n_img, n_tok = sample.norms.shape
    ax.set_title(title or f"{sample.source} norms: {n_img} images x {n_tok} tokens", fontsize=10)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    return _save_fig(fig, Path(path), dpi)


ATT_PANEL = 200  # pixels per panel of the attention figure


def plot_attention(maps: AttentionMaps, path: str | os.PathLike, *, num_register_tokens: int,
                   grid: tuple[int, int], title: str = "") -> Path:
    """Paper Fig. 4: per image, the image, the original CLS attention, the ITAE one, and the artifacts.

    Each attention map shows the patch columns only (CLS and registers left out), on its own
    colour scale, as in the paper; the panel titles give the attention mass on the artifact tokens.
    """
    plt = _mpl()
    n = len(maps.paths)
    dpi = 100
    fig, axes = plt.subplots(n, 4, figsize=(4 * ATT_PANEL / dpi, n * ATT_PANEL / dpi), dpi=dpi, squeeze=False)
    R = num_register_tokens
    gh, gw = grid
    for i in range(n):
        mask = maps.artifact_mask[i]
        on_art = lambda a: float(a[1:][mask].sum())  # noqa: E731 - attention mass on the artifact columns
        a_orig = maps.original[i, 1 + R:].reshape(gh, gw)
        a_itae = maps.itae[i, 1 + R:].reshape(gh, gw)
        img = maps.images[i]
        ext = (0, img.shape[1], img.shape[0], 0)
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(maps.paths[i][-34:], fontsize=7)
        axes[i, 1].imshow(a_orig, cmap="inferno", interpolation="nearest")
        axes[i, 1].set_title(f"original (on artifacts {on_art(maps.original[i]):.2f})", fontsize=7)
        axes[i, 2].imshow(a_itae, cmap="inferno", interpolation="nearest")
        axes[i, 2].set_title(f"ITAE (on artifacts {on_art(maps.itae[i]):.2f})", fontsize=7)
        axes[i, 3].imshow(img, alpha=0.6)
        pm = mask[R:].reshape(gh, gw)
        overlay = np.zeros((gh, gw, 4), np.float32)
        overlay[pm] = (1.0, 0.0, 0.0, 0.75)
        axes[i, 3].imshow(overlay, extent=ext, interpolation="nearest")
        extra = f", {int(mask[:R].sum())} registers" if R else ""
        axes[i, 3].set_title(f"artifacts: {int(pm.sum())} patches{extra}", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (n * ATT_PANEL / dpi)) if title else None)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.1 / (n * ATT_PANEL / dpi))
    return _save_fig(fig, Path(path), dpi)




MAP_PANEL = (520, 480)  # pixels of one panel of the embedding map


def _colors(values: np.ndarray):
    """Stable colours per category: tab10/tab20, then hsv for many categories."""
    plt = _mpl()
    cats, codes = np.unique(values, return_inverse=True)
    n = len(cats)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    denom = 1 if n <= 20 else max(n, 1)
    return cats, np.asarray([cmap(c / denom if n > 20 else c) for c in codes.ravel()])


def plot_embedding_map(xy: np.ndarray, clusters: np.ndarray, path: str | os.PathLike, *, labels=None,
                       breakaway: np.ndarray | None = None, title: str | None = None) -> Path:
    """Scatter of a 2-D map coloured by cluster; with true labels, a second panel coloured by label,
    breakaway points (silhouette < 0 on the labels) drawn as black crosses."""
    plt = _mpl()
    dpi = 100
    panels = 2 if labels is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(panels * MAP_PANEL[0] / dpi, MAP_PANEL[1] / dpi), dpi=dpi,
                             squeeze=False)
    s = float(np.clip(2000 / max(len(xy), 1), 2, 30))
    cats, col = _colors(np.asarray(clusters))
    ax = axes[0, 0]
    ax.scatter(xy[:, 0], xy[:, 1], c=col, s=s, linewidths=0)
    if len(cats) <= 40:  # a label at each cluster's median position
        for c in cats:
            m = np.asarray(clusters) == c
            cx, cy = np.median(xy[m], axis=0)
            ax.annotate(str(c), (cx, cy), fontsize=8, ha="center", va="center", weight="bold",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.7))
    ax.set_title(f"coloured by cluster ({len(cats)} clusters)", fontsize=9)
    if labels is not None:
        lcats, lcol = _colors(np.asarray(labels))
        ax = axes[0, 1]
        ax.scatter(xy[:, 0], xy[:, 1], c=lcol, s=s, linewidths=0)
        if breakaway is not None and breakaway.any():
            ax.scatter(xy[breakaway, 0], xy[breakaway, 1], marker="x", c="black", s=max(s, 12), linewidths=0.8,
                       label=f"breakaway ({int(breakaway.sum())})")
            ax.legend(fontsize=8, loc="best")
        ax.set_title(f"coloured by true label ({len(lcats)} classes)", fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, Path(path), dpi)
