"""What a converter returns: image/mask pairs found in a dataset folder, and what it had to leave out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Conversion", "DatalistError", "Pair", "Problem"]


class DatalistError(ValueError):
    """A dataset folder cannot be turned into a datalist; the message names the file and the problem."""


@dataclass(frozen=True)
class Pair:
    """One image with its mask(s).

    ``label`` is a tuple when several mask files belong to one image (BUSI ``_mask_1``): the loader merges
    them by union. ``split`` is ``"test"`` for an official test split, else ``None`` (85/15 pool).
    ``group`` is the stratum for the 85/15 split (e.g. BUSI class).
    """

    image: Path
    label: Path | tuple[Path, ...]
    case: str
    dataset: str
    split: str | None = None
    group: str | None = None

    @property
    def labels(self) -> tuple[Path, ...]:
        return self.label if isinstance(self.label, tuple) else (self.label,)


@dataclass(frozen=True)
class Problem:
    """A file left out of the datalist and why (bad input, or unlabelled by the dataset's design)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Conversion:
    """Converter output.

    ``problems`` are bad input (image without mask, mask without image, unreadable file): an error unless the
    caller asked to skip them. ``unlabelled`` are files the dataset publishes without labels (HC18 test_set,
    MSD imagesTs): always left out, always counted and reported. ``channels`` names the channels of
    multi-channel (4D) images.
    """

    pairs: list[Pair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unlabelled: list[Problem] = field(default_factory=list)
    #: index -> name of the images' channels when they have several (MSD ``dataset.json`` ``modality``: BraTS's
    #: FLAIR, T1w, t1gd, T2w): a datalist of them must say which one is segmented (its items' ``channel``)
    channels: dict[int, str] = field(default_factory=dict)

    def extend(self, other: Conversion) -> None:
        self.pairs.extend(other.pairs)
        self.problems.extend(other.problems)
        self.unlabelled.extend(other.unlabelled)
