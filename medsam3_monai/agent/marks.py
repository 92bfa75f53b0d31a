"""Marks: the numbered masks the planner sees and chooses from.

Every ``segment_phrase`` call adds one mark: the phrase's mask as ``medsam3 segment --prompt PHRASE`` makes it (the
same predictor, protocol and thresholds; for volumes the detector on every slice plus the tracker), in the input's
own geometry. Marks are numbered from 1 in the order they were made and keep their number for the whole run, so
``select_masks_and_return`` can name marks of earlier rounds. A mark's text description gives the planner what a
picture shows less precisely: its score, size, position and number of separate parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Mark", "describe_position", "union_of"]


def describe_position(cy: float, cx: float) -> str:
    """Picture position of a point given as fractions of the height and width (0 = top / left)."""
    rows = ("upper", "middle", "lower")[min(int(cy * 3), 2)]
    cols = ("left", "centre", "right")[min(int(cx * 3), 2)]
    return "centre" if (rows, cols) == ("middle", "centre") else f"{rows} {cols}"


@dataclass
class Mark:
    """One numbered mask.

    Attributes:
        number: 1-based, unique in a run.
        phrase: the text that produced it.
        round: the round (``segment_phrase`` call) that made it.
        mask: bool array in the input's geometry ((H, W) for a picture, (X, Y, Z) for a volume).
        score: the phrase's score (2D: the protocol's; volumes: the best slice score).
        prediction: the :class:`~medsam3_monai.inferers.predict.Prediction` it came from (for the outputs).
        is_volume: whether ``mask`` is a volume.
    """

    number: int
    phrase: str
    round: int
    mask: Any
    score: float
    prediction: Any = None
    is_volume: bool = False

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    def components(self) -> int:
        """Separate parts (8-connected in 2D, 26-connected in 3D)."""
        if self.empty:
            return 0
        import numpy as np
        from scipy import ndimage

        structure = np.ones((3,) * self.mask.ndim, dtype=bool)
        return int(ndimage.label(self.mask, structure=structure)[1])

    def facts(self) -> dict[str, Any]:
        """JSON-able summary (trace and tool results)."""
        import numpy as np

        unit = "voxels" if self.is_volume else "pixels"
        out: dict[str, Any] = {"mark": self.number, "phrase": self.phrase, "round": self.round,
                               "score": round(float(self.score), 4), unit: self.pixels,
                               "fraction": round(self.pixels / max(int(self.mask.size), 1), 6),
                               "components": self.components()}
        if self.empty:
            return out
        if self.is_volume:
            slices = np.flatnonzero(self.mask.reshape(-1, self.mask.shape[-1]).any(axis=0))
            per_slice = self.mask.reshape(-1, self.mask.shape[-1]).sum(axis=0)
            out.update(slices=[int(slices.min()), int(slices.max())], largest_slice=int(per_slice.argmax()),
                       depth=int(self.mask.shape[-1]))
        else:
            height, width = self.mask.shape
            rows, cols = np.nonzero(self.mask)
            cy, cx = float(rows.mean()) / height, float(cols.mean()) / width
            out.update(centre=[round(cx, 3), round(cy, 3)], position=describe_position(cy, cx),
                       box=[round(float(cols.min()) / width, 3), round(float(rows.min()) / height, 3),
                            round(float(cols.max() + 1) / width, 3), round(float(rows.max() + 1) / height, 3)])
        return out

    def describe(self, plane: str = "axial") -> str:
        """One line for the planner (``plane``: the anatomical plane of a volume's slices, ``View.plane``)."""
        facts = self.facts()
        head = f"mark {self.number}: {self.phrase!r} (round {self.round}), score {self.score:.3f}"
        if self.empty:
            return f"{head}, EMPTY: the phrase segmented nothing"
        share = 100.0 * facts["fraction"]
        parts = facts["components"]
        parts_text = "1 part" if parts == 1 else f"{parts} separate parts"
        if self.is_volume:
            low, high = facts["slices"]
            return (f"{head}, {share:.2f}% of the volume, {plane} slices {low}-{high} of 0-{facts['depth'] - 1} "
                    f"(largest at {facts['largest_slice']}), {parts_text}")
        x1, y1, x2, y2 = facts["box"]
        return (f"{head}, {share:.1f}% of the image, in the {facts['position']} (centre x {facts['centre'][0]:.2f}, "
                f"y {facts['centre'][1]:.2f}; box x {x1:.2f}-{x2:.2f}, y {y1:.2f}-{y2:.2f}), {parts_text}")


def union_of(marks: list[Mark]) -> Any:
    """The union of the marks' masks (bool array); at least one mark."""
    import numpy as np

    if not marks:
        raise ValueError("union_of needs at least one mark")
    return np.logical_or.reduce([m.mask for m in marks])
