"""Readers for three shared-sample folders kept in their sources' own layouts.

GBM40_HE_nuclei: ``images/NN.tif`` (512x512 RGB) with ``masks/NN_instances.png`` (uint16 instance ids;
``NN_binary.png`` is ignored). Instance rule ``instance_ids``.

ISBI2012_EM_membrane: ``images/N.png`` with ``masks/N.png`` (255 = cell interior, 0 = membrane). The official
challenge files are multi-page TIFFs (``train-volume.tif``, ``train-labels.tif``): split them into pages first.

ChestXray_lung_sample: ``images/N.jpg`` with ``masks/N-mask.png``, paired by ``idx.csv`` (columns ``img,mask``)
when present, else by name.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..pairs import Conversion, DatalistError, Pair, Problem
from ._common import Converter, child, listing, pair_by_name, require_dirs

GBM40_LAYOUT = "images/NN.tif + masks/NN_instances.png"
ISBI_LAYOUT = "images/N.png + masks/N.png"
CHEST_LAYOUT = "images/N.jpg + masks/N-mask.png (+ idx.csv)"


def convert_gbm40(root: Path, entry, catalogue) -> Conversion:
    images, masks = require_dirs(root, GBM40_LAYOUT, child(root, "images"), child(root, "masks"))
    return pair_by_name(
        images, masks, "GBM40_HE_nuclei", lambda s: (f"{s}_instances",), (".tif", ".tiff"), (".png",),
        ignore_mask=lambda p: p.stem.endswith("_binary"),
    )


def convert_isbi(root: Path, entry, catalogue) -> Conversion:
    if child(root, "images") is None and child(root, "train-volume.tif") is not None:
        raise DatalistError(
            f"{root}: multi-page TIFF layout; split train-volume.tif/train-labels.tif into images/ + masks/ first"
        )
    images, masks = require_dirs(root, ISBI_LAYOUT, child(root, "images"), child(root, "masks"))
    suffixes = (".png", ".tif")
    return pair_by_name(images, masks, "ISBI2012_EM_membrane", image_suffixes=suffixes, mask_suffixes=suffixes)


def convert_chest(root: Path, entry, catalogue) -> Conversion:
    images, masks = require_dirs(root, CHEST_LAYOUT, child(root, "images"), child(root, "masks"))
    index = child(root, "idx.csv")
    if index is None:
        return pair_by_name(images, masks, "ChestXray_lung_sample", lambda s: (f"{s}-mask",))
    result = Conversion()
    with index.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"img", "mask"} <= set(rows[0]):
        raise DatalistError(f"{index}: expected a CSV with columns 'img,mask'")
    for row in rows:
        image, mask = images / row["img"], masks / row["mask"]
        if not image.is_file():
            result.problems.append(Problem(index, f"lists missing image {image.name}"))
        elif not mask.is_file():
            result.problems.append(Problem(image, f"idx.csv names missing mask {mask.name}"))
        else:
            result.pairs.append(Pair(image, mask, image.stem, "ChestXray_lung_sample"))
    listed = {row["img"] for row in rows}
    result.problems.extend(Problem(p, "image not listed in idx.csv") for p in listing(images) if p.name not in listed)
    return result


CONVERTERS = (
    Converter("GBM40_HE_nuclei", convert_gbm40, GBM40_LAYOUT),
    Converter("ISBI2012_EM_membrane", convert_isbi, ISBI_LAYOUT),
    Converter("ChestXray_lung_sample", convert_chest, CHEST_LAYOUT),
)
