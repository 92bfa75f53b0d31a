"""Ultrasound test sets: HC18 (fetal head), TN3K and DDTI (thyroid nodules). All are external: every pair -> test.

HC18 (Zenodo release): ``training_set/NNN_[k]HC.png`` with ``NNN_[k]HC_Annotation.png`` (+ the pixel-size
CSV, ignored), ``test_set/NNN_[k]HC.png`` without annotations (counted as unlabelled). A flat folder of images
and annotations is also read. The annotation draws the head ellipse as an outline (``mask_encoding``
``outline``): fill it before use.

TN3K: ``{trainval,test}-image/NNNN.jpg`` with ``{trainval,test}-mask/NNNN.(jpg|png)``. File names repeat
across the two subsets, so the case is ``'<subset>/<name>'``.

DDTI: ``image/N.(png|PNG)`` with ``mask/N.(png|PNG)`` (the preprocessed release used by TRFE-Net and the
Medical-SAM3 evaluation; the original XML polygon release is not read).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..pairs import Conversion, DatalistError, Pair, Problem
from ._common import Converter, child, descend, listing, pair_by_name, require_dirs

HC18_LAYOUT = "training_set/NNN_HC.png + NNN_HC_Annotation.png (test_set/ is unlabelled), or one flat folder"
TN3K_LAYOUT = "{trainval,test}-image/NNNN.jpg + {trainval,test}-mask/NNNN.(jpg|png)"
DDTI_LAYOUT = "image/N.png + mask/N.png"
_HC_IMAGE = re.compile(r"^\d+_\d*HC\.png$", re.IGNORECASE)


def _hc18_folder(folder: Path, labelled: bool) -> Conversion:
    result = Conversion()
    files = listing(folder, (".png",))
    annotations = {p.name.lower(): p for p in files if p.stem.lower().endswith("_annotation")}
    for image in (p for p in files if _HC_IMAGE.match(p.name)):
        annotation = annotations.pop(f"{image.stem}_annotation.png".lower(), None)
        if annotation is not None:
            result.pairs.append(Pair(image, annotation, image.stem, "HC18"))
        elif labelled:
            result.problems.append(Problem(image, f"no annotation {image.stem}_Annotation.png"))
        else:
            result.unlabelled.append(Problem(image, "HC18 test_set images have no public annotation"))
    result.problems.extend(Problem(p, "annotation without image") for p in annotations.values())
    return result


def convert_hc18(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "HC18")
    training, test = child(base, "training_set"), child(base, "test_set")
    if training is None and test is None:
        if not any(_HC_IMAGE.match(p.name) for p in listing(base, (".png",))):
            raise DatalistError(f"{root}: no NNN_HC.png images. Expected {HC18_LAYOUT}")
        return _hc18_folder(base, labelled=True)
    result = Conversion()
    if training is not None:
        result.extend(_hc18_folder(training, labelled=True))
    if test is not None:
        result.extend(_hc18_folder(test, labelled=False))
    return result


def convert_tn3k(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "tn3k", "TN3K")
    result = Conversion()
    found = False
    for subset in ("trainval", "test"):
        images, masks = child(base, f"{subset}-image"), child(base, f"{subset}-mask")
        if images is None and masks is None:
            continue
        images, masks = require_dirs(root, TN3K_LAYOUT, images, masks)
        found = True
        result.extend(pair_by_name(images, masks, "TN3K", case_prefix=f"{subset}/"))
    if not found:
        raise DatalistError(f"{root}: no trainval-image/ or test-image/ folder. Expected {TN3K_LAYOUT}")
    return result


def convert_ddti(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "DDTI dataset", "DDTI")
    images, masks = require_dirs(root, DDTI_LAYOUT, child(base, "image"), child(base, "mask"))
    return pair_by_name(images, masks, "DDTI")


CONVERTERS = (
    Converter("HC18", convert_hc18, HC18_LAYOUT),
    Converter("TN3K", convert_tn3k, TN3K_LAYOUT),
    Converter("DDTI", convert_ddti, DDTI_LAYOUT),
)
