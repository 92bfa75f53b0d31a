"""What the case pipeline takes in: input kinds by path, datalist items for inference, prompts and box
prompts in pixels, and the input error inside MONAI's transform wrappers.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..transforms.io import IMAGE_2D_SUFFIXES as IMAGE_SUFFIXES
from ..transforms.io import DICOM_SUFFIXES, VOLUME_SUFFIXES, has_dicom_files, is_picture_path

__all__ = ["box_prompts", "check_distinct_prompts", "expand_inputs", "inference_items", "input_kind",
           "is_dicom_series", "is_volume_path", "item_prompts", "output_names", "output_stems", "user_error"]

GLOB_CHARACTERS = "*?["


def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def input_kind(path: str | Path) -> str:
    """``"image"`` (PNG/JPEG/BMP/TIFF/GIF/PPM, a single-frame DICOM file) or ``"volume"`` (NIfTI, DICOM series folder,
    multi-frame DICOM file, MetaImage, NRRD) by the path (:func:`~medsam3_monai.transforms.io.is_picture_path`);
    raises FileNotFoundError / ValueError (unsupported format) with what to do."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(f"input {path} is a symbolic link to {os.readlink(path)}, which does not exist "
                                    "(a dataset folder not mounted here, or moved): mount or restore it, or leave the "
                                    "input out")
        raise FileNotFoundError(f"input {path} not found: give an existing image file, volume or DICOM folder")
    if path.is_dir():
        if not any(p.is_file() for p in path.iterdir()):
            series = [p for p in sorted(path.iterdir()) if p.is_dir() and is_dicom_series(p)]
            if series:  # an export's PATIENT/STUDY/SERIES folders
                raise ValueError(f"input folder {path} holds no DICOM files itself but {len(series)} DICOM series "
                                 f"folder(s), e.g. {series[0]}: give a series folder, or segment each series in it "
                                 "with --out-dir DIR")
            what = "only folders, none a DICOM series" if any(path.iterdir()) else "nothing"
            raise ValueError(f"input folder {path} holds {what}: a folder input must hold one DICOM series")
        if not has_dicom_files(path):
            found = len(_folder_inputs(path))
            if found:
                raise ValueError(f"input folder {path} holds {found} image(s) or volume(s), not a DICOM series: "
                                 "segment them with --out-dir DIR (one mask per input)")
        return "volume"
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES + VOLUME_SUFFIXES:
        return "image" if is_picture_path(path) else "volume"
    raise ValueError(
        f"{path}: unsupported format '{suffix or '(no extension)'}'. Give a 2D image "
        f"({', '.join(IMAGE_SUFFIXES)}), a volume ({', '.join(VOLUME_SUFFIXES)}) or a DICOM series folder"
    )


def user_error(err: BaseException) -> BaseException | None:
    """The input error (ValueError, FileNotFoundError) inside MONAI's ``RuntimeError("applying transform ...")``
    wrappers, also when a DataLoader worker raised it (:func:`worker_input_error`), or None when ``err`` is something
    else (a bug)."""
    seen = err
    while isinstance(seen, RuntimeError) and seen.__cause__ is not None:
        seen = seen.__cause__
    if isinstance(seen, (ValueError, FileNotFoundError)) and not _from_worker(seen):
        return seen
    return worker_input_error(seen)


#: the first line torch's ``ExceptionWrapper.reraise`` gives an error a DataLoader worker raised
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")
#: a line of a traceback's text naming an exception and its message: ``package.module.Name: message``
_RAISED_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.MULTILINE)


def _from_worker(err: BaseException) -> bool:
    return bool(_WORKER_ERROR.match(str(err)))


def worker_input_error(err: BaseException) -> BaseException | None:
    """An input error a DataLoader worker raised, as the main process gets it: torch re-raises it as the worker's
    outermost exception class (MONAI's ``RuntimeError`` wrapper) with the worker's traceback as text, so the error
    itself is the first exception line of that text whose class is a ValueError or FileNotFoundError (the innermost
    cause: a chained traceback prints it first); it is returned as that class's base with its message (ValueError,
    FileNotFoundError). None when ``err`` is not a worker's error or holds no input error (a bug)."""
    import builtins
    import importlib

    if not _from_worker(err):
        return None
    for name, message in _RAISED_LINE.findall(str(err)):
        module, _, attribute = name.rpartition(".")
        try:
            kind = getattr(importlib.import_module(module) if module else builtins, attribute)
        except (ImportError, AttributeError, ValueError):
            continue
        for base in (FileNotFoundError, ValueError):
            if isinstance(kind, type) and issubclass(kind, base):
                return base(message)
    return None


def inference_items(
    datalist: str | Path | Sequence[Any] | Mapping[str, Any],
    prompts: Sequence[str] | Mapping[Any, str] | str | None = None,
    split: str = "test",
    base_dir: str | Path | None = None,
    prompt_option: str = "--prompts \"['TEXT', ...]\"",
    modality: str | None = None,
) -> list[dict[str, Any]]:
    """Datalist -> inference items ``{"image": absolute path, "prompts": {value: text}, ...}``.

    Args:
        datalist: a datalist JSON file (a list, or a decathlon-style dict: the ``split`` list is taken), a
            single image/volume path, or a list of items (dicts with ``image``) or of image paths.
        prompts: texts (list: label values 1..P) or ``{value: text}`` for every item, overriding the items' own
            ``prompts``; one text is split at its commas (``"left kidney, spleen"``: two prompts, as the server
            splits it); None keeps each item's ``prompts`` (an item without any is an error).
        split: the list of a decathlon-style datalist to predict (``all``: every list, unless it has one so named).
        base_dir: folder of relative image paths (default: the datalist file's folder, else the working dir).
        prompt_option: how the caller's user gives ``prompts``, named when an item has none (default: the
            inference bundle's ``--prompts`` override).
        modality: the ``modality`` of items that name none (the inference bundle's ``modality``: ``CT`` for the CT
            window); None leaves them without (their intensity rule by channels).
    """
    if isinstance(datalist, (list, tuple)) and not datalist:  # the inference bundle's default: nothing given
        raise ValueError("no inputs: give the images to segment with --datalist (a datalist JSON file, an image path, "
                         "or a list of paths or items; the training and evaluation bundles' key is --datalists)")
    if isinstance(datalist, (str, Path)) and _suffix(datalist) != ".json":
        entries: Any = [str(datalist)]
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    elif isinstance(datalist, (str, Path)):
        path = Path(datalist)
        from ..data.datalist import read_datalist_json

        entries = read_datalist_json(path)
        base = Path(base_dir) if base_dir is not None else path.parent
    else:
        entries = datalist
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    lists = None
    if isinstance(entries, Mapping):
        lists = {name: len(value) for name, value in entries.items() if isinstance(value, list)}
        if split == "all" and "all" not in entries:  # every list, as medsam3 evaluate --split all reads them
            entries = [entry for name in lists for entry in entries[name]]
        elif split not in entries:
            raise ValueError(f"the datalist has no '{split}' list (it has {sorted(entries)}); choose --split "
                             "(or all)")
        else:
            entries = entries[split]
    if not isinstance(entries, list):
        raise ValueError(f"the datalist's items must be a list of objects with 'image' (or of paths), got "
                         f"{type(entries).__name__}")
    if isinstance(prompts, str):  # the bundle's --prompts "left kidney, spleen" (Fire splits one-word lists itself)
        prompts = [text.strip() for text in prompts.split(",") if text.strip()]
        if not prompts:
            raise ValueError(f"{prompt_option.split()[0]} names no concept: give one or more texts, e.g. "
                             "\"liver, spleen\"")
    if prompts is not None and not isinstance(prompts, (list, tuple, Mapping)):  # Fire reads --prompts 1 as a number
        raise ValueError(f"{prompt_option.split()[0]} {prompts!r} is not a text: give concept texts, e.g. "
                         f"{prompt_option.split(maxsplit=1)[1]}")
    override = None if prompts is None else _prompt_mapping(prompts)
    items = []
    for entry in entries:
        if not isinstance(entry, (str, Path, Mapping)):
            raise ValueError(f"datalist entry {entry!r} is neither an object with 'image' nor an image path")
        item = {"image": entry} if isinstance(entry, (str, Path)) else dict(entry)
        if not isinstance(item.get("image"), (str, Path)) or not str(item["image"]):
            raise ValueError(f"datalist entry {entry!r} has no 'image' path")
        item.pop("label", None)  # prediction needs no ground truth (evaluation items come from data.selection)
        if modality is not None and not item.get("modality"):
            item["modality"] = modality
        image = Path(str(item["image"])).expanduser()
        item["image"] = os.path.normpath(image if image.is_absolute() else base / image)
        if override is not None:
            item["prompts"] = dict(override)
        elif not item.get("prompts"):
            raise ValueError(f"{item['image']}: no prompts; give {prompt_option} or 'prompts' in the item")
        else:  # the item's own: {value: text}, a list (values 1..P) or one text, checked as the loader checks them
            values, texts = item_prompts(item, item["image"])
            check_distinct_prompts(texts, item["image"])
            item["prompts"] = {str(value): text for value, text in zip(values, texts)}
        items.append(item)
    if not items:
        others = ", ".join(f"{name} {count}" for name, count in (lists or {}).items() if count and name != split)
        raise ValueError(f"the datalist's '{split}' list is empty" + (f" ({others}): choose one with --split"
                                                                      if others else ""))
    return items


def _prompt_mapping(prompts: Sequence[str] | Mapping[Any, str] | str, where: str | None = None) -> dict[str, str]:
    """Texts (label values 1..P) or ``{value: text}`` -> ``{"value": text}``, each concept once
    (:func:`check_distinct_prompts`; ``where``: the input or item named in its error)."""
    mapping = _numbered(prompts)
    check_distinct_prompts(list(mapping.values()), where)
    return mapping


def _numbered(prompts: Sequence[str] | Mapping[Any, str] | str) -> dict[str, str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Mapping):
        return {str(k): v for k, v in prompts.items()}
    return {str(i + 1): text for i, text in enumerate(prompts)}


def check_distinct_prompts(texts: Sequence[Any], where: str | None = None) -> None:
    """Refuse a prompt text given twice, compared as SAM3 reads them (the same token ids,
    ``networks.tokenizer.prompt_reading``: case, spaces, HTML entities, "polyp." / "polyp ."): both would find the
    same pixels, which go to the first one's label, and the second label would stay empty. Every inference path's
    prompts come through here (``medsam3 segment`` and its ``--datalist``, ``medsam3 serve``, the MONAI Label app,
    the inference bundle: ``Predictor.item`` and :func:`inference_items`); :func:`item_prompts` alone does not check
    (evaluation's prompt ensembles fuse phrasings that may repeat; datalist items are checked when read). Non-texts
    are left to the tokenizer's check. Raises ``PromptError`` (a ValueError) naming ``where`` (an input or datalist
    item)."""
    from ..networks.tokenizer import PromptError, repeated_reading

    strings = [text for text in texts if isinstance(text, str)]
    repeated = repeated_reading(strings)
    if repeated is not None:
        earlier, text = (strings[index] for index in repeated)
        same = "" if text == earlier else f" (as {earlier!r})"
        raise PromptError(f"{where + ': ' if where else ''}prompt {text!r} is given twice{same}: each prompt makes "
                          "its own label and the second one would stay empty; give each concept once")


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
        spec = _numbered(spec)
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
    if boxes and all(isinstance(v, (int, float)) for v in boxes):  # one box, given flat
        if len(boxes) != 4:
            raise ValueError(f"box {boxes!r} must be four finite numbers x1 y1 x2 y2 (pixels)")
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
    """A DICOM folder or any file that is not a 2D picture (NIfTI, a multi-frame DICOM file, MHA, NRRD, ...)."""
    return not is_picture_path(path)


def check_item_channels(items: Sequence[Mapping[str, Any]], channel: int | None = None) -> None:
    """Each item's channel (``channel``, ``--channel``, else the item's own) against its input, read from the
    headers before anything runs: a 2D picture takes none; a NIfTI volume one in range when it is 4D, none (or 0)
    when 3D (:func:`~medsam3_monai.transforms.io.check_channel`, the loader's own rule: ``ChannelError``). Other
    volume formats are checked by the loader."""
    from ..transforms.io import check_channel, nifti_channels

    for item in items:
        chosen = channel if channel is not None else item.get("channel")
        path = str(item["image"])
        volume = is_volume_path(path)
        header = nifti_channels(path) if volume else (1, None)
        if header is not None:
            check_channel(path, volume, header[0], chosen, header[1])


def is_dicom_series(folder: str | Path) -> bool:
    """A folder of DICOM files (one series: ``.dcm``/``.ima`` or no extension) and no other image or volume; other
    files (a README, DICOMDIR, an export's ``.txt`` / ``.xml`` / ``.json``) do not count, as exports often hold them."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"]
    dicom = [p for p in files if p.suffix.lower() in DICOM_SUFFIXES]
    other_inputs = [p for p in files if p not in dicom and _suffix(p) in IMAGE_SUFFIXES + VOLUME_SUFFIXES]
    return bool(dicom) and not other_inputs


def _input_file(path: Path) -> bool:
    """An image or volume file by its name: an existing file, or a link to one that is gone (a dataset mount missing
    on this node), kept so that it is named as missing, not left out in silence."""
    return (path.is_file() or (path.is_symlink() and not path.exists())) and _suffix(path) in (IMAGE_SUFFIXES
                                                                                              + VOLUME_SUFFIXES)


def written_by_segment(path: Path) -> bool:
    """A mask ``medsam3 segment`` wrote: its JSON sidecar (``<file>.json``) names the input, labels, protocol and
    checkpoint it came from."""
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        return False
    try:
        said = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(said, dict) and {"input", "labels", "protocol", "checkpoint"} <= said.keys()


def _folder_inputs(folder: Path, left_out: list[Path] | None = None) -> list[Path]:
    """The images and volumes directly inside ``folder`` (sorted), its DICOM-series sub-folders included; the masks
    an earlier ``medsam3 segment`` wrote there are left out (and added to ``left_out``)."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if _input_file(path) and written_by_segment(path):
            if left_out is not None:
                left_out.append(path)
        elif _input_file(path):
            found.append(path)
        elif path.is_dir() and is_dicom_series(path):
            found.append(path)
    return found


def _unsearched_folders(folder: Path) -> list[Path]:
    """The sub-folders of a folder input that it does not take (not DICOM series, not hidden), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not is_dicom_series(p))


def expand_inputs(inputs: Sequence[str | Path], notes: list[str] | None = None) -> list[str]:
    """Command-line inputs -> input paths, in order, each once (``notes``: receives a line per folder input whose
    sub-folders were not searched).

    * a file: itself (its format is checked by :func:`input_kind`);
    * a folder: one DICOM series (:func:`is_dicom_series`) is itself, one volume; any other folder gives the images
      and volumes directly inside it (sorted by name; DICOM-series sub-folders count as volumes; not recursive);
    * a pattern with ``*``, ``?`` or ``[`` (quote it so the shell leaves it alone; ``**`` recurses): the matching
      images, volumes and DICOM-series folders, sorted.

    Raises ValueError for a folder holding no input or a pattern matching none, FileNotFoundError for a path that
    does not exist.
    """
    import glob

    found: list[Path] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text).expanduser()
        if not path.exists() and any(c in text for c in GLOB_CHARACTERS):
            matches = [Path(m) for m in sorted(_recursive_glob(str(path)) if "**" in str(path)
                                               else glob.glob(str(path)))]
            chosen = [m for m in matches if _input_file(m) or is_dicom_series(m)]
            if not chosen:
                others = f" (it matches {len(matches)} other path(s))" if matches else ""
                raise ValueError(f"no image or volume matches {text!r}{others}: give a pattern matching "
                                 f"{', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)} files or DICOM series folders")
            found += chosen
        elif path.is_dir() and not is_dicom_series(path):
            masks: list[Path] = []
            inside, unsearched = _folder_inputs(path, masks), _unsearched_folders(path)
            if masks and notes is not None:
                notes.append(f"{path}: left out {len(masks)} mask(s) an earlier medsam3 segment wrote there (e.g. "
                             f"{masks[0].name}, named by its .json sidecar); give one by name to segment it")
            recurse = f"quote a pattern such as '{path / '**' / '*.png'}' to take the files in its sub-folders"
            if not inside:
                kinds = ", ".join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)
                raise ValueError(f"folder {path} holds no image or volume ({kinds} files or DICOM series folders)"
                                 + (f"; its {len(unsearched)} sub-folder(s) are not searched: {recurse}"
                                    if unsearched else ""))
            if unsearched and notes is not None:
                notes.append(f"{path}: {len(unsearched)} sub-folder(s) not searched (e.g. {unsearched[0].name}): a "
                             f"folder input takes the files directly in it; {recurse}")
            found += inside
        elif not path.exists():
            raise FileNotFoundError(f"input {path} not found: give existing images, volumes, folders or a quoted "
                                    "pattern such as 'images/*.png'")
        else:
            found.append(path)
    unique = dict.fromkeys(os.path.abspath(p) for p in found)  # "a/../b" and "b" are one input
    return list(unique)


def _pattern_regex(pattern: str) -> re.Pattern:
    """A ``glob`` pattern with ``**`` as a regular expression over ``/``-separated paths: ``**/`` any folders (none
    included), ``*`` and ``?`` within one name, ``[...]`` a character class; names starting with ``.`` are matched
    only by a part that starts with ``.``, as glob does."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern[i] in "?[" and (i == 0 or pattern[i - 1] == "/"):
            parts.append(r"(?!\.)")  # a name's first character: not a hidden name's dot
        if pattern.startswith("**/", i):
            parts.append(r"(?:[^/.][^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(r"(?:[^/.][^/]*(?:/[^/.][^/]*)*)?")
            i += 2
        elif pattern[i] == "*":
            parts.append(r"[^/]*" if i > 0 and pattern[i - 1] != "/" else r"(?:[^/.][^/]*)?")
            i += 1
        elif pattern[i] == "?":
            parts.append(r"[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z")


def _recursive_glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)`` without following a symbolic link back into a folder already walked
    (glob itself does: one ``data -> ..`` link makes every file many inputs, two make the walk endless). Symbolic
    links to other folders are followed."""
    magic = next(i for i, part in enumerate(pattern.split("/")) if any(c in part for c in GLOB_CHARACTERS))
    root = "/".join(pattern.split("/")[:magic]) or ("/" if pattern.startswith("/") else ".")
    prefix = "" if root == "." and not pattern.startswith("./") else root.rstrip("/") + "/"
    wanted = _pattern_regex(pattern[len(prefix):] if pattern.startswith(prefix) else pattern)
    matches, walked = [], set()
    for folder, names, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            names[:] = []
            continue
        walked.add(real)
        names.sort()
        relative = os.path.relpath(folder, root)
        for name in names + sorted(files):
            candidate = name if relative == "." else f"{relative}/{name}"
            if wanted.match(candidate.replace(os.sep, "/")):
                matches.append(prefix + candidate if prefix else candidate)
    return matches


def _stem(path: Path) -> str:
    name = path.name
    suffix = _suffix(name)
    return name[: len(name) - len(suffix)] if suffix and len(name) > len(suffix) else name


def output_stems(paths: Sequence[str | Path], kinds: Sequence[str]) -> list[str]:
    """Each input's output name without postfix and extension (relative to the output folder): ``<name>``, the
    file name without its extension (a DICOM folder's name). When two inputs of one kind (``"image"`` or
    ``"volume"``: their outputs share an extension) share a name, every output keeps its input's folder below the
    inputs' common folder (``a/1``, ``b/1``, ``c/2``: one layout for the run); inputs that still collide (``1.png``
    and ``1.jpg``) keep their extension in the name (``1_png``). Paths are normalised first (``a/../b/1.png`` is
    ``b/1.png``), so every name stays inside the output folder."""
    paths = [Path(os.path.abspath(p)) for p in paths]

    def stem(path: Path, keep_suffix: bool) -> str:
        name = _stem(path)
        if keep_suffix and _suffix(path):
            name += "_" + _suffix(path).lstrip(".").replace(".", "_")
        return name

    flat = [stem(p, False) for p in paths]
    if len(set(zip(flat, kinds))) == len(flat):
        return flat
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    nested = [str(p.parent.relative_to(common) / name) for p, name in zip(paths, flat)]
    keyed = list(zip(nested, kinds))
    counts = Counter(keyed)
    return [str(p.parent.relative_to(common) / stem(p, True)) if counts[key] > 1 else name
            for p, key, name in zip(paths, keyed, nested)]


def output_names(paths: Sequence[str | Path], kinds: Sequence[str], postfix: str = "seg",
                 image_ext: str = ".png", volume_ext: str = ".nii.gz") -> list[str]:
    """Output file names (relative to the output folder) of the inputs: ``<stem>_<postfix>.png`` for 2D images,
    ``<stem>_<postfix>.nii.gz`` for volumes, ``<stem>`` from :func:`output_stems` (``a/1_seg.png`` and
    ``b/1_seg.png`` for two inputs named ``1.png``)."""
    return [f"{stem}_{postfix}{image_ext if kind == 'image' else volume_ext}"
            for stem, kind in zip(output_stems(paths, kinds), kinds)]
