"""Report figures: the per-dataset radar chart (Medical SAM3 Fig. 3) and case overlays (Fig. 4).

Figures are drawn with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``), so nothing
here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .aggregate import MetricTable

__all__ = ["AXIS_PLANES", "CLASS_COLOURS", "VIEW_CONVENTIONS", "axis_codes", "class_areas", "class_colour",
           "class_legend", "legend_classes", "overlay_figure", "plain_text", "radar_chart", "radiological_view",
           "save_figure", "slice_plane", "title_lines"]

#: fill colours of the first classes (:func:`class_colour` goes on): a colour-blind-friendly qualitative set
#: (Okabe-Ito), sky blue first: the one class of most overlays must stand out on grey scans and on the warm reds of
#: fundus, endoscopy and H&E pictures alike
CLASS_COLOURS = ("#56B4E9", "#E69F00", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
TRUTH_COLOUR = "#00FF00"
#: hue step between the colours after ``CLASS_COLOURS`` (the golden angle: each new hue falls in the widest gap)
_GOLDEN_ANGLE = 137.50776405003785 / 360.0


def class_colour(index: int) -> str:
    """Fill colour of the ``index``-th class (0-based): ``CLASS_COLOURS`` first, then hues a golden angle apart at
    four lightness and saturation levels in turn (hues 21 or 55 steps apart nearly meet; their levels differ), so
    that a many-class CT's classes do not repeat the first seven's (117 TotalSegmentator classes get 117 colours)."""
    import colorsys

    if index < len(CLASS_COLOURS):
        return CLASS_COLOURS[index]
    step = index - len(CLASS_COLOURS)
    lightness, saturation = ((0.55, 0.75), (0.38, 0.90), (0.72, 0.60), (0.47, 0.55))[step % 4]
    red, green, blue = colorsys.hls_to_rgb((0.08 + step * _GOLDEN_ANGLE) % 1.0, lightness, saturation)
    return "#{:02X}{:02X}{:02X}".format(*(round(255 * c) for c in (red, green, blue)))
#: an overlay's legend sits in its prediction panel up to this many classes, in a panel of its own beyond
LEGEND_INSIDE = 4
#: ... where it lists at most this many: the classes covering most of the picture, then "+ K more"
LEGEND_MAX = 12
_LABELS = {"dice": "Dice (%)", "iou": "IoU (%)", "nsd": "NSD (%)"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay ``figure`` out (inside ``rect``, figure fractions, when given) and write it to ``path`` (its folder made
    when missing); returns the path."""
    figure.tight_layout(rect=rect)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


#: characters of a 9-10 pt title that fit in an inch of figure width (with a margin)
TITLE_CHARS_PER_INCH = 13
_SERIES_COLOURS = ("#0072B2", "#D55E00", "#009E73")


def plain_text(text: Any) -> str:
    """``text`` as matplotlib draws it letter for letter: its dollar signs escaped, so that a prompt, a file,
    dataset or case name or a planner's phrase holding two of them is not read as mathtext (drawn as a formula, or
    failing the whole figure: ``$\\frac{x$``)."""
    return str(text).replace("$", r"\$")


def title_lines(text: str, figure: Any) -> list[str]:
    """``text`` wrapped to the width of ``figure`` (a title that would be clipped at its edges), each line
    :func:`plain_text`."""
    import textwrap

    width = max(30, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    return [plain_text(line) for line in textwrap.wrap(text, width)]


def radar_chart(
    table: MetricTable,
    path: str | Path,
    metrics: Sequence[str] = ("dice", "iou"),
    title: str | None = None,
    unit: str = "%",
) -> Path:
    """Per-dataset ``metrics`` (in %) on a polar chart, one axis per dataset, one closed line per metric; the legend
    under the chart, the title wrapped to its width; ``unit`` labels the value axis of the bars.

    A radar needs three axes: with one or two datasets the same values are drawn as horizontal bars (one group per
    dataset), which read where a polygon would be a point or a line.
    """
    rows = table.dataset_rows()
    names = [r["name"] for r in rows]
    if not names:
        raise ValueError("radar_chart needs at least one dataset row")
    metrics = [m for m in metrics if m in table.metrics]
    series = [(_LABELS.get(m, m), colour, [100.0 * r[m] if not math.isnan(r[m]) else 0.0 for r in rows])
              for colour, m in zip(_SERIES_COLOURS, metrics)]
    heading = title or "Per-dataset Dice and IoU"
    if table.protocol:
        heading += f" ({table.protocol})"
    if len(names) < 3:
        figure = _figure(6.5, 1.6 + 0.9 * len(names) * max(1, len(series)) ** 0.5)
        ax = figure.add_subplot(111)
        height = 0.8 / max(1, len(series))
        for k, (label, colour, values) in enumerate(series):
            places = [i + (k - (len(series) - 1) / 2) * height for i in range(len(names))]
            bars = ax.barh(places, values, height=height * 0.9, color=colour, label=label)
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=8)
        ax.set_yticks(range(len(names)), [plain_text(name) for name in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    else:
        figure = _figure(6.5, 6.5)
        ax = figure.add_subplot(111, projection="polar")
        angles = [2 * math.pi * i / len(names) for i in range(len(names))]
        for label, colour, values in series:
            ax.plot(angles + angles[:1], values + values[:1], color=colour, linewidth=2, marker="o", label=label)
            ax.fill(angles + angles[:1], values + values[:1], color=colour, alpha=0.12)
        ax.set_xticks(angles)
        ax.set_xticklabels([plain_text(name) for name in names], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_yticks([20, 40, 60, 80, 100])
        ax.tick_params(axis="y", labelsize=7)
    figure.legend(loc="lower center", ncol=max(1, len(series)), fontsize=8, frameon=False)
    lines = title_lines(heading, figure)
    figure.suptitle("\n".join(lines), fontsize=10)
    legend_room = 0.35 / figure.get_figheight()  # inches -> figure fractions
    return save_figure(figure, path, rect=(0, legend_room, 1, 1 - 0.3 * len(lines) / figure.get_figheight()))


#: the anatomical plane of the slices across an array axis, by the axis code of where that axis runs
AXIS_PLANES = {"S": "axial", "I": "axial", "L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal"}


def axis_codes(affine: Any) -> tuple[str, ...]:
    """Where each array axis runs (nibabel's axis codes of the voxel-to-world ``affine``: ``("R", "A", "S")``)."""
    import nibabel as nib

    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def slice_plane(affine: Any, axis: int = 2) -> str:
    """The anatomical plane of a volume's slices along array ``axis`` (default the third, the one volumes are sliced
    along), by where that axis runs (:data:`AXIS_PLANES`): ``axial`` (S or I), ``sagittal`` (L or R) or ``coronal``
    (A or P; an axis with no direction, None, counts as coronal)."""
    return AXIS_PLANES.get(axis_codes(affine)[axis], "coronal")


#: per plane, how :func:`radiological_view` shows its slices (the radiological convention), in words
VIEW_CONVENTIONS = {"axial": "anterior up, the patient's right on the left",
                    "sagittal": "the head up, anterior on the left",
                    "coronal": "the head up, the patient's right on the left"}
#: per plane, the world (RAS) directions that go up and to the right on screen (:data:`VIEW_CONVENTIONS`)
_SCREEN_DIRECTIONS = {"axial": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)),
                      "sagittal": ((0.0, 0.0, 1.0), (0.0, -1.0, 0.0)),
                      "coronal": ((0.0, 0.0, 1.0), (-1.0, 0.0, 0.0))}


def radiological_view(plane: torch.Tensor, affine: Any, row_axis: int, col_axis: int) -> torch.Tensor:
    """A slice ``(..., rows, cols)`` of a volume turned to the radiological convention of its plane
    (:func:`slice_plane` of the axis it is a slice along; :data:`VIEW_CONVENTIONS`): axial anterior at the top and
    the patient's right on the left of the picture; sagittal the head at the top and anterior on the left; coronal
    the head at the top and the patient's right on the left.

    Args:
        plane: the slice, rows along volume axis ``row_axis`` and columns along ``col_axis``.
        affine: the volume's (4, 4) voxel-to-world affine in RAS (MONAI's convention: +x right, +y anterior).
    """
    a = torch.as_tensor(np.asarray(affine, dtype=np.float64))[:3]
    up, right = (torch.tensor(d, dtype=torch.float64)
                 for d in _SCREEN_DIRECTIONS[slice_plane(affine, 3 - row_axis - col_axis)])
    rows, cols = a[:, row_axis], a[:, col_axis]
    if abs(float(rows @ up)) < abs(float(cols @ up)):  # the columns run up or down the screen: swap
        plane, rows, cols = plane.transpose(-1, -2), cols, rows
    if float(rows @ up) > 0:  # going down the picture must go against "up"
        plane = plane.flip(-2)
    if float(cols @ right) < 0:  # going right in the picture must go "right"
        plane = plane.flip(-1)
    return plane


def view_aspect(affine: Any, row_axis: int, col_axis: int) -> float:
    """The height / width of a pixel of a :func:`radiological_view` of a volume's slice (rows along ``row_axis``,
    columns along ``col_axis``): the voxel's in-plane sizes, swapped where the view turns the slice (matplotlib's
    ``imshow(aspect=...)``, so that a voxel is drawn at its size)."""
    a = torch.as_tensor(np.asarray(affine, dtype=np.float64))[:3]
    row_mm, col_mm = float(a[:, row_axis].norm()), float(a[:, col_axis].norm())
    turned = tuple(radiological_view(torch.zeros(2, 3), affine, row_axis, col_axis).shape) == (3, 2)
    return col_mm / row_mm if turned else row_mm / col_mm


def display_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) with C <= 4 (the first three channels shown) or (H, W), values in [0, 1] -> (H, W, 3) float."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    if array.ndim == 3 and array.shape[0] <= 4:
        array = np.moveaxis(array[:3], 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def label_fill(labels: np.ndarray, values: Sequence[int], alpha: float = 0.45) -> np.ndarray:
    """RGBA overlay of a label map: each value in its class colour (prompt order) at ``alpha``, background
    transparent."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*labels.shape, 4), dtype=float)
    for i, value in enumerate(values):
        rgba[labels == value] = to_rgba(class_colour(i), alpha=alpha)
    return rgba


def overlay_figure(
    image: torch.Tensor | np.ndarray,
    truth: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    path: str | Path,
    values: Sequence[int] = (1,),
    names: Sequence[str] | None = None,
    title: str | None = None,
    boxes: Sequence[Sequence[float] | None] | None = None,
    aspect: float = 1.0,
) -> Path:
    """Three panels: the image; the ground truth filled; the prediction filled with the truth's contour (and the
    box prompts, dashed in their class's colour, where the prediction was prompted with boxes). The class
    legend sits in the prediction panel for up to ``LEGEND_INSIDE`` classes (beside it when the panel is less than
    half as wide as it is high), else in a fourth panel beside it, which
    lists at most ``LEGEND_MAX`` (those covering most of truth and prediction here, and how many more there are).

    Args:
        image: the image in its own geometry, values in [0, 1] ((3, H, W), (1, H, W) or (H, W)).
        truth, pred: (H, W) label maps (prompt label values, 0 background).
        values: the label values to draw, in prompt order (colours follow this order); ``names`` their texts.
        boxes: per prompt, its box prompt ``[x1, y1, x2, y2]`` in pixels (pixel edges) or None.
        aspect: a pixel's height / width (a volume slice's voxel, :func:`view_aspect`).
    """
    from matplotlib.patches import Rectangle

    shown = display_image(image)
    truth = np.asarray(truth.cpu() if isinstance(truth, torch.Tensor) else truth)
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
    many = names is not None and len(values) > LEGEND_INSIDE
    figure = _figure(12.5 if many else 10.5, 3.8)
    panels = figure.subplots(1, 4, width_ratios=[1, 1, 1, 0.6]) if many else figure.subplots(1, 3)
    for ax, heading in zip(panels, ("image", "ground truth", "prediction (truth contour)")):
        ax.imshow(shown, interpolation="nearest", aspect=aspect)
        ax.set_title(heading, fontsize=9)
        ax.set_axis_off()
    panels[1].imshow(label_fill(truth, values), interpolation="nearest", aspect=aspect)
    panels[2].imshow(label_fill(pred, values), interpolation="nearest", aspect=aspect)
    for value in values:
        if (truth == value).any() and min(truth.shape) > 1:
            panels[2].contour((truth == value).astype(float), levels=[0.5], colors=TRUTH_COLOUR, linewidths=0.8)
    for i, box in enumerate(boxes or []):
        if box is not None:  # pixel-edge coordinates -> imshow's pixel-centre axes
            x1, y1, x2, y2 = (float(c) for c in box)
            for colour, width, style in (("black", 2.2, "-"), (class_colour(i), 1.2, "--")):
                # the class colour dashed over a dark edge: visible over the prediction's own fill too
                panels[2].add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, linestyle=style,
                                              linewidth=width, edgecolor=colour))
    if many:  # a legend panel of its own (for many classes, those largest on this picture)
        panels[3].set_axis_off()
        areas = class_areas(values, truth, pred) if len(values) > LEGEND_MAX else None
        panels[3].legend(handles=class_legend(names, areas), loc="center left", fontsize=7, frameon=False)
    elif names and truth.shape[-1] < 0.5 * truth.shape[-2] * aspect:  # a narrow panel: the legend beside it
        panels[2].legend(handles=class_legend(names), loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7,
                         frameon=False)
    elif names:
        panels[2].legend(handles=class_legend(names), loc="lower right", fontsize=7, framealpha=0.7)
    if title:
        figure.suptitle(plain_text(title), fontsize=10)
    return save_figure(figure, path)


def legend_classes(areas: Sequence[int], limit: int = LEGEND_MAX) -> list[int]:
    """The classes a legend lists, by index in prompt order: all up to ``limit``, else the ``limit`` largest
    (``areas``: each class's pixels on the picture; absent classes are left out)."""
    if len(areas) <= limit:
        return list(range(len(areas)))
    return sorted(sorted((i for i, area in enumerate(areas) if area), key=lambda i: -areas[i])[:limit])


def class_areas(values: Sequence[int], *label_maps: Any) -> list[int]:
    """Each label value's pixels, summed over ``label_maps`` (numpy arrays or tensors of label values), one pass
    over each map whatever the number of values (:func:`~.segmentation.label_areas`)."""
    from .segmentation import label_areas

    return [sum(counts) for counts in zip(*(label_areas(labels, values) for labels in label_maps))]


def class_legend(labels: Sequence[str], areas: Sequence[int] | None = None, alpha: float = 0.6) -> list:
    """A legend entry per class, class ``i`` in ``class_colour(i)``; with ``areas`` (each class's pixels on the
    picture), only the classes :func:`legend_classes` picks from them, then an entry counting the rest."""
    from matplotlib.patches import Patch

    chosen = list(range(len(labels))) if areas is None else legend_classes(areas)
    handles = [Patch(color=class_colour(i), alpha=alpha, label=plain_text(labels[i]))
               for i in chosen]
    rest = len(labels) - len(chosen)
    if rest:
        handles.append(Patch(color="none", label=f"+ {rest} more class{'es' if rest > 1 else ''} "
                                                 f"({len(labels)} in all)"))
    return handles
