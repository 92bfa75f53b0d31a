"""Overlay pictures of a :class:`~medsam3_monai.inferers.predict.Prediction`: the input with each prompt's
pixels filled in its colour and outlined, box prompts dashed, and a legend ``prompt (score)``.

2D images: one panel at the image's own size. Volumes: a small montage of axial slices (the slicing of
``AxialSlicesd``: last axis) in the radiological convention (anterior up, the patient's right on the left): the slice where the prediction is largest and the slices at 1/4 and 3/4
of the predicted extent; with an empty prediction, the slices at 1/4, 1/2 and 3/4 of the depth. Drawn with
matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..metrics.plots import (class_areas, class_colour, class_legend, display_image, label_fill, radiological_view,
                             slice_plane, title_lines, view_aspect)

__all__ = ["DISPLAY_PIXELS", "montage_slices", "save_overlay"]

#: 2D pictures larger than this are drawn from a subsampled copy (the picture's own size in the figure is
#: unchanged: about 4 inches at 100 dpi, 400 pixels)
DISPLAY_PIXELS = 1_000_000


def montage_slices(labels: torch.Tensor, axis: int = 2, count: int = 3) -> list[int]:
    """Slice indices along ``axis`` of an (X, Y, Z) label map to show (see the module docstring)."""
    depth = int(labels.shape[axis])
    dims = [d for d in range(labels.ndim) if d != axis]
    area = (labels != 0).sum(dim=dims)
    if count <= 1 or depth <= 1:
        return [int(area.argmax()) if area.any() else depth // 2]
    if not area.any():
        picks = [depth * (i + 1) // (count + 1) for i in range(count)]
    else:
        best = int(area.argmax())
        present = torch.nonzero(area).flatten()
        low, high = int(present.min()), int(present.max())
        picks = [low + (high - low) // 4, best, low + 3 * (high - low) // 4]
    return sorted(set(picks))


#: most legend columns under a prediction overlay
LEGEND_COLUMNS = 4


def legend_below(figure: Any, handles: list, max_columns: int = LEGEND_COLUMNS) -> int:
    """Put ``handles`` in a legend centred under ``figure``'s panels, in as many columns (up to ``max_columns``) as
    fit its width, so that no entry is cut off at the edges; returns the columns used."""
    renderer = figure.canvas.get_renderer()
    for columns in range(min(len(handles), max_columns), 0, -1):
        legend = figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
        if columns == 1 or legend.get_window_extent(renderer).width <= figure.bbox.width:
            return columns
        legend.remove()
    return 1


def save_overlay(prediction: Any, path: str | Path, image: torch.Tensor | None = None, title: str | None = None,
                 max_slices: int = 3, image_format: str = "png") -> Path:
    """Draw ``prediction`` over its input and save the figure to ``path`` (``image_format``, default PNG).

    Args:
        prediction: a :class:`~medsam3_monai.inferers.predict.Prediction`.
        image: the input in [0, 1] at its own size ((C, H, W) or (1, X, Y, Z)); default: re-read from
            ``prediction.source`` with the prediction's intensity settings.
        max_slices: panels of a volume's montage.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from ..inferers.predict import native_image
    from ..transforms.slices import extract_slice

    labels = prediction.label_map.as_tensor() if hasattr(prediction.label_map, "as_tensor") else prediction.label_map
    labels = torch.as_tensor(labels).cpu()
    # a 2D picture is drawn from a display-sized copy (every stride-th pixel): the figure is a few inches at 100
    # dpi, and a full-size float copy of a large picture would cost ~150 bytes per pixel in matplotlib
    stride = 1 if prediction.is_volume else max(1, math.ceil(math.sqrt(labels.numel() / DISPLAY_PIXELS)))
    if image is None:
        settings = prediction.settings
        image = native_image(prediction.source, settings.get("modality"), settings.get("ct_window", "abdomen"),
                             settings.get("channel"), stride=stride)
    elif stride > 1:
        image = image[..., ::stride, ::stride]
    if stride > 1:
        labels = labels[::stride, ::stride]
    if prediction.is_volume:  # extract_slice(..., 2, True): rows along Y (axis 1), columns along X (axis 0)
        def view(plane: torch.Tensor) -> torch.Tensor:
            return radiological_view(plane, prediction.affine, row_axis=1, col_axis=0)

        plane = slice_plane(prediction.affine)
        panels = [(view(extract_slice(image, z, 2, True)), view(extract_slice(labels[None], z, 2, True)[0]),
                   f"slice {z} ({plane})") for z in montage_slices(labels, 2, max_slices)]
        aspect = view_aspect(prediction.affine, row_axis=1, col_axis=0)  # a pixel drawn at the voxel's size
    else:
        panels = [(image, labels, None)]
        aspect = 1.0
    height, width = panels[0][1].shape
    side = 4.0
    # a panel is drawn at its aspect within 0.5 .. 2 (a thin slab's sagittal slice is far wider than high)
    figure = Figure(figsize=(side * len(panels) * min(max(width / (height * aspect), 0.5), 2.0), side + 0.9),
                    dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    values = list(prediction.label_values)
    for ax, (plane, plane_labels, heading) in zip(axes, panels):
        array = plane_labels.numpy()
        ax.imshow(display_image(plane), interpolation="nearest", aspect=aspect)
        ax.imshow(label_fill(array, values), interpolation="nearest", aspect=aspect)
        for i, value in enumerate(values):
            if (array == value).any() and min(array.shape) > 1:
                ax.contour((array == value).astype(float), levels=[0.5], linewidths=0.8,
                           colors=[class_colour(i)])
        if not prediction.is_volume:
            for i, box in enumerate(prediction.settings.get("box") or []):
                if box is not None:
                    x1, y1, x2, y2 = (c / stride for c in box)
                    colour = class_colour(i) if len(prediction.settings["box"]) > 1 else "white"
                    # pixel-edge coordinates -> imshow's pixel-centre axes
                    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, linestyle="--",
                                           linewidth=1.0, edgecolor=colour))
        if heading:
            ax.set_title(heading, fontsize=9)
        ax.set_axis_off()
    counts = class_areas(values, labels)
    names = [f"{text} ({score:.2f})" + ("" if count else ", empty: nothing segmented")
             for text, score, count in zip(prediction.prompts, prediction.scores, counts)]
    handles = class_legend(names, counts, alpha=0.7)  # many prompts: the largest masks, then how many more
    columns = legend_below(figure, handles)
    heading = title or f"{Path(prediction.source).name}: {prediction.protocol}"
    lines = title_lines(heading, figure)
    figure.suptitle("\n".join(lines), fontsize=9)
    top = 0.985 - 0.035 * len(lines)  # room for the title's lines (0.95 for one)
    figure.tight_layout(rect=(0, 0.04 + 0.04 * math.ceil(len(handles) / columns), 1, top))  # room for the legend
    path = Path(path)
    figure.savefig(path, format=image_format)
    return path
