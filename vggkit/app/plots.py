"""The demo's figures: receptive-field growth, stacked 3x3 fields, heat-map overlays, feature-map grids
and the conv/FC parameter split. Each returns a matplotlib Figure and, given a path, saves it through
``vggkit.utils.plots.save_figure`` (atomically: the whole PNG under its name, or none).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..utils.plots import save_figure


def plot_receptive_field_growth(configs: Sequence[str] = ("A", "B", "C", "D", "E"),
                                path: str | os.PathLike | None = None) -> Figure:
    """Theoretical receptive field (input pixels) of every conv and pool layer against depth, one line per config."""
    from ..models.receptive_field import receptive_field

    figure = Figure(figsize=(6.4, 3.8))
    ax = figure.subplots()
    for config in configs:
        table = receptive_field(config)
        layers = [name for name in table if name.startswith(("conv", "pool"))]
        xs = np.arange(1, len(layers) + 1)
        ys = [table[name].receptive_field for name in layers]
        line, = ax.plot(xs, ys, marker=".", label=f"{config} ({sum(n.startswith('conv') for n in layers)} convs)")
        pools = [i for i, name in enumerate(layers) if name.startswith("pool")]
        ax.plot(xs[pools], np.asarray(ys)[pools], "s", color=line.get_color(), markersize=5)
        ax.annotate(f"{ys[-1]}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0),
                    fontsize=8, color=line.get_color(), va="center")
    ax.axhline(224, color="grey", linestyle=":", linewidth=1)
    ax.text(1, 226, "224 px training crop", fontsize=8, color="grey", va="bottom")
    ax.set_xlabel("layer (convs and pools in order; squares are max-pools)")
    ax.set_ylabel("receptive field (px)")
    ax.set_title("Receptive field growth with depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_stack_receptive_fields(depth: int, path: str | os.PathLike | None = None) -> Figure:
    """One row of pixels per layer: what ``depth`` stacked 3x3 convs see, next to one (2n+1)x(2n+1) conv.

    Each top unit's receptive field widens by 2 pixels per 3x3 layer; the single large
    conv reaches the same 2n+1 pixels in one step.
    """
    reach = 2 * depth + 1
    half = depth + 2  # draw two spare pixels either side of the receptive field
    # Equal aspect: size the figure to the drawing (x spans 2*half+5 cells, y depth+1.6 rows) plus the titles.
    figure = Figure(figsize=(9.0, 4.2 * (depth + 1.6) / (2 * half + 5) + 1.0))
    left, right = figure.subplots(1, 2, sharey=True)
    for ax, kernel_depths, title in (
        (left, [3] * depth, f"{depth} x conv3x3: {reach} px, {9 * depth}C² weights, {depth} ReLU"),
        (right, [reach], f"1 x conv{reach}x{reach}: {reach} px, {reach * reach}C² weights, 1 ReLU"),
    ):
        levels = len(kernel_depths)
        # Row r (0 = input) of the left diagram sees (levels - r) layers above it.
        widths = [1]
        for kernel in reversed(kernel_depths):
            widths.append(widths[-1] + kernel - 1)
        widths = widths[::-1]  # widths[r] = pixels of row r inside the top unit's receptive field
        for row in range(levels + 1):
            for x in range(-half, half + 1):
                inside = abs(x) <= widths[row] // 2
                y = row * (depth / levels)
                colour = "tab:orange" if row == levels else ("tab:blue" if inside else "white")
                if row == levels and x != 0:
                    colour = "white"
                ax.add_patch(_square(x, y, colour))
            label = "input" if row == 0 else f"layer {row}"
            ax.text(-half - 0.8, row * (depth / levels), label, ha="right", va="center", fontsize=8)
        for row in range(levels):
            y0, y1 = row * (depth / levels), (row + 1) * (depth / levels)
            for x in (-(widths[row] // 2), widths[row] // 2):
                ax.plot([x, 0 if row == levels - 1 else np.sign(x) * (widths[row + 1] // 2)],
                        [y0 + 0.35, y1 - 0.35], color="grey", linewidth=0.8)
        ax.set_xlim(-half - 4, half + 1)
        ax.set_ylim(-0.8, depth + 0.8)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=9)
    figure.suptitle("Receptive field of one output unit (blue: input pixels it sees)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def _square(x: float, y: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.42, y - 0.32), 0.84, 0.64, facecolor=colour, edgecolor="black", linewidth=0.6)


def plot_heatmap_overlay(image: np.ndarray, heat: np.ndarray, title: str, colorbar_label: str,
                         box: tuple[int, int, int, int] | None = None, cmap: str = "jet",
                         vmin: float | None = None, vmax: float | None = None,
                         path: str | os.PathLike | None = None) -> Figure:
    """A (H, W) map drawn over an (H, W, 3) uint8 image with a colour bar; ``box`` = (top, left, bottom, right).

    Each pixel's opacity grows with its value, so the photograph stays visible where the map is low.
    """
    if heat.shape != image.shape[:2]:
        raise ValueError(f"Heatmap {heat.shape} and image {image.shape[:2]} differ in size.")
    height, width = heat.shape
    figure = Figure(figsize=(5.2, 4.4 * height / max(width, 1) + 0.6))
    ax = figure.subplots()
    ax.imshow(image)
    low = float(heat.min()) if vmin is None else vmin
    high = float(heat.max()) if vmax is None else vmax
    opacity = 0.15 + 0.7 * np.clip((heat - low) / max(high - low, 1e-12), 0, 1)
    shown = ax.imshow(heat, cmap=cmap, alpha=opacity, vmin=low, vmax=high)
    colorbar = figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label(colorbar_label)
    if box is not None:
        from matplotlib.patches import Rectangle

        top, left, bottom, right = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                               edgecolor="white", linewidth=1.5, linestyle="--"))
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_feature_grid(maps: np.ndarray, labels: Sequence[str], title: str, columns: int = 4,
                      path: str | os.PathLike | None = None) -> Figure:
    """(K, h, w) activation maps as a grid, each scaled to its own maximum, with a label per map."""
    count = len(maps)
    if count != len(labels):
        raise ValueError(f"{count} maps but {len(labels)} labels.")
    rows = max(1, -(-count // columns))
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, activation, label in zip(axes.flat, maps, labels):
        ax.imshow(activation, cmap="viridis", vmin=0, vmax=max(float(activation.max()), 1e-12),
                  interpolation="nearest")
        ax.set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_parameter_split(split: dict[str, tuple[int, int]], path: str | os.PathLike | None = None) -> Figure:
    """Stacked bars of parameters per configuration: ``{config: (conv parameters, fully-connected parameters)}``."""
    names = list(split)
    conv = np.array([split[n][0] for n in names]) / 1e6
    dense = np.array([split[n][1] for n in names]) / 1e6
    figure = Figure(figsize=(6.0, 3.4))
    ax = figure.subplots()
    ax.bar(names, conv, label="conv layers", color="tab:blue")
    ax.bar(names, dense, bottom=conv, label="fc6, fc7, fc8", color="tab:orange")
    for x, (c, d) in enumerate(zip(conv, dense)):
        ax.text(x, c + d + 1, f"{c + d:.1f}M", ha="center", fontsize=8)
    ax.set_ylabel("parameters (millions)")
    ax.set_title("Where the parameters are (Table 2)")
    ax.set_ylim(0, (conv + dense).max() * 1.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    figure.tight_layout()
    return save_figure(figure, path)
