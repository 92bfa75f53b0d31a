"""Folder helpers shared by the converters: child lookup, file listing, pairing by name."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..pairs import Conversion, DatalistError, Pair, Problem

if TYPE_CHECKING:
    from ..catalogue import Catalogue, DatasetEntry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")


@dataclass(frozen=True)
class Converter:
    """A named reader of one folder layout: ``convert(root, entry, catalogue) -> Conversion``.

    ``entry`` is the catalogue entry the user named (``None`` when the name was the converter's own and
    no dataset has it, e.g. ``MSD``); ``summary`` is the one-line layout shown in errors and ``--list``.
    """

    name: str
    convert: Callable[[Path, "DatasetEntry | None", "Catalogue"], Conversion]
    summary: str


def child(folder: Path, *names: str) -> Path | None:
    """The first existing child of ``folder`` named like one of ``names`` (case-insensitive)."""
    if not folder.is_dir():
        return None
    entries = {p.name.casefold(): p for p in folder.iterdir()}
    for name in names:
        found = entries.get(name.casefold())
        if found is not None:
            return found
    return None


def descend(root: Path, *names: str) -> Path:
    """``root/<name>`` for the first such folder that exists (an extracted archive's top folder), else root."""
    found = child(root, *names)
    return found if found is not None and found.is_dir() else root


def listing(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Visible files of ``folder`` with one of ``suffixes`` (case-insensitive), sorted by name."""
    wanted = tuple(s.lower() for s in suffixes)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(wanted)
    )


def broken_links(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Visible symbolic links of ``folder`` named with one of ``suffixes`` whose target is gone (a dataset mount
    missing on this node), sorted: :func:`listing` cannot see them, so they are named as problems."""
    wanted = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.iterdir() if p.is_symlink() and not p.exists() and not p.name.startswith(".")
                  and p.name.lower().endswith(wanted))


def broken_link_problem(path: Path) -> Problem:
    return Problem(path, f"is a symbolic link to {os.readlink(path)}, which does not exist (a folder not mounted "
                         "here, or moved)")


def stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def require_dirs(root: Path, layout: str, *folders: Path | None) -> tuple[Path, ...]:
    """``folders`` when all exist; else a ``DatalistError`` naming ``root`` and the expected ``layout``."""
    found = tuple(folder for folder in folders if folder is not None and folder.is_dir())
    if len(found) != len(folders):
        raise DatalistError(f"{root}: not the expected layout. Expected {layout}")
    return found


def pair_by_name(
    images: Path,
    masks: Path,
    dataset: str,
    mask_names: Callable[[str], Iterable[str]] = lambda s: (s,),
    image_suffixes: Iterable[str] = IMAGE_SUFFIXES,
    mask_suffixes: Iterable[str] = IMAGE_SUFFIXES,
    case_prefix: str = "",
    split: str | None = None,
    ignore_mask: Callable[[Path], bool] = lambda p: False,
) -> Conversion:
    """Pair each image with the mask whose stem is one of ``mask_names(image stem)``.

    Images without a mask and masks without an image become problems (never silently dropped).
    """
    result = Conversion()
    result.problems += [broken_link_problem(path) for path in broken_links(images, image_suffixes)
                        + broken_links(masks, mask_suffixes)]
    mask_files: dict[str, Path] = {}
    for path in listing(masks, mask_suffixes):
        if ignore_mask(path):
            continue
        first = mask_files.setdefault(stem(path).casefold(), path)
        if first != path:
            result.problems.append(Problem(path, f"second mask named like {first.name}"))
    used: set[Path] = set()
    for image in listing(images, image_suffixes):
        case = stem(image)
        mask = next((mask_files[n.casefold()] for n in mask_names(case) if n.casefold() in mask_files), None)
        if mask is None:
            expected = " or ".join(mask_names(case))
            result.problems.append(Problem(image, f"no mask found in {masks} (expected {expected}.*)"))
            continue
        used.add(mask)
        result.pairs.append(Pair(image, mask, case_prefix + case, dataset, split))
    for mask in sorted(set(mask_files.values()) - used):
        result.problems.append(Problem(mask, "mask without a matching image"))
    return result
