"""Dermoscopy skin-lesion datasets: ISIC 2018 Task 1 and PH2 (binary lesion masks).

ISIC 2018 (ROOT holds the unpacked challenge archives)::

    ISIC2018_Task1-2_Training_Input/ISIC_NNNNNNN.jpg
    ISIC2018_Task1_Training_GroundTruth/ISIC_NNNNNNN_segmentation.png
    ISIC2018_Task1-2_{Validation,Test}_Input/...   ISIC2018_Task1_{Validation,Test}_GroundTruth/...

Training and Validation are pooled and split 85/15 (85/15 per dataset, official *test* splits kept: ``bundles/medsam3/docs/conventions.md``);
Test is ``test``; a Test_Input without its GroundTruth folder is counted as unlabelled. LICENSE/ATTRIBUTION
files inside the archives are ignored.

PH2 (external, all -> test): ``PH2Dataset/'PH2 Dataset images'/IMDNNN/IMDNNN_Dermoscopic_Image/IMDNNN.bmp`` with
``IMDNNN_lesion/IMDNNN_lesion.bmp`` (``IMDNNN_roi/`` ignored). ROOT may be any folder down to
``'PH2 Dataset images'`` itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..pairs import Conversion, DatalistError, Pair, Problem
from ._common import Converter, child, descend, listing, pair_by_name

ISIC_LAYOUT = "ISIC2018_Task1-2_{Training,Validation,Test}_Input/ + ISIC2018_Task1_{...}_GroundTruth/"
PH2_LAYOUT = (
    "PH2Dataset/'PH2 Dataset images'/IMDNNN/{IMDNNN_Dermoscopic_Image/IMDNNN.bmp, IMDNNN_lesion/IMDNNN_lesion.bmp}"
)


def convert_isic(root: Path, entry, catalogue) -> Conversion:
    result = Conversion()
    found = False
    for part in ("Training", "Validation", "Test"):
        images = child(root, f"ISIC2018_Task1-2_{part}_Input")
        if images is None:
            continue
        found = True
        images = descend(images, images.name)  # a zip unpacked into a folder of its own name: one level more
        masks = child(root, f"ISIC2018_Task1_{part}_GroundTruth")
        masks = None if masks is None else descend(masks, masks.name)
        split = "test" if part == "Test" else None
        if masks is None:
            if part != "Test":
                raise DatalistError(f"{root}: {images.name} has no ISIC2018_Task1_{part}_GroundTruth folder")
            reason = "ISIC 2018 test image without ground truth"
            result.unlabelled.extend(Problem(p, reason) for p in listing(images, (".jpg",)))
            continue
        part_result = pair_by_name(images, masks, "ISIC2018", lambda s: (f"{s}_segmentation",), (".jpg",), (".png",))
        result.pairs.extend(Pair(p.image, p.label, p.case, p.dataset, split) for p in part_result.pairs)
        result.problems.extend(part_result.problems)
    if not found:
        raise DatalistError(f"{root}: no ISIC2018_Task1-2_*_Input folder. Expected {ISIC_LAYOUT}")
    return result


def _ph2_images_dir(root: Path) -> Path:
    for folder in (root, descend(root, "PH2Dataset"), descend(descend(root, "PH2"), "PH2Dataset")):
        inner = child(folder, "PH2 Dataset images")
        if inner is not None and inner.is_dir():
            return inner
    if any(p.is_dir() and re.fullmatch(r"IMD\d+", p.name) for p in root.iterdir()):
        return root
    raise DatalistError(f"{root}: no 'PH2 Dataset images' folder or IMDNNN/ folders. Expected {PH2_LAYOUT}")


def convert_ph2(root: Path, entry, catalogue) -> Conversion:
    result = Conversion()
    folder = _ph2_images_dir(root)
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"IMD\d+", p.name)):
        case = case_dir.name
        image = case_dir / f"{case}_Dermoscopic_Image" / f"{case}.bmp"
        mask = case_dir / f"{case}_lesion" / f"{case}_lesion.bmp"
        if not image.is_file():
            result.problems.append(Problem(case_dir, f"missing {image.relative_to(case_dir)}"))
        elif not mask.is_file():
            result.problems.append(Problem(image, f"no lesion mask {mask.relative_to(case_dir)}"))
        else:
            result.pairs.append(Pair(image, mask, case, "PH2"))
    return result


CONVERTERS = (
    Converter("ISIC2018", convert_isic, ISIC_LAYOUT),
    Converter("PH2", convert_ph2, PH2_LAYOUT),
)
