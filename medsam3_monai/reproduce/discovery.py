"""Find a paper's evaluation sets under a data root and build their datalists with the paper's prompts.

The root holds one folder per dataset, named like the dataset or one of its catalogue aliases (case, spaces,
``-`` and ``_`` ignored: ``Kvasir-SEG``, ``kvasir_seg``, ``Dataset_BUSI_with_GT``), each in the layout the
dataset's converter reads (``datasets_meta/datasets/<name>.json`` ``layout``; ``medsam3 datalist --list``).
Every dataset of the table gets a :class:`DatasetStatus`:

* ``found``: its folder was read; the datalist is built with the paper's split rules (85/15, seed 42, official
  test kept, external sets all test) and the paper's prompt replaces the catalogue concept;
* ``missing``: no folder of that name (the expected folder and layout are reported);
* ``no converter``: no converter reads the dataset yet, so it cannot be reproduced here;
* ``unreadable``: a folder is there but not in the expected layout (the converter's error is reported).
* ``unreadable_cases``: found, but none of its cases could be read when evaluated (``--skip-unreadable``; set by
  the runner, which goes on with the other datasets).

The image count each converter finds is compared with Medical SAM3 Table 1 (``published.images`` of the entry)
where the catalogue knows it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DatasetStatus", "discover", "find_folder", "paper_prompts", "table1_comparison"]

#: files left out of a layout that a dataset's line names before "... and N more"
LEFT_OUT_LISTED = 5


@dataclass
class DatasetStatus:
    """What :func:`discover` made of one dataset of a paper's table."""

    dataset: str
    group: str
    status: str
    folder: Path | None = None
    expected: str = ""
    message: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    prompt_note: str = ""
    datalist: dict[str, list[dict[str, Any]]] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    images_found: int | None = None
    unlabelled: int = 0
    published_images: int | None = None
    other_folders: list[Path] = field(default_factory=list)
    #: the layout's files left out (``--skip-unreadable``: a missing mask, an unreadable header): ``path: reason``
    left_out: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.status == "found"

    def split_warning(self, max_cases: int | None = None) -> str:
        """A warning when a found dataset has no labelled test images but images without labels (a test half
        published without its labels, such as today's DRIVE): it is then scored on its validation split
        (``max_cases``: the ``--max-cases`` sample of it that is scored)."""
        if not self.found or self.counts.get("test") or not self.unlabelled:
            return ""
        cases = self.counts.get("validation", 0)
        sample = f"; {max_cases} of them scored (--max-cases)" if max_cases and max_cases < cases else ""
        return (f"{self.dataset} has no labelled test images ({self.unlabelled} images without labels, e.g. a test "
                "half published without them): it is scored on its validation split "
                f"({cases} cases: 15 % of the labelled images, seed 42{sample}), not on the "
                "test set the published value comes from")

    @property
    def evaluated_split(self) -> str | None:
        """The split ``auto`` scores: ``test`` when it has cases, else ``validation``; None when not found."""
        if not self.found:
            return None
        return "test" if self.counts.get("test") else "validation"

    def evaluation_cases(self) -> int:
        """Cases of the evaluation split ``auto`` (test when present, else validation)."""
        return self.counts.get("test") or self.counts.get("validation") or 0

    def line(self) -> str:
        """One line for the console and ``datasets.md``."""
        if self.found:
            counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
            text = f"found     {self.dataset} ({self.group}) in {self.folder}: {counts}; prompt {self._prompt_text()}"
            text += f" ({self.prompt_note})" if self.prompt_note else ""
            if self.left_out:
                text += (f"; {len(self.left_out)} file(s) left out (--skip-unreadable): "
                         + "; ".join(self.left_out[:LEFT_OUT_LISTED])
                         + (f"; ... and {len(self.left_out) - LEFT_OUT_LISTED} more"
                            if len(self.left_out) > LEFT_OUT_LISTED else ""))
            return text
        label = {"missing": "not found", "no_converter": "no converter", "unreadable": "unreadable",
                 "unreadable_cases": "unreadable"}[self.status]
        return f"{label:<9} {self.dataset} ({self.group}): {self.message}"

    def _prompt_text(self) -> str:
        return " & ".join(f"'{text}'" for text in self.prompts.values())


def find_folder(root: Path, entry: Any) -> tuple[Path | None, list[Path]]:
    """The folder of ``entry`` under ``root`` (its name first, then an alias) and any further matching folders."""
    from ..data.catalogue import normalise_name

    keys = [normalise_name(name) for name in (entry.name, *entry.aliases)]
    matches = [child for child in sorted(root.iterdir()) if child.is_dir() and normalise_name(child.name) in keys]
    matches.sort(key=lambda child: keys.index(normalise_name(child.name)))
    return (matches[0], matches[1:]) if matches else (None, [])


def paper_prompts(entry: Any, phrase: str, catalogue: Any) -> tuple[dict[str, str], str]:
    """Label value -> the paper's prompt text.

    One label: the paper's phrase. Several labels and a phrase ``"a & b"``: each part goes to the label whose
    concept it names (synonyms included); when that fails, the catalogue's concepts are kept and the note says so.
    """
    labels = dict(entry.labels)
    if len(labels) == 1:
        return {next(iter(labels)): phrase}, ""
    parts = [part.strip() for part in phrase.split("&") if part.strip()]
    by_concept = {catalogue.canonical_concept(text): value for value, text in labels.items()}
    mapped = {by_concept.get(catalogue.canonical_concept(part)): part for part in parts}
    if len(parts) == len(labels) and None not in mapped and set(mapped) == set(labels):
        return {value: mapped[value] for value in labels}, ""
    note = f"the paper's phrase '{phrase}' does not name the {len(labels)} labels one by one: catalogue concepts used"
    return labels, note


def _expected(root: Path, entry: Any) -> str:
    aliases = f" (or one of: {', '.join(entry.aliases)})" if entry.aliases else ""
    return f"{root / entry.name}/{aliases} in the layout: {entry.raw.get('layout')}"


def discover(root: Path | str, table: Any, catalogue: Any = None, *, seed: int = 42,
             skip_unreadable: bool = False) -> list[DatasetStatus]:
    """A :class:`DatasetStatus` for every dataset of ``table`` (a :class:`~.published.PaperTable`), in its order.

    A layout with bad files (an image without its mask, a file whose header cannot be read) is ``unreadable``,
    naming them, unless ``skip_unreadable``: their pairs are then left out and listed in the status's ``left_out``.

    Nothing is written; found datasets carry their datalist (paths absolute) with the paper's prompts.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    from ..data.catalogue import load_catalogue
    from ..data.datalist import build_datalist
    from ..data.pairs import DatalistError

    catalogue = catalogue or load_catalogue()
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data root {root} {what} (give the folder that holds one sub-folder per dataset, "
                                "named like the dataset)")
    statuses = []
    for name, group in table.datasets:
        entry = catalogue.get(name)
        published = entry.raw.get("published") or {}
        status = DatasetStatus(name, group, "missing", published_images=published.get("images"))
        status.folder, status.other_folders = find_folder(root, entry)
        statuses.append(status)
        if entry.converter is None:
            status.status = "no_converter"
            status.expected = "no converter reads this dataset's layout yet"
            where = f"; folder {status.folder} is there but cannot be read" if status.folder else ""
            status.message = (f"no converter reads {name} yet (its layout is not catalogued), so it cannot be "
                              f"evaluated by this command{where}")
            continue
        status.expected = _expected(root, entry)
        if status.folder is None:
            status.message = f"expected {status.expected}"
            continue
        try:
            result = build_datalist(entry.name, status.folder, catalogue=catalogue, seed=seed,
                                    skip_bad=skip_unreadable,
                                    bad_hint="a dataset is evaluated whole: repair or remove these files, or give "
                                             "--skip-unreadable to leave them out")
        except (DatalistError, ValueError, OSError) as err:
            status.status = "unreadable"
            text = str(err).strip()
            status.message = text if "xpected" in text else f"{text}\n  expected {status.expected}"
            continue
        status.status = "found"
        status.left_out = [str(problem) for problem in result.skipped]
        status.prompts, status.prompt_note = paper_prompts(entry, table.prompts[name], catalogue)
        status.datalist = _with_prompts(result.datalist, status.prompts)
        status.counts = result.counts()
        status.unlabelled = len(result.unlabelled)
        status.images_found = sum(status.counts.values()) + status.unlabelled
        if status.other_folders:
            status.prompt_note = "; ".join(filter(None, [status.prompt_note, "also matching, not used: " + ", ".join(
                str(p) for p in status.other_folders)]))
    return statuses


def _with_prompts(datalist: Mapping[str, list[dict[str, Any]]], prompts: Mapping[str, str]) -> dict[str, Any]:
    out = copy.deepcopy(dict(datalist))
    for items in out.values():
        for item in items:
            item["prompts"] = dict(prompts)
    return out


def table1_comparison(status: DatasetStatus) -> str:
    """How the images the converter found compare with Medical SAM3 Table 1."""
    if not status.found:
        return "–"
    found = f"{status.images_found} images" + (f" ({status.unlabelled} without labels)" if status.unlabelled else "")
    if status.published_images is None:
        return f"{found}; Table 1 count not in the catalogue (not read offline)"
    if status.published_images == status.images_found:
        return f"{found}; matches Table 1"
    return f"{found}; DIFFERS from Table 1 ({status.published_images}): your copy is not the paper's"
