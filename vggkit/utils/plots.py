"""Matplotlib figures used by the CLI, the app and reports.

Every function returns the ``Figure`` and, given ``path``, also writes it as a PNG.
Figures are built without pyplot, so nothing needs a display and nothing stays
registered in pyplot's global state (no figures leak in a long-running app).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_write
from .paths import display_name

SPLIT_PREFIXES = ("train_", "val_", "test_")


def save_figure(figure: Figure, path: str | os.PathLike | None) -> Figure:
    """Write ``figure`` to ``path`` (PNG unless the suffix names another format; parent folders created)
    when a path is given: atomically, so a full disk or a kill leaves the whole plot or none."""
    if path is not None:
        path = Path(path)
        # The temp file's name ends in .tmp<pid>: the format must come from the final name.
        fmt = path.suffix[1:].lower() or "png"
        atomic_write(path, lambda tmp: figure.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    return figure


def group_history(history: Sequence[dict], x_key: str = "epoch",
                  metrics: Sequence[str] | None = None) -> "OrderedDict[str, dict[str, tuple[list, list]]]":
    """Per-epoch dicts -> {metric: {split: (xs, ys)}}.

    ``train_loss``/``val_loss`` become the ``train`` and ``val`` lines of one ``loss``
    panel; a key without a split prefix (``lr``, ``seconds``) is a panel of its own.
    Non-numeric values and epochs lacking a key are left out.
    """
    panels: OrderedDict[str, dict[str, tuple[list, list]]] = OrderedDict()
    for index, row in enumerate(history, start=1):
        x = row.get(x_key, index)
        for key, value in row.items():
            if key == x_key or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            split = next((p[:-1] for p in SPLIT_PREFIXES if key.startswith(p)), "")
            metric = key[len(split) + 1:] if split else key
            if metrics is not None and metric not in metrics:
                continue
            xs, ys = panels.setdefault(metric, {}).setdefault(split or metric, ([], []))
            xs.append(x)
            ys.append(float(value))
    return panels


def plot_training_curves(history: Sequence[dict], path: str | os.PathLike | None = None,
                         metrics: Sequence[str] | None = None, x_key: str = "epoch",
                         title: str | None = None) -> Figure:
    """Training curves from a history: a list of per-epoch dicts such as
    ``{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "train_acc": 0.5, "val_acc": 0.6}``.

    One panel per metric (``metrics`` picks and orders them; default: all numeric keys),
    one line per split prefix (train/val/test).
    """
    panels = group_history(history, x_key=x_key, metrics=metrics)
    if metrics is not None:
        panels = OrderedDict((m, panels[m]) for m in metrics if m in panels)
    if not panels:
        raise ValueError("The history holds no numeric values to plot; expected a list of per-epoch dicts "
                         "like {'epoch': 1, 'train_loss': 0.7, 'val_acc': 0.6}.")
    figure = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], panels.items()):
        for split, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=split)
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_confusion_matrix(matrix: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | os.PathLike | None = None, normalize: bool = False,
                          title: str = "Confusion matrix") -> Figure:
    """A (classes, classes) confusion matrix, rows true and columns predicted, counts in the cells.

    ``normalize=True`` colours and labels each row by its fraction (per-class recall on the diagonal).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(f"Confusion matrix of shape {matrix.shape} does not match {len(class_names)} class names.")
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    class_names = [display_name(name) for name in class_names]  # folder names need not be valid UTF-8
    side = max(3.5, 0.45 * len(class_names) + 2)
    figure = Figure(figsize=(side + 1, side))
    ax = figure.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(class_names) <= 30:
        threshold = shown.max() / 2 if shown.size else 0
        for (row, col), value in np.ndenumerate(shown):
            text = f"{value:.2f}" if normalize else f"{int(matrix[row, col])}"
            ax.text(col, row, text, ha="center", va="center", fontsize=8,
                    color="white" if value > threshold else "black")
    figure.tight_layout()
    return save_figure(figure, path)
