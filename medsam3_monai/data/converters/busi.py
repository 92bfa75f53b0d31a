"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020).

Official layout (``Dataset_BUSI_with_GT`` may be ROOT itself or its only child)::

    Dataset_BUSI_with_GT/benign/'benign (1).png', 'benign (1)_mask.png', ['benign (1)_mask_1.png' ...]
    Dataset_BUSI_with_GT/malignant/...   Dataset_BUSI_with_GT/normal/...

Shared-sample layout: ``images/'<class> (N).png'`` with ``masks/'<class> (N)_mask[_k].png'``.

Choices: several masks of one image (``_mask``, ``_mask_1``, ...) become one item whose ``label`` is the list of
mask paths, merged by union when loaded. ``normal`` images have empty masks and are kept (negatives). The
85/15 split is stratified by class so each class appears in both parts.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..pairs import Conversion, DatalistError, Pair, Problem
from ._common import Converter, child, descend, listing, require_dirs

CLASSES = ("benign", "malignant", "normal")
_IMAGE = re.compile(r"^(benign|malignant|normal) \((\d+)\)\.png$", re.IGNORECASE)
_MASK = re.compile(r"^((benign|malignant|normal) \(\d+\))_mask(?:_(\d+))?\.png$", re.IGNORECASE)
LAYOUT = (
    "Dataset_BUSI_with_GT/{benign,malignant,normal}/'<class> (N).png' + '<class> (N)_mask[_k].png', "
    "or images/ + masks/"
)


def _folders(root: Path) -> list[tuple[Path, Path]]:
    base = descend(root, "Dataset_BUSI_with_GT")
    found = {name: child(base, name) for name in CLASSES}
    class_dirs = [d for d in found.values() if d is not None and d.is_dir()]
    if len(class_dirs) == len(CLASSES):
        return [(d, d) for d in class_dirs]
    if class_dirs:
        missing = [name for name, d in found.items() if d is None or not d.is_dir()]
        raise DatalistError(f"{base}: has {', '.join(d.name + '/' for d in class_dirs)} but no "
                            f"{', '.join(name + '/' for name in missing)}: BUSI as published has all three class "
                            "folders (normal/: the negatives, which the papers score too); put the missing one back")
    images, masks = require_dirs(root, LAYOUT, child(base, "images"), child(base, "masks"))
    return [(images, masks)]


def convert(root: Path, entry, catalogue) -> Conversion:
    result = Conversion()
    images: dict[str, Path] = {}
    masks: dict[str, list[tuple[int, Path]]] = {}
    for image_dir, mask_dir in _folders(root):
        for path in listing(image_dir, (".png",)):
            if _MASK.match(path.name):
                continue
            if _IMAGE.match(path.name):
                images[path.stem] = path
            else:
                result.problems.append(Problem(path, "unrecognised BUSI file name (expected '<class> (N).png')"))
        for path in listing(mask_dir, (".png",)):
            match = _MASK.match(path.name)
            if match:
                masks.setdefault(match.group(1), []).append((int(match.group(3) or 0), path))
    for case, image in sorted(images.items()):
        found = [path for _, path in sorted(masks.pop(case, []))]
        if not found:
            result.problems.append(Problem(image, f"no mask '{case}_mask.png' found"))
            continue
        label = found[0] if len(found) == 1 else tuple(found)
        result.pairs.append(Pair(image, label, case, "BUSI", group=case.split(" ")[0].lower()))
    for case, found in sorted(masks.items()):
        result.problems.extend(Problem(path, f"mask without image '{case}.png'") for _, path in found)
    return result


CONVERTERS = (Converter("BUSI", convert, LAYOUT),)
