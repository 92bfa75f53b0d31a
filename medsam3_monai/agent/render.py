"""Pictures for the planner: the input with the marks drawn as coloured, numbered masks, and PNG data URLs.

* 2D: the picture at its own aspect ratio, its longest side scaled to between 384 px and ``view_size``.
* Volumes: a montage of representative slices along the third axis (axial, or sagittal / coronal for a volume stored
  so: :attr:`View.plane`) in the radiological convention of their plane (axial: anterior up, the patient's right on
  the left), as the overlays of ``medsam3 segment`` show them (:func:`~medsam3_monai.deploy.overlay.
  montage_slices`: the slice where the marks are largest and the slices at 1/4 and 3/4 of their extent; with no
  marks, 1/4, 1/2 and 3/4 of the depth), each panel captioned with its slice index.

Each mark is filled in its colour (``metrics.plots.class_colour``, by mark number), outlined, and labelled with
its number in a box of its colour at its most interior point; a legend strip under the picture lists
``number: phrase (score)``. ``examine`` shows one mark zoomed: the region without and with the mark, side by side.
Pictures travel as PNG or, when smaller (photographs), JPEG data URLs.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Sequence

__all__ = ["View", "data_url"]

MIN_SIDE = 384
FILL_ALPHA = 0.4


def data_url(picture: Any) -> str:
    """A PIL image -> ``data:image/png;base64,...`` or, when smaller (photographs), ``data:image/jpeg;base64,...``
    (quality 90)."""
    encoded = {}
    for kind, options in (("png", {"format": "PNG", "optimize": True}), ("jpeg", {"format": "JPEG", "quality": 90})):
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, **options)
        encoded[kind] = buffer.getvalue()
    kind = min(encoded, key=lambda k: len(encoded[k]))
    return f"data:image/{kind};base64," + base64.b64encode(encoded[kind]).decode("ascii")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _rgb(colour: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    return ImageColor.getrgb(colour)[:3]


def _colour(number: int) -> tuple[int, int, int]:
    from ..metrics.plots import class_colour

    return _rgb(class_colour(number - 1))


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads on ``colour``."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


class View:
    """The input as the planner sees it.

    Args:
        image: the input in [0, 1] at its own size: (C, H, W) for a picture, (1, X, Y, Z) for a volume.
        affine: the volume's 4 x 4 voxel -> world (RAS) matrix (volumes only).
        is_volume: volume or picture.
        view_size: the longest side of a picture sent to the planner (a volume's montage: of each panel x 2).
    """

    def __init__(self, image: Any, affine: Any = None, is_volume: bool = False, view_size: int = 768) -> None:
        import torch

        self.image = torch.as_tensor(image).float().cpu()
        self.affine = None if affine is None else torch.as_tensor(affine, dtype=torch.float64).cpu()
        self.is_volume = bool(is_volume)
        self.view_size = int(view_size)
        if self.view_size < 64:
            raise ValueError(f"view size must be >= 64 px, got {view_size}")

    @classmethod
    def load(cls, path: str, modality: str | None = None, ct_window: Any = None, channel: int | None = None,
             is_volume: bool = False, view_size: int = 768, max_pixels: Any = None) -> View:
        """Read the input with the model's intensity rule (as ``medsam3 segment``'s overlays do; ``ct_window`` None:
        the default, abdomen); ``max_pixels``: the 2D size limit, as the predictor's
        (``transforms.io.check_picture_size``)."""
        import torch

        from ..inferers.trained_settings import DEFAULT_CT_WINDOW
        from ..transforms import LoadMedicalImaged, ScaleIntensityByModalityd

        ct_window = DEFAULT_CT_WINDOW if ct_window is None else ct_window

        load = LoadMedicalImaged(keys="image", label_keys=(), channel=channel, max_pixels=max_pixels)
        item = load({"image": str(path), "modality": modality})
        image = ScaleIntensityByModalityd(keys="image", ct_window=ct_window)(item)["image"]
        affine = getattr(image, "affine", None)
        plain = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return cls(plain, None if affine is None else torch.as_tensor(affine), is_volume, view_size)

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape of the input (and of every mark): (H, W) or (X, Y, Z)."""
        return tuple(int(s) for s in self.image.shape[1:])

    @property
    def plane(self) -> str:
        """The anatomical plane of a volume's slices (``metrics.plots.slice_plane``; ``axial`` without an affine)."""
        from ..metrics.plots import slice_plane

        return slice_plane(self.affine) if self.is_volume and self.affine is not None else "axial"

    @property
    def depth(self) -> int:
        return self.shape[-1] if self.is_volume else 1

    def slices_for(self, masks: Sequence[Any]) -> list[int]:
        """Representative slices of a volume for these masks (see the module docstring)."""
        import numpy as np
        import torch

        from ..deploy.overlay import montage_slices

        union = np.zeros(self.shape, dtype=np.uint8)
        for mask in masks:
            union |= np.asarray(mask, dtype=bool).astype(np.uint8)
        return montage_slices(torch.from_numpy(union), 2, 3)

    def _plane(self, array: Any, z: int) -> Any:
        """Slice ``z`` of a (C, X, Y, Z) tensor as shown: (C, rows, cols), radiological."""
        from ..metrics.plots import radiological_view
        from ..transforms.slices import extract_slice

        plane = extract_slice(array, z, 2, True)
        return radiological_view(plane, self.affine, row_axis=1, col_axis=0) if self.affine is not None else plane

    def _planes(self, masks: Sequence[Any], z: int | None) -> tuple[Any, list[Any]]:
        """(display RGB (h, w, 3) float, masks (h, w) bool) of the picture or of volume slice ``z``."""
        import numpy as np
        import torch

        from ..metrics.plots import display_image

        if not self.is_volume:
            return display_image(self.image), [np.asarray(m, dtype=bool) for m in masks]
        rgb = display_image(self._plane(self.image, z))
        planes = [self._plane(torch.from_numpy(np.asarray(m, dtype=np.uint8))[None], z)[0].numpy() > 0
                  for m in masks]
        return rgb, planes

    # ------------------------------------------------------------------------------------------ drawing
    def _scaled_size(self, height: int, width: int, longest: int) -> tuple[int, int]:
        side = max(height, width)
        target = min(max(side, MIN_SIDE), longest)
        scale = min(target / side, 8.0)
        return max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)

    def _panel(self, rgb: Any, layers: Sequence[tuple[int, Any]], size: tuple[int, int],
               crop: tuple[int, int, int, int] | None = None):
        """The image with ``layers`` ((number, mask) pairs) filled, outlined and numbered, resized to ``size``."""
        import numpy as np
        from PIL import Image, ImageDraw
        from scipy import ndimage

        height, width = size
        if crop is not None:
            r0, r1, c0, c1 = crop
            rgb = rgb[r0:r1, c0:c1]
            layers = [(n, m[r0:r1, c0:c1]) for n, m in layers]
        base = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).resize((width, height),
                                                                                            Image.BILINEAR)
        canvas = np.asarray(base, dtype=np.float32).copy()
        resized = []
        for number, mask in layers:
            small = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
            big = np.asarray(small.resize((width, height), Image.NEAREST)) > 0
            resized.append((number, big))
            colour = np.asarray(_colour(number), dtype=np.float32)
            canvas[big] = canvas[big] * (1 - FILL_ALPHA) + colour * FILL_ALPHA
        thick = max(height, width) >= 512
        for number, big in resized:
            if big.any():
                edge = big & ~ndimage.binary_erosion(big)
                if thick:
                    edge = ndimage.binary_dilation(edge)
                canvas[edge] = np.asarray(_colour(number), dtype=np.float32)
        picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        font = _font(max(12, min(height, width) // 24))
        placed: list[tuple[int, int, int, int]] = []
        for number, big in resized:
            if not big.any():
                continue
            distance = ndimage.distance_transform_edt(np.pad(big, 1))[1:-1, 1:-1]
            row, col = np.unravel_index(int(distance.argmax()), distance.shape)
            text = str(number)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            box_w, box_h = right - left + 6, bottom - top + 6
            x = int(min(max(col - box_w // 2, 0), width - box_w))
            y = int(min(max(row - box_h // 2, 0), height - box_h))
            for _ in range(8):  # step aside from labels already drawn
                if not any(x < b[2] and b[0] < x + box_w and y < b[3] and b[1] < y + box_h for b in placed):
                    break
                y = y + box_h if y + 2 * box_h <= height else max(y - box_h, 0)
            colour = _colour(number)
            draw.rectangle((x, y, x + box_w, y + box_h), fill=colour, outline=_ink(colour))
            draw.text((x + 3 - left, y + 3 - top), text, fill=_ink(colour), font=font)
            placed.append((x, y, x + box_w, y + box_h))
        return picture

    @staticmethod
    def _with_strips(panels: Sequence[Any], captions: Sequence[str | None], legend: Sequence[tuple[int, str]],
                     header: str | None = None):
        """Panels side by side, each with its caption, a header above and a legend (number, text) below."""
        from PIL import Image, ImageDraw

        font = _font(14)
        line = 20
        gap = 4
        width = sum(p.width for p in panels) + gap * (len(panels) - 1)
        height = max(p.height for p in panels)
        has_captions = any(captions)
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        rows: list[list[tuple[int, str]]] = [[]]
        used = 0
        for number, text in legend:  # wrap the legend entries to the width
            entry_w = probe.textlength(text, font=font) + 28
            if rows[-1] and used + entry_w > width:
                rows.append([])
                used = 0
            rows[-1].append((number, text))
            used += entry_w
        legend_h = line * len([r for r in rows if r]) + (6 if legend else 0)
        top = line + 4 if header else 0
        total_h = top + height + (line if has_captions else 0) + legend_h
        sheet = Image.new("RGB", (max(width, 64), total_h), (20, 20, 20))
        draw = ImageDraw.Draw(sheet)
        if header:
            draw.text((4, 3), header, fill=(235, 235, 235), font=font)
        x = 0
        for panel, caption in zip(panels, captions):
            sheet.paste(panel, (x, top))
            if caption:
                draw.text((x + 4, top + height + 3), caption, fill=(235, 235, 235), font=font)
            x += panel.width + gap
        y = top + height + (line if has_captions else 0) + 3
        for row in rows:
            x = 4
            for number, text in row:
                colour = _colour(number) if number > 0 else (128, 128, 128)
                draw.rectangle((x, y + 3, x + 14, y + 17), fill=colour)
                draw.text((x + 20, y + 2), text, fill=(235, 235, 235), font=font)
                x += int(probe.textlength(text, font=font)) + 28
            y += line
        return sheet

    def picture(self, marks: Sequence[Any], header: str | None = None):
        """The input with every mark drawn (numbered), with a legend ``number: phrase (score)``."""
        from ..metrics.plots import VIEW_CONVENTIONS

        legend = [(m.number, f"{m.number}: {m.phrase} ({m.score:.2f})" + (", empty" if m.empty else ""))
                  for m in marks]
        masks = [m.mask for m in marks]
        if not self.is_volume:
            rgb, planes = self._planes(masks, None)
            size = self._scaled_size(*rgb.shape[:2], self.view_size)
            panel = self._panel(rgb, [(m.number, p) for m, p in zip(marks, planes)], size)
            return self._with_strips([panel], [None], legend, header)
        panels, captions = [], []
        for z in self.slices_for(masks):
            rgb, planes = self._planes(masks, z)
            size = self._scaled_size(*rgb.shape[:2], max(self.view_size // 2, MIN_SIDE // 2))
            panels.append(self._panel(rgb, [(m.number, p) for m, p in zip(marks, planes)], size))
            captions.append(f"{self.plane} slice z={z} of 0-{self.depth - 1}")
        return self._with_strips(panels, captions, legend, header or f"{self.plane} slices: "
                                                                      f"{VIEW_CONVENTIONS[self.plane]}")

    def examine(self, mark: Any):
        """One mark zoomed: the region around it without and with the mark (volumes: on its largest slice)."""
        import numpy as np

        if self.is_volume:
            per_slice = np.asarray(mark.mask).reshape(-1, self.depth).sum(axis=0)
            z = int(per_slice.argmax())
            rgb, (plane,) = self._planes([mark.mask], z)
            caption = f"mark {mark.number} on {self.plane} slice z={z}"
        else:
            rgb, (plane,) = self._planes([mark.mask], None)
            caption = f"mark {mark.number}"
        height, width = plane.shape
        if plane.any():
            rows, cols = np.nonzero(plane)
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            margin_r = max((r1 - r0) // 2, height // 16, 2)
            margin_c = max((c1 - c0) // 2, width // 16, 2)
            crop = (max(r0 - margin_r, 0), min(r1 + margin_r, height), max(c0 - margin_c, 0),
                    min(c1 + margin_c, width))
        else:
            crop = (0, height, 0, width)
        size = self._scaled_size(crop[1] - crop[0], crop[3] - crop[2], max(self.view_size // 2, MIN_SIDE // 2))
        plain = self._panel(rgb, [], size, crop)
        marked = self._panel(rgb, [(mark.number, plane)], size, crop)
        legend = [(mark.number, f"{mark.number}: {mark.phrase} ({mark.score:.2f})")]
        return self._with_strips([plain, marked], ["without the mark", "with the mark"], legend, caption)
