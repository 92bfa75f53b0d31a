"""Colonoscopy polyp datasets: Kvasir-SEG, CVC-ClinicDB, ETIS-Larib (binary masks, one item per frame).

Kvasir-SEG (ROOT may contain ``Kvasir-SEG/``): ``images/<id>.jpg`` with ``masks/<id>.jpg``; JPEG masks are
binarised > 127 when loaded; ``kavsir_bboxes.json`` is ignored. No official split: 85/15.

CVC-ClinicDB (external, all -> test): ``Original/N.tif`` with ``'Ground Truth'/N.tif`` (official), the same two
folders under ``PNG/`` or ``TIF/`` (Kaggle copy; PNG preferred), or ``images/`` + ``masks/`` with equal names.

ETIS-Larib (external, all -> test): ``ETIS-LaribPolypDB/N.tif`` with ``GroundTruth/pN.tif`` (official), or
``images/N.png`` + ``masks/N.png``.
"""

from __future__ import annotations

from pathlib import Path

from ..pairs import Conversion, DatalistError
from ._common import Converter, child, descend, listing, pair_by_name, require_dirs

KVASIR_LAYOUT = "Kvasir-SEG/images/<id>.jpg + Kvasir-SEG/masks/<id>.jpg"
CVC_LAYOUT = "Original/ + 'Ground Truth'/ (optionally under PNG/ or TIF/), or images/ + masks/"
ETIS_LAYOUT = "ETIS-LaribPolypDB/N.tif + GroundTruth/pN.tif, or images/ + masks/"


def convert_kvasir(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "Kvasir-SEG")
    images, masks = require_dirs(root, KVASIR_LAYOUT, child(base, "images"), child(base, "masks"))
    return pair_by_name(images, masks, "Kvasir-SEG")


def convert_cvc(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "CVC-ClinicDB")
    for folder in (child(base, "PNG"), child(base, "TIF"), base):
        if folder is None:
            continue
        for image_name, mask_name in (("Original", "Ground Truth"), ("images", "masks")):
            images, masks = child(folder, image_name), child(folder, mask_name)
            if images is not None and masks is not None and images.is_dir() and masks.is_dir():
                return pair_by_name(images, masks, "CVC-ClinicDB")
    raise DatalistError(f"{root}: not the expected layout. Expected {CVC_LAYOUT}")


def convert_etis(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "ETIS-Larib")
    for folder in (base, child(base, "ETIS-LaribPolypDB")):
        truth = child(folder, "GroundTruth") if folder is not None else None
        if folder is None or truth is None or not truth.is_dir():
            continue
        images = child(folder, "ETIS-LaribPolypDB")
        if images is None or not images.is_dir() or not listing(images):
            images = folder
        return pair_by_name(images, truth, "ETIS-Larib", lambda s: (f"p{s}",))
    images, masks = require_dirs(root, ETIS_LAYOUT, child(base, "images"), child(base, "masks"))
    return pair_by_name(images, masks, "ETIS-Larib")


CONVERTERS = (
    Converter("Kvasir-SEG", convert_kvasir, KVASIR_LAYOUT),
    Converter("CVC-ClinicDB", convert_cvc, CVC_LAYOUT),
    Converter("ETIS-Larib", convert_etis, ETIS_LAYOUT),
)
