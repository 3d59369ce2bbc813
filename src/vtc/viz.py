"""Token maps: the image with every patch coloured by what happened to it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .methods.base import Origin, Selection

# kept for visual salience / recovered by text / merged into another token / dropped
COLOURS = {"kept": (40, 200, 60), "recovered": (230, 30, 200), "merged": (40, 110, 240), "dropped": (20, 20, 20)}


def patch_labels(selection: Selection) -> list[str]:
    """For every patch: 'kept', 'recovered', 'merged' or 'dropped', from the Selection's owner map."""
    labels = []
    for owner in selection.owner.tolist():
        if owner < 0:
            labels.append("dropped")
        else:
            labels.append(Origin(int(selection.origin[owner])).name.lower())
    return labels


def token_map(image: Image.Image, selection: Selection, grid: tuple[int, int], size: int = 224, alpha: float = 0.55) -> Image.Image:
    """The image resized to ``size`` with each patch tinted by its label (dropped patches darkened)."""
    base = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
    h, w = grid
    ys = np.minimum(np.arange(size) * h // size, h - 1)
    xs = np.minimum(np.arange(size) * w // size, w - 1)
    labels = np.array(patch_labels(selection)).reshape(h, w)[ys][:, xs]
    out = base.copy()
    for name, colour in COLOURS.items():
        mask = labels == name
        a = 0.75 if name == "dropped" else alpha
        out[mask] = (1 - a) * base[mask] + a * np.array(colour, dtype=np.float32)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def panel_map(image: Image.Image, labels: list[str], boxes, size: int = 224, alpha: float = 0.55) -> Image.Image:
    """The image resized to ``size`` with each token's box (fractions x0 y0 x1 y1 of the picture) tinted by its
    label; a pixel belongs to the box holding its top-left corner (as ``token_map`` assigns pixels to cells)."""
    base = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
    edges = np.asarray(boxes, dtype=np.float64) * size
    out = base.copy()
    corner = np.arange(size) + 1e-9  # the nudge keeps a corner on a box edge inside the box it starts
    for label, (x0, y0, x1, y1) in zip(labels, edges):
        rows = (corner >= y0) & (corner < y1)
        cols = (corner >= x0) & (corner < x1)
        a = 0.75 if label == "dropped" else alpha
        block = np.ix_(rows, cols)
        out[block] = (1 - a) * base[block] + a * np.array(COLOURS[label], dtype=np.float32)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def layout_token_map(image: Image.Image, selection: Selection, panels, size: int = 224, gap: int = 6) -> Image.Image:
    """Token maps of every view of an image side by side (a family adapter's ``map_panels``: LLaVA-NeXT draws
    the base crop, then the tiles at their place in the picture)."""
    labels = np.array(patch_labels(selection))
    maps = [panel_map(image, labels[index.numpy()].tolist(), boxes.numpy(), size) for _, index, boxes in panels]
    sheet = Image.new("RGB", (len(maps) * size + (len(maps) - 1) * gap, size), (255, 255, 255))
    for i, picture in enumerate(maps):
        sheet.paste(picture, (i * (size + gap), 0))
    return sheet


def token_map_figure(rows: list[tuple[str, Image.Image, list[tuple[str, Image.Image]]]], path) -> None:
    """A grid of token maps: one row per question (original image first), one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = 1 + max(len(maps) for _, _, maps in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.9 * len(rows)), squeeze=False)
    for r, (title, image, maps) in enumerate(rows):
        panels = [("image", image)] + maps
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(panels):
                name, picture = panels[c]
                ax.imshow(picture)
                ax.set_title(name, fontsize=8)
        axes[r][0].text(0, -0.12, title, transform=axes[r][0].transAxes, fontsize=8, va="top")
    handles = [Patch(color=np.array(c) / 255, label=n) for n, c in COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
