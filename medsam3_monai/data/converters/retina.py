"""Retinal vessel datasets: DRIVE, CHASE_DB1, STARE (label: first observer; vessels are one semantic target).

DRIVE official layout (ROOT may contain a ``DRIVE/`` folder)::

    training/images/NN_training.tif   training/1st_manual/NN_manual1.gif   training/mask/NN_training_mask.gif
    test/images/NN_test.tif           test/1st_manual/NN_manual1.gif       test/2nd_manual/  test/mask/

DRIVE shared-sample layout: ``images/NN_{training,test}.tif``, ``masks/NN_manual1.gif`` (+ ``fov/``,
``masks_2nd_observer/``, not used). The training half is split 85/15; the official test half is ``test``. Test
images of a release without ``test/1st_manual`` are left out as unlabelled (counted).

CHASE_DB1: one folder of ``Image_NN[LR].jpg`` with ``Image_NN[LR]_1stHO.png`` (``_2ndHO`` ignored).

STARE: ``imNNNN.ppm`` with ``imNNNN.ah.ppm`` (Hoover's labels; ``.vk`` ignored), in one folder or in
``stare-images/`` + ``labels-ah/``. STARE labels only 20 of its images: images without a label are counted as
unlabelled. Gzip'ed ``.ppm.gz`` files must be decompressed first.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..pairs import Conversion, DatalistError, Pair, Problem
from ._common import Converter, child, descend, listing, pair_by_name, require_dirs

DRIVE_LAYOUT = "training/{images,1st_manual}/ + test/{images,1st_manual}/ (official), or images/ + masks/ (sample)"
CHASE_LAYOUT = "one folder of Image_NN[LR].jpg + Image_NN[LR]_1stHO.png"
STARE_LAYOUT = "imNNNN.ppm + imNNNN.ah.ppm (one folder, or stare-images/ + labels-ah/)"
_DRIVE_IMAGE = re.compile(r"^(\d+)_(training|test)\.tif$", re.IGNORECASE)


def _drive_half(images: Path, manual: Path | None, half: str, result: Conversion) -> None:
    split = "test" if half == "test" else None
    for image in listing(images, (".tif", ".tiff")):
        match = _DRIVE_IMAGE.match(image.name)
        if not match or match.group(2).lower() != half:
            result.problems.append(Problem(image, f"unrecognised DRIVE {half} image name (expected NN_{half}.tif)"))
            continue
        if manual is None:
            result.unlabelled.append(Problem(image, "this DRIVE release has no test/1st_manual labels"))
            continue
        label = child(manual, f"{match.group(1)}_manual1.gif")
        if label is None:
            result.problems.append(Problem(image, f"no vessel mask {match.group(1)}_manual1.gif in {manual}"))
            continue
        result.pairs.append(Pair(image, label, image.stem, "DRIVE", split))


def convert_drive(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "DRIVE")
    result = Conversion()
    training, test = child(base, "training"), child(base, "test")
    if training is not None and training.is_dir():
        images, manual = require_dirs(root, DRIVE_LAYOUT, child(training, "images"), child(training, "1st_manual"))
        _drive_half(images, manual, "training", result)
        test_images = child(test, "images") if test is not None else None
        if test is not None and test_images is not None:
            _drive_half(test_images, child(test, "1st_manual"), "test", result)
        return result
    images, masks = require_dirs(root, DRIVE_LAYOUT, child(base, "images"), child(base, "masks"))
    numbered = pair_by_name(
        images, masks, "DRIVE", lambda s: (f"{s.split('_')[0]}_manual1",), (".tif", ".tiff"), (".gif",)
    )
    for pair in numbered.pairs:
        split = "test" if pair.case.lower().endswith("_test") else None
        result.pairs.append(Pair(pair.image, pair.label, pair.case, "DRIVE", split))
    result.problems.extend(numbered.problems)
    return result


def convert_chase(root: Path, entry, catalogue) -> Conversion:
    base = descend(root, "CHASEDB1", "CHASE_DB1")
    images = [p for p in listing(base, (".jpg",)) if p.name.lower().startswith("image_")]
    if not images:
        raise DatalistError(f"{root}: no Image_NN[LR].jpg found. Expected {CHASE_LAYOUT}")
    return pair_by_name(
        base, base, "CHASE_DB1", lambda s: (f"{s}_1stHO",), (".jpg",), (".png",),
        ignore_mask=lambda p: not p.stem.lower().endswith("_1stho"),
    )


def _stare_files(root: Path) -> list[Path]:
    folders = [root, *(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    return [f for folder in folders for f in listing(folder, (".ppm", ".ppm.gz"))]


def convert_stare(root: Path, entry, catalogue) -> Conversion:
    files = _stare_files(root)
    plain = {f for f in files if f.name.lower().endswith(".ppm")}
    # gzip-compressed without their plain file beside (gunzip -k keeps both): all, or a folder gunzip missed
    zipped = [f for f in files if f.name.lower().endswith(".gz") and f.with_suffix("") not in plain]
    if zipped:
        some = "" if not plain else f"{len(zipped)} of the "
        raise DatalistError(f"{zipped[0]}: {some}STARE files are gzip-compressed; run 'gunzip -r {root}' first")
    files = [f for f in files if f.name.lower().endswith(".ppm")]
    images = {f.name[:-4].lower(): f for f in files if re.fullmatch(r"im\d{4}\.ppm", f.name, re.IGNORECASE)}
    labels = {f.name[:-7].lower(): f for f in files if re.fullmatch(r"im\d{4}\.ah\.ppm", f.name, re.IGNORECASE)}
    if not images:
        raise DatalistError(f"{root}: no imNNNN.ppm found. Expected {STARE_LAYOUT}")
    result = Conversion()
    for case, image in sorted(images.items()):
        if case in labels:
            result.pairs.append(Pair(image, labels.pop(case), case, "STARE"))
        else:
            result.unlabelled.append(Problem(image, "no .ah vessel label (STARE labels 20 images)"))
    result.problems.extend(Problem(label, "label without image") for label in labels.values())
    return result


CONVERTERS = (
    Converter("DRIVE", convert_drive, DRIVE_LAYOUT),
    Converter("CHASE_DB1", convert_chase, CHASE_LAYOUT),
    Converter("STARE", convert_stare, STARE_LAYOUT),
)
