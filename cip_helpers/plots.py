"""Figures of the course (seaborn/matplotlib). Each function returns the figure; notebooks pass it
to :func:`save_figure`, which writes ``results/<profile>/figures/<name>.png`` and shows it."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from torch import Tensor

from .config import Profile



def save_figure(fig: plt.Figure, cfg: Profile, name: str) -> Path:
    """Save ``fig`` as ``<results>/figures/<name>.png`` (atomically) and return the path."""
    path = cfg.figures_dir / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, bbox_inches="tight", dpi=110)
    os.replace(tmp, path)
    return path


def image_grid(x: Tensor, titles: Sequence[str] | None = None, ncols: int = 10,
               title: str | None = None, size: float = 1.1) -> plt.Figure:
    """Show images (N, C, H, W) in [0, 1] in a grid, with optional per-image titles."""
    n = len(x)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = x[i].detach().cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1))
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                    keys: Sequence[str] = ("loss", "train_acc", "test_acc")) -> plt.Figure:
    """One panel per metric in ``keys``, one line per named run (e.g. victims ``all``/``half``)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(np.atleast_1d(axes), keys):
        for name, hist in histories.items():
            if hist and key in hist[0]:
                ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: Tensor, y_pred: Tensor, classes: Sequence[str],
                     title: str = "") -> plt.Figure:
    """Counts of (true, predicted) class pairs as an annotated heat map."""
    k = len(classes)
    cm = torch.bincount(y_true * k + y_pred, minlength=k * k).view(k, k).numpy()
    fig, ax = plt.subplots(figsize=(0.45 * k + 2, 0.4 * k + 1.5))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                xticklabels=classes, yticklabels=classes, annot_kws={"fontsize": 7})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def energy_histograms(energies: Mapping[str, Tensor], thresholds: tuple[float, float] | None = None,
                      ax: plt.Axes | None = None, title: str = "", bins: np.ndarray | None = None
                      ) -> plt.Axes:
    """Overlaid histograms (same bins, density) of energy scores per query set, with optional
    vertical lines at E1 and E2."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    if bins is None:
        allv = torch.cat([e.flatten() for e in energies.values()]).numpy()
        bins = np.linspace(np.percentile(allv, 0.5), np.percentile(allv, 99.5), 60)
    for name, e in energies.items():
        sns.histplot(np.clip(e.numpy(), bins[0], bins[-1]), bins=bins, stat="density", element="step",
                     fill=True, alpha=0.3, label=name, ax=ax)
    if thresholds is not None:
        for value, label, style in zip(thresholds, ("E1", "E2"), ("--", ":")):
            ax.axvline(value, color="k", linestyle=style, label=f"{label} = {value:.2f}")
    ax.set_xlabel("energy score E(x)   (higher = more OOD)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def probability_bars(rows: Mapping[str, Tensor], classes: Sequence[str], title: str = "",
                     ax: plt.Axes | None = None) -> plt.Axes:
    """Grouped bars of several probability vectors over the same classes (e.g. clean vs poisoned)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 2.6))
    k = len(classes)
    width = 0.8 / max(len(rows), 1)
    for i, (name, p) in enumerate(rows.items()):
        ax.bar(np.arange(k) + (i - (len(rows) - 1) / 2) * width, p.detach().cpu().numpy(), width,
               label=name)
    ax.set_xticks(np.arange(k), classes, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def threshold_explorer(logits_by_set: Mapping[str, Tensor], id_train_logits: Tensor, p1: float = 95.0,
                       p2: float = 99.9, temperature: float = 1.0):
    """Recompute E1/E2 from ID-training energies at percentiles (p1, p2) and temperature T, draw the
    energy histograms with both lines, and return ``(figure, routing table)``. The slider widgets of
    notebook 03 call exactly this function; a plain call renders the defaults."""
    import pandas as pd

    from .scores import energy_score, route_fractions, select_thresholds

    e1, e2 = select_thresholds(energy_score(id_train_logits, temperature), p1, p2)
    energy = {name: energy_score(lg, temperature) for name, lg in logits_by_set.items()}
    fig, ax = plt.subplots(figsize=(7, 3.4))
    energy_histograms(energy, (e1, e2), ax=ax, title=f"p1 = {p1}, p2 = {p2}, T = {temperature}")
    table = pd.DataFrame({name: route_fractions(e, e1, e2) for name, e in energy.items()}).T
    table.attrs.update({"E1": e1, "E2": e2})
    return fig, table


# --- defenses (notebooks 04-06) ------------------------------------------------------------


# --- attacks (notebooks 07-10) -------------------------------------------------------------
