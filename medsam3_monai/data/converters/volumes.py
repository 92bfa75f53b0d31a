"""3D NIfTI datasets: Medical Segmentation Decathlon tasks and the TotalSegmentator example fixtures.

MSD (any task; ROOT is the task folder, e.g. ``Task04_Hippocampus``)::

    dataset.json  {"name", "labels": {"0": "background", "1": ...}, "training": [{"image", "label"}], "test": [...]}
    imagesTr/<case>.nii.gz   labelsTr/<case>.nii.gz   imagesTs/<case>.nii.gz

Pairs come from ``dataset.json["training"]`` (85/15); ``"test"`` images have no labels and are counted as
unlabelled. The task is matched to its catalogue entry (``MSD_TaskNN_Name``) and dataset.json's labels must
equal the catalogue's (ids, and names for the catalogued tasks: a task named as another is refused). Without
dataset.json (the cropped hippocampus sample: ``images/<case>.nii.gz`` + ``masks/<case>.nii.gz``) the dataset must
be named, e.g. ``medsam3 datalist MSD_Task04_Hippocampus_cropped ROOT``, and 4D images' channels are counted from
their headers.

TotalSegmentator example (``tests/reference_files`` of the TotalSegmentator repository, or the shared sample's
``images/`` + ``masks/``): ``example_ct_sm.nii.gz`` with ``example_seg.nii.gz`` (CT, task ``total``) and
``example_mr_sm.nii.gz`` with ``example_seg_mr.nii.gz`` (MR, task ``total_mr``). The masks are model outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..catalogue import CatalogueError
from ..checks import nifti_channels
from ..pairs import Conversion, DatalistError, Pair, Problem
from ._common import Converter, child, listing, pair_by_name, stem

MSD_LAYOUT = ("TaskNN_Name/dataset.json + imagesTr/ + labelsTr/ (or, with a named MSD dataset, images/ + masks/ or "
              "imagesTr/ + labelsTr/ without dataset.json)")
TOTALSEG_LAYOUT = "images/example_{ct,mr}_sm.nii.gz + masks/example_seg{,_mr}.nii.gz (or one flat folder)"
_TOTALSEG_PAIRS = (
    ("example_ct_sm.nii.gz", "example_seg.nii.gz", "TotalSegmentator"),
    ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "TotalSegmentator_MRI"),
)


def _msd_entry(root: Path, meta: dict, entry, catalogue):
    if entry is not None:
        return entry
    for name in (f"MSD_{root.name}", root.name, f"MSD_{meta.get('name', '')}"):
        if name in catalogue:
            return catalogue.get(name)
    raise DatalistError(
        f"{root / 'dataset.json'}: MSD task {root.name!r} (name {meta.get('name')!r}) is not in the catalogue; "
        "add datasets_meta/datasets/MSD_<TaskNN_Name>.json or name the dataset explicitly"
    )


def _label_names(labels: dict) -> dict[str, str]:
    """``{"1": "Anterior", ...}`` -> ``{"1": "anterior", ...}`` (background left out): what two tasks' labels are
    compared by."""
    return {str(k): " ".join(str(v).split()).lower() for k, v in labels.items() if str(k) != "0"}


def _check_msd_labels(path: Path, meta: dict, entry, catalogue) -> None:
    """dataset.json's labels against the entry's: the ids, and for a catalogued MSD task the names too (most tasks
    share the ids {1} or {1, 2}: a folder converted under another task's name would take its prompts and
    modality)."""
    declared = _label_names(meta.get("labels", {}))
    expected = entry.raw.get("source_label_names")
    if set(declared) == set(entry.labels) and (not expected or declared == _label_names(expected)):
        return
    if not expected:
        raise DatalistError(
            f"{path}: label ids {sorted(declared)} differ from the catalogue entry {entry.name} "
            f"({sorted(entry.labels)}); update datasets_meta/datasets/{entry.name}.json"
        )
    matching = [name for name in catalogue.names() if name.startswith("MSD_")
                and _label_names(catalogue.get(name).raw.get("source_label_names") or {}) == declared]
    hint = (f"it is {' or '.join(matching)}: name that one" if matching else
            f"name the dataset it is, or, if it is {entry.name}, update datasets_meta/datasets/{entry.name}.json")
    raise DatalistError(
        f"{path}: this task's labels {declared} (dataset.json name {meta.get('name')!r}) are not {entry.name}'s "
        f"{_label_names(expected)}: the folder holds another MSD task; {hint} (its prompts and modality come from "
        "that entry), or leave the name out to match the task by its folder"
    )


def _header_channels(image: Path) -> dict[int, str]:
    """``{index: ""}`` (unnamed) for each channel of a 4D NIfTI image (read from its header), {} for a 3D one or an
    unreadable header (the datalist's own checks say why): the channels of MSD's 4D tasks (BrainTumour, Prostate)
    when no dataset.json names them."""
    header = nifti_channels(image)
    count = header[0] if header is not None else 1
    return {index: "" for index in range(count)} if count > 1 else {}


def convert_msd(root: Path, entry, catalogue) -> Conversion:
    meta_path = root / "dataset.json"
    tasks = [] if meta_path.is_file() else sorted(
        folder for folder in root.iterdir() if folder.is_dir() and (folder / "dataset.json").is_file()
        and folder.name.lower().startswith("task"))
    if len(tasks) == 1:  # the folder the task was unpacked into: read the task inside
        root, meta_path = tasks[0], tasks[0] / "dataset.json"
    if not meta_path.is_file():  # a named dataset: images/ + masks/ (the cropped sample), or imagesTr/ + labelsTr/
        images = child(root, "images") or child(root, "imagesTr")
        masks = child(root, "masks") or child(root, "labelsTr")
        if images is None or masks is None or entry is None:
            inside = f" It holds several tasks ({', '.join(t.name for t in tasks)}): give one." if tasks else ""
            raise DatalistError(f"{root}: no dataset.json. Expected {MSD_LAYOUT}.{inside}")
        suffixes = (".nii.gz", ".nii")
        result = pair_by_name(images, masks, entry.name, image_suffixes=suffixes, mask_suffixes=suffixes)
        if result.pairs:  # 4D images without a dataset.json to name their channels: the header's count
            result.channels = _header_channels(result.pairs[0].image)
        return result
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatalistError(f"{meta_path}: invalid JSON ({err})") from None
    try:
        entry = _msd_entry(root, meta, entry, catalogue)
    except CatalogueError as err:
        raise DatalistError(str(err)) from None
    _check_msd_labels(meta_path, meta, entry, catalogue)
    result = Conversion()
    modalities = meta.get("modality") or {}
    if isinstance(modalities, dict) and len(modalities) > 1:  # 4D images (BrainTumour, Prostate)
        result.channels = {int(index): str(name) for index, name in modalities.items()}
    for record in meta.get("training", []):
        image, label = root / record["image"], root / record["label"]
        if not image.is_file():
            result.problems.append(Problem(image, "listed in dataset.json 'training' but missing"))
        elif not label.is_file():
            result.problems.append(Problem(image, f"label {record['label']} listed in dataset.json is missing"))
        else:
            result.pairs.append(Pair(image, label, stem(image), entry.name))
    for record in meta.get("test", []):
        path = root / (record["image"] if isinstance(record, dict) else record)
        result.unlabelled.append(Problem(path, "MSD test images have no public labels"))
    return result


def convert_totalseg(root: Path, entry, catalogue) -> Conversion:
    images, masks = child(root, "images") or root, child(root, "masks") or root
    result = Conversion()
    for image_name, mask_name, dataset in _TOTALSEG_PAIRS:
        image, mask = child(images, image_name), child(masks, mask_name)
        if image is None:
            result.problems.append(Problem(images / image_name, "missing TotalSegmentator example image"))
        elif mask is None:
            result.problems.append(Problem(image, f"no mask {mask_name} in {masks}"))
        else:
            result.pairs.append(Pair(image, mask, stem(image), dataset))
    if not result.pairs:
        release = sorted(p.parent.name for p in root.glob("*/segmentations") if p.is_dir())
        hint = (f"; {root} looks like the full release ({len(release)} subject folder(s) such as {release[0]}/ with "
                "ct.nii.gz and segmentations/), which this converter does not read: merge each subject's masks into "
                "one label map and write the datalist yourself (README, \"Your own dataset\")" if release else "")
        raise DatalistError(f"{root}: no TotalSegmentator example pair found. Expected {TOTALSEG_LAYOUT}{hint}")
    known = {name for pair in _TOTALSEG_PAIRS for name in pair[:2]}
    for folder in {images, masks}:
        result.problems.extend(
            Problem(p, "unrecognised file (this converter reads only the example fixtures)")
            for p in listing(folder, (".nii.gz", ".nii")) if p.name not in known
        )
    return result


CONVERTERS = (
    Converter("MSD", convert_msd, MSD_LAYOUT),
    Converter("TotalSegmentator_example_CT_MR", convert_totalseg, TOTALSEG_LAYOUT),
)
