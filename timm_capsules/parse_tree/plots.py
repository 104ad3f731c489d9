"""The pictures of ``python -m timm_capsules.parse_tree``: routing heat maps, part-whole trees and routing
entropy. Each function draws arrays the analysis (``parse_tree.analysis``) computed, into one PNG."""

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ['plot_heatmaps', 'plot_part_whole_tree', 'plot_entropy', 'DIGIT_COLOURS']

# the two digits of a DiverseMultiMNIST image: their colour in the input panel and their outline on heat maps
DIGIT_COLOURS = ('red', 'deepskyblue')


def _plt():
    import matplotlib

    matplotlib.use('Agg')  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    _plt().close(fig)
    return Path(path)


def plot_heatmaps(
    path,
    images: np.ndarray,
    heatmaps: Sequence[Sequence[np.ndarray]],
    panel_titles: Sequence[Sequence[str]],
    row_titles: Sequence[str],
    colour_label: str,
    masks: Optional[np.ndarray] = None,
    dpi: int = 100,
) -> Path:
    """One row per image: the input, then one heat map per entry of ``heatmaps[b]``, each with its own
    colour bar in the map's units (``colour_label``). Images (B, H, W) grey or (B, H, W, 3) in [0, 1]; heat
    maps (H, W), NaN where no capsule looks. With ``masks`` (B, 2, H, W) (each digit's pixels) the input shows
    the two digits in ``DIGIT_COLOURS`` and every heat map their outlines."""
    plt = _plt()
    B, K = len(images), max(len(row) for row in heatmaps)
    fig, axes = plt.subplots(B, K + 1, figsize=(3.6 * (K + 1), 3.3 * B), squeeze=False)
    cmap = plt.get_cmap('viridis').with_extremes(bad='lightgrey')  # grey: pixels no primary capsule sees
    for b in range(B):
        ax = axes[b, 0]
        if masks is not None and masks[b].max() > 0:
            first, second = masks[b, 0], masks[b, 1]
            colours = [np.array(plt.matplotlib.colors.to_rgb(c)) for c in DIGIT_COLOURS]
            ax.imshow((first[..., None] * colours[0] + second[..., None] * colours[1]).clip(0, 1))
        else:
            ax.imshow(images[b], cmap='gray' if images[b].ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(row_titles[b], fontsize=10)
        for k in range(K):
            ax = axes[b, k + 1]
            if k >= len(heatmaps[b]):
                ax.axis('off')
                continue
            heat = heatmaps[b][k]
            shown = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap)
            if masks is not None:
                for d, colour in enumerate(DIGIT_COLOURS):
                    if masks[b, d].max() > 0:
                        ax.contour(masks[b, d], levels=[0.3], colors=colour, linewidths=1.2)
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            bar.set_label(colour_label, fontsize=9)
            bar.ax.tick_params(labelsize=8)
            ax.set_title(panel_titles[b][k], fontsize=10)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_part_whole_tree(path, tree, title: str, dpi: int = 100) -> Path:
    """A ``PartWholeTree``: one column per capsule layer (primary on the left, class capsules on the right),
    a dot per kept capsule coloured by the class whose mass dominates it, and lines whose width is the
    routing mass flowing from parent to child."""
    plt = _plt()
    colours = plt.get_cmap('tab10')
    L = len(tree.nodes)
    rows = max(len(layer) for layer in tree.nodes)
    fig, ax = plt.subplots(figsize=(2.8 * L + 1.0, 0.62 * rows + 2.0))
    position = {
        (l, rank): (l, 1 - (rank + 0.5) / len(layer))
        for l, layer in enumerate(tree.nodes)
        for rank in range(len(layer))
    }
    largest = max((edge[3] for edge in tree.edges), default=1.0) or 1.0
    for l, child, parent, flow in tree.edges:
        (x0, y0), (x1, y1) = position[(l, child)], position[(l + 1, parent)]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color=colours(tree.nodes[l + 1][parent][1] % 10),
            alpha=0.55,
            lw=0.4 + 7 * flow / largest,
            solid_capstyle='round',
            zorder=1,
        )
    for l, layer in enumerate(tree.nodes):
        for rank, (label, owner, _) in enumerate(layer):
            x, y = position[(l, rank)]
            ax.scatter([x], [y], s=110, color=colours(owner % 10), zorder=3, edgecolors='k', linewidths=0.6)
            ax.annotate(label, (x, y), xytext=(0, 9), textcoords='offset points', ha='center', fontsize=9)
        ax.text(l, -0.07, tree.layer_names[l], ha='center', va='top', fontsize=10)
    handles = [
        plt.Line2D([], [], color=colours(k % 10), lw=4, label=f'class "{name}"') for k, name in enumerate(tree.classes)
    ]
    ax.legend(
        handles=handles, loc='lower center', bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=9, frameon=False
    )
    ax.set_xlim(-0.45, L - 0.55)
    ax.set_ylim(-0.16, 1.04)
    ax.axis('off')
    ax.set_title(title, fontsize=11, pad=28)
    return _save(fig, path, dpi)


def plot_entropy(path, table: np.ndarray, layer_titles: Sequence[str], dpi: int = 100) -> Path:
    """Normalised routing entropy over iterations, one panel per routing layer with its own y range
    (values near 1 differ in the third digit): the mean over images with its value, and a thin line per
    image. ``table`` (images, iterations, layers) from ``entropy_table``."""
    plt = _plt()
    B, T, L = table.shape
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 3.8), squeeze=False)
    iterations = np.arange(1, T + 1)
    for l, ax in enumerate(axes[0]):
        for b in range(B):
            ax.plot(iterations, table[b, :, l], color='tab:blue', alpha=0.25, lw=0.8)
        mean = table[:, :, l].mean(0)
        ax.plot(iterations, mean, color='tab:blue', marker='o', lw=2, label='mean over images')
        for t, value in zip(iterations, mean):
            ax.annotate(f'{value:.3f}', (t, value), xytext=(6, 6), textcoords='offset points', ha='left', fontsize=9)
        ax.axhline(1.0, color='grey', ls='--', lw=1, label='uniform routing')
        low = float(table[:, :, l].min())
        margin = max(0.1 * (1.0 - low), 0.005)
        ax.set_ylim(low - margin, 1.0 + margin)
        ax.set_xticks(iterations)
        ax.set_xlim(0.7, T + 0.3)
        ax.set_xlabel('routing iteration (1 = uniform pass)', fontsize=10)
        ax.set_title(layer_titles[l], fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[0, 0].set_ylabel('routing entropy / log(#parents)', fontsize=10)
    axes[0, 0].legend(fontsize=9, loc='lower left')
    fig.tight_layout()
    return _save(fig, path, dpi)
