"""What the case pipeline takes in: input kinds by path, datalist items for inference, prompts and box
prompts in pixels, and the input error inside MONAI's transform wrappers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..transforms.io import IMAGE_2D_SUFFIXES as IMAGE_SUFFIXES
from ..transforms.io import VOLUME_SUFFIXES

__all__ = ["box_prompts", "inference_items", "input_kind", "is_volume_path", "item_prompts", "user_error"]


def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def input_kind(path: str | Path) -> str:
    """``"image"`` (PNG/JPEG/BMP/TIFF/GIF) or ``"volume"`` (NIfTI, DICOM series folder, single DICOM, MetaImage,
    NRRD) by the path; raises FileNotFoundError / ValueError (unsupported format) with what to do."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} not found: give an existing image file, volume or DICOM folder")
    if path.is_dir():
        if not any(p.is_file() for p in path.iterdir()):
            raise ValueError(f"input folder {path} is empty: a folder input must hold one DICOM series")
        return "volume"
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VOLUME_SUFFIXES:
        return "volume"
    raise ValueError(
        f"{path}: unsupported format '{suffix or '(no extension)'}'. Give a 2D image "
        f"({', '.join(IMAGE_SUFFIXES)}), a volume ({', '.join(VOLUME_SUFFIXES)}) or a DICOM series folder"
    )


def user_error(err: BaseException) -> BaseException | None:
    """The input error (ValueError, FileNotFoundError) inside MONAI's ``RuntimeError("applying transform ...")``
    wrappers, or None when ``err`` is something else (a bug)."""
    seen = err
    while isinstance(seen, RuntimeError) and seen.__cause__ is not None:
        seen = seen.__cause__
    return seen if isinstance(seen, (ValueError, FileNotFoundError)) else None


def inference_items(
    datalist: str | Path | Sequence[Any] | Mapping[str, Any],
    prompts: Sequence[str] | Mapping[Any, str] | str | None = None,
    split: str = "test",
    base_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Datalist -> inference items ``{"image": absolute path, "prompts": {value: text}, ...}``.

    Args:
        datalist: a datalist JSON file (a list, or a decathlon-style dict: the ``split`` list is taken), a
            single image/volume path, or a list of items (dicts with ``image``) or of image paths.
        prompts: texts (list: label values 1..P) or ``{value: text}`` for every item, overriding the items' own
            ``prompts``; None keeps each item's ``prompts`` (an item without any is an error).
        split: the list of a decathlon-style datalist to predict.
        base_dir: folder of relative image paths (default: the datalist file's folder, else the working dir).
    """
    if isinstance(datalist, (str, Path)) and _suffix(datalist) != ".json":
        entries: Any = [str(datalist)]
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    elif isinstance(datalist, (str, Path)):
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {path} not found")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
        base = Path(base_dir) if base_dir is not None else path.parent
    else:
        entries = datalist
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(entries, Mapping):
        if split not in entries:
            raise ValueError(f"the datalist has no '{split}' list (it has {sorted(entries)}); choose --split")
        entries = entries[split]
    items = []
    for entry in entries:
        item = {"image": entry} if isinstance(entry, (str, Path)) else dict(entry)
        if "image" not in item:
            raise ValueError(f"datalist entry {entry!r} has no 'image'")
        item.pop("label", None)  # prediction needs no ground truth (evaluation items come from data.selection)
        image = Path(str(item["image"])).expanduser()
        item["image"] = str(image if image.is_absolute() else base / image)
        if prompts is not None:
            item["prompts"] = _prompt_mapping(prompts)
        elif not item.get("prompts"):
            raise ValueError(f"{item['image']}: no prompts; give --prompts \"['polyp']\" or 'prompts' in the item")
        items.append(item)
    if not items:
        raise ValueError("the datalist holds no items to predict")
    return items


def _prompt_mapping(prompts: Sequence[str] | Mapping[Any, str] | str) -> dict[str, str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Mapping):
        return {str(k): v for k, v in prompts.items()}
    return {str(i + 1): text for i, text in enumerate(prompts)}


def item_prompts(item: Mapping[str, Any], path: str | None = None) -> tuple[list[int], list[str]]:
    """(label values, texts) of an item's ``prompts``: ``{value: text}`` or a list (values 1..P)."""
    from ..networks.tokenizer import PromptError
    from ..transforms.labels import parse_prompts

    spec = item.get("prompts")
    if isinstance(spec, str):
        spec = [spec]
    if not spec:
        raise PromptError(f"{path or 'item'}: no text prompt given; give at least one, e.g. 'polyp'")
    if not isinstance(spec, Mapping):
        spec = _prompt_mapping(spec)
    parsed = parse_prompts(spec, path)
    return list(parsed), list(parsed.values())


def box_prompts(box: Any, num_prompts: int, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pixel boxes -> SAM3 box prompts (P, 1, 4) normalised cx, cy, w, h and labels (P, 1).

    Args:
        box: None, one box ``[x1, y1, x2, y2]`` for every prompt, or one per prompt (None entries: that prompt
            is text-only). Pixel coordinates of the input image, x along columns, y along rows, the image
            spanning ``[0, W] x [0, H]`` (pixel edges).
        size: the image's (H, W).

    Raises ValueError for a malformed box, an empty one, or one reaching outside the image. The slice space is
    the image resized to S x S without keeping the aspect ratio, so normalised coordinates carry over.
    """
    from ..boxes import BOX_PADDING_LABEL

    if box is None:
        return None
    boxes = list(box)
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes] * num_prompts
    if len(boxes) == 1 and num_prompts > 1:
        boxes = boxes * num_prompts
    if len(boxes) != num_prompts:
        raise ValueError(f"{len(boxes)} boxes for {num_prompts} prompts: give one box for all prompts or one per "
                         "prompt")
    height, width = (int(s) for s in size)
    out = torch.zeros(num_prompts, 1, 4)
    labels = torch.full((num_prompts, 1), BOX_PADDING_LABEL, dtype=torch.long)
    for i, one in enumerate(boxes):
        if one is None:
            continue
        values = [float(v) for v in one]
        if len(values) != 4 or not all(v == v and abs(v) != float("inf") for v in values):
            raise ValueError(f"box {one!r} must be four finite numbers x1 y1 x2 y2 (pixels)")
        x1, y1, x2, y2 = values
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(
                f"box {x1:g} {y1:g} {x2:g} {y2:g} is empty or outside the image ({width} wide, {height} high): "
                f"give x1 y1 x2 y2 in pixels with 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}"
            )
        out[i, 0] = torch.tensor([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width,
                                  (y2 - y1) / height])
        labels[i, 0] = 1
    return out, labels


def is_volume_path(path: str | Path) -> bool:
    """A DICOM folder or any file that is not a 2D picture (NIfTI, DICOM, MHA, NRRD, ...)."""
    return Path(path).is_dir() or _suffix(path) not in IMAGE_SUFFIXES
