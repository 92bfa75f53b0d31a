"""The cases an evaluation scores: each datalist's evaluation split, tagged with its group.

The default split is ``auto``: a datalist's ``test`` list when it has cases, else its ``validation`` list. Several
shared folders and most internal datasets have no official test split (external datasets are all ``test``),
so "test if present, else validation" is decided per datalist. ``all`` evaluates every split.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SPLIT_CHOICES", "evaluation_items", "is_volume_item", "volumes_without_modality"]

SPLIT_CHOICES = ("auto", "test", "validation", "training", "all")
_SPLITS = ("training", "validation", "test")


def _group_of(item: dict[str, Any]) -> str:
    if item.get("group"):
        return str(item["group"])
    from .catalogue import CatalogueError, get_dataset

    try:
        return get_dataset(str(item.get("dataset"))).role
    except (CatalogueError, FileNotFoundError):
        return "other"


def evaluation_items(
    datalists: str | Path | Sequence[str | Path],
    split: str = "auto",
    max_cases: int | None = None,
    check_files: bool = True,
    seed: int = 42,
) -> list[dict[str, Any]]:
    """The cases to evaluate, datalist by datalist, in file order.

    Args:
        datalists: one or several datalist JSON files (``medsam3 datalist``).
        split: ``auto`` (``test`` when that list is non-empty, else ``validation``, decided per datalist),
            ``test``, ``validation``, ``training`` or ``all`` (every split, in training/validation/test order).
        max_cases: keep at most this many cases **per datalist**: a sample drawn with ``seed`` (the same cases
            on every run of the same file: rows are drawn, so reordering the items changes it; kept in file order),
            not the first ones, which are often one patient or one class.
        check_files: fail early, naming them, when images or labels are missing.
        seed: seed of the ``max_cases`` sample.

    Every item gains ``group`` (its own, else the catalogue role of its dataset, else ``other``), ``split``
    and ``datalist``; one without ``case`` is named by its image's file name, one without ``dataset`` by its
    datalist's.

    Raises:
        FileNotFoundError: a datalist (or, with ``check_files``, an image/label) does not exist.
        ValueError: not a datalist, unknown split, or a selected split that is empty.
    """
    from .datalist import check_files_exist, items_of_split, read_datalist_json

    if split not in SPLIT_CHOICES:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLIT_CHOICES)}")
    if max_cases is not None and int(max_cases) < 1:
        raise ValueError(f"--max-cases (the bundle's max_cases) must be at least 1, got {max_cases}")
    paths = [datalists] if isinstance(datalists, (str, Path)) else list(datalists)
    if not paths:
        raise ValueError("no datalist given")
    items: list[dict[str, Any]] = []
    for path in map(Path, paths):
        raw = read_datalist_json(path)
        if not isinstance(raw, dict) or not any(isinstance(raw.get(s), list) for s in _SPLITS):
            raise ValueError(f"{path} is not a datalist: expected lists under 'training', 'validation', 'test'")
        counts = {s: len(raw.get(s) or []) for s in _SPLITS}
        if split == "auto":
            chosen = ["test"] if counts["test"] else ["validation"]
        elif split == "all":
            chosen = [s for s in _SPLITS if counts[s]]
        else:
            chosen = [split]
        found = []
        for name in chosen:
            if counts.get(name):
                found += [dict(item, split=name, datalist=str(path)) for item in items_of_split(raw, path, name)]
        if not found:
            wanted = "test or validation" if split == "auto" else split
            have = ", ".join(f"{s} {n}" for s, n in counts.items())
            other = sorted(key for key, value in raw.items() if key not in _SPLITS and isinstance(value, list))
            hint = (f"; its lists {other} are not splits (a datalist's splits are named training, validation, "
                    "test)" if other else "")
            raise ValueError(f"datalist {path} has no {wanted} cases ({have}){hint}; choose another --split")
        if max_cases and len(found) > int(max_cases):
            chosen_rows = sorted(random.Random(seed).sample(range(len(found)), int(max_cases)))
            found = [found[row] for row in chosen_rows]
        items += found
    seen: dict[str, int] = {}
    listed = Counter(os.path.abspath(item["image"]) for item in items)  # each repeated image is warned about once
    case_images: dict[tuple[str, str], str] = {}
    for number, item in enumerate(items):
        if not item.get("dataset"):  # the report's dataset row: the datalist's file name
            item["dataset"] = Path(item["datalist"]).name.removesuffix(".json")
        item["group"] = _group_of(item)
        if item.get("case") is None:  # the report's row and overlay name: the image's file name
            item["case"] = Path(item["image"]).name
        image = os.path.abspath(item["image"])
        first = seen.setdefault(image, number)
        times = listed.pop(image, 0) if first != number else 0  # at its second listing; 0 once warned
        if times == 2:
            earlier = items[first]
            where = (f"{earlier['datalist']} and {item['datalist']}" if earlier["datalist"] != item["datalist"]
                     else f"{item['datalist']}, twice")
            effect = (f"its case counts twice in {item['dataset']}'s mean" if earlier["dataset"] == item["dataset"]
                      else f"as {earlier['dataset']} and as {item['dataset']}: it counts in both datasets' means")
            warnings.warn(f"{item['image']} is evaluated twice (in {where}), {effect}", stacklevel=2)
        elif times > 2:
            where = ", ".join(sorted({str(other["datalist"]) for other in items
                                      if os.path.abspath(other["image"]) == image}))
            warnings.warn(f"{item['image']} is evaluated {times} times (in {where}): its case counts {times} times in "
                          "its dataset's mean (several annotators' masks of one image are several cases)",
                          stacklevel=2)
        named = case_images.setdefault((str(item["dataset"]), str(item["case"])), image)
        if named != image:
            warnings.warn(f"case {item['case']!r} of {item['dataset']} names two images ({named} and {item['image']}):"
                          " their rows in the report cannot be told apart; give each item its own 'case'",
                          stacklevel=2)
    unscaled = volumes_without_modality(items)
    if unscaled:
        warnings.warn(unscaled, stacklevel=2)
    if check_files:
        check_files_exist(items)
    return items


def is_volume_item(item: dict[str, Any]) -> bool:
    """Whether a datalist item's image is a volume (NIfTI, DICOM folder, MetaImage, ...), not a 2D picture
    (:func:`~medsam3_monai.transforms.io.is_picture_path`)."""
    from ..transforms.io import is_picture_path

    return not is_picture_path(str(item["image"]))


def volumes_without_modality(items: Sequence[dict[str, Any]], base_dir: str | Path | None = None) -> str | None:
    """What to say when volume files among ``items`` (not DICOM folders, whose header names their modality) have no
    ``modality``: they are then min-max scaled, not windowed (CT) or percentile-clipped (MRI) as the papers' inputs
    are; None when there are none. Relative paths are read from ``base_dir``."""
    missing = [str(item["image"]) for item in items if item.get("modality") in (None, "")
               and not Path(base_dir or ".", str(item["image"])).is_dir()
               and is_volume_item({"image": Path(base_dir or ".", str(item["image"]))})]
    if not missing:
        return None
    return (f"{len(missing)} volume item(s) have no 'modality' (e.g. {missing[0]}), so they are min-max scaled: "
            "give each its modality (\"CT\": the CT window of Hounsfield units; \"MRI\": a 0.5-99.5 percentile "
            "clip), as medsam3 datalist writes it")
