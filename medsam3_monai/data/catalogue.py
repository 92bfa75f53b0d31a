"""The dataset catalogue (``datasets_meta/``): datasets, label -> concept text, prompts, synonyms.

``datasets_meta`` lives at the repository root, beside this package; it is found at
``Path(__file__).parents[2] / "datasets_meta"`` (source checkout or editable install) or at the folder named by
the environment variable ``MEDSAM3_DATASETS_META``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "Catalogue",
    "CatalogueError",
    "DatasetEntry",
    "canonical_concept",
    "concept_for",
    "datasets_of_modality",
    "eval_prompt",
    "get_dataset",
    "load_catalogue",
    "load_schema",
    "meta_dir",
    "normalise_name",
    "synonyms",
]

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound", "endoscopy", "fundus", "OCT", "dermoscopy", "pathology",
              "microscopy", "EM")
PAPERS = ("medical_sam3", "medsam3")


class CatalogueError(LookupError, ValueError):
    """Unknown dataset, label value or paper in the catalogue."""


#: what a ``datasets_meta`` folder holds (a copy given with ``MEDSAM3_DATASETS_META`` too)
META_PARTS = ("datasets", "schema/dataset.schema.json", "schema/datalist.schema.json", "papers.json", "synonyms.json")


def meta_dir() -> Path:
    """The ``datasets_meta`` folder (``$MEDSAM3_DATASETS_META`` or the one beside the package)."""
    override = os.environ.get("MEDSAM3_DATASETS_META")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "datasets_meta"
    if override and not path.is_dir():
        raise FileNotFoundError(f"MEDSAM3_DATASETS_META={override}: no such folder; point it at a copy of the "
                                "repository's datasets_meta folder, or unset it to use the repository's")
    if not override and not (path / "datasets").is_dir():
        raise FileNotFoundError(
            f"dataset catalogue not found at {path}: run from a source checkout or set MEDSAM3_DATASETS_META"
        )
    missing = [part for part in META_PARTS if not (path / part).exists()]
    if missing:
        where = f"MEDSAM3_DATASETS_META={override}" if override else str(path)
        raise FileNotFoundError(f"{where} lacks {', '.join(missing)}: the catalogue folder is a copy of the whole "
                                "datasets_meta folder (its schema/, papers.json and synonyms.json too) with your "
                                "entries added to datasets/")
    return path


def normalise_name(name: str) -> str:
    """Lookup key: NFKC, case-folded, letters and digits only ('Kvasir‑SEG' == 'kvasir_seg')."""
    return re.sub(r"[^0-9a-z]", "", unicodedata.normalize("NFKC", name).casefold())


def _text_key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass(frozen=True)
class DatasetEntry:
    """One ``datasets_meta/datasets/<name>.json`` (see ``datasets_meta/schema/dataset.schema.json``)."""

    name: str
    modality: str
    dimensionality: str
    role: str
    labels: Mapping[str, str]
    concepts: tuple[str, ...]
    mask_encoding: str | None
    instance_rule: str
    converter: str | None
    aliases: tuple[str, ...] = ()
    instance_rule_by_label: Mapping[str, str] = field(default_factory=dict)
    papers: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DatasetEntry:
        return cls(
            name=data["name"],
            modality=data["modality"],
            dimensionality=data["dimensionality"],
            role=data["role"],
            labels=dict(data["labels"]),
            concepts=tuple(data["concepts"]),
            mask_encoding=data["mask_encoding"],
            instance_rule=data["instance_rule"],
            converter=data["converter"],
            aliases=tuple(data.get("aliases", ())),
            instance_rule_by_label=dict(data.get("instance_rule_by_label", {})),
            papers=dict(data.get("papers", {})),
            raw=dict(data),
        )

    def rule_for(self, label_value: str | int) -> str:
        return self.instance_rule_by_label.get(str(label_value), self.instance_rule)

    def item_instance_rule(self) -> str | dict[str, str]:
        """The datalist item's ``instance_rule``: one rule, or a per-label dict when labels differ."""
        rules = {value: self.rule_for(value) for value in self.labels}
        return self.instance_rule if len(set(rules.values()) | {self.instance_rule}) == 1 else rules


@dataclass(frozen=True)
class Catalogue:
    """All datasets, the synonym groups and the per-paper tables."""

    datasets: Mapping[str, DatasetEntry]
    synonym_groups: tuple[tuple[str, ...], ...]
    papers: Mapping[str, Any]
    root: Path
    _index: dict[str, str] = field(init=False, repr=False, compare=False)
    _groups: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, str] = {}
        for entry in self.datasets.values():
            for name in (entry.name, *entry.aliases):
                key = normalise_name(name)
                if index.setdefault(key, entry.name) != entry.name:
                    raise CatalogueError(
                        f"name {name!r} is used by both {index[key]} and {entry.name}: every name and alias belongs to "
                        f"one dataset; edit the 'name' / 'aliases' of {self.root / 'datasets'}/{entry.name}.json (a "
                        "copied entry keeps the aliases of the one it was copied from)")
        object.__setattr__(self, "_index", index)
        groups: dict[str, tuple[str, ...]] = {}
        for group in self.synonym_groups:
            for text in group:
                if _text_key(text) in groups:
                    raise CatalogueError(f"synonym {text!r} appears in two groups")
                groups[_text_key(text)] = group
        object.__setattr__(self, "_groups", groups)

    def get(self, name: str) -> DatasetEntry:
        """Entry by name or alias (case, spaces, '-' and '_' ignored)."""
        found = self._index.get(normalise_name(name))
        if found is None:
            raise CatalogueError(f"unknown dataset {name!r}; known: {', '.join(sorted(self.datasets))}")
        return self.datasets[found]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._index

    def names(self, role: str | None = None) -> list[str]:
        return sorted(n for n, e in self.datasets.items() if role is None or e.role == role)

    def concept_for(self, dataset: str, label_value: str | int) -> str:
        entry = self.get(dataset)
        try:
            return entry.labels[str(label_value)]
        except KeyError:
            known = ", ".join(f"{k}={v}" for k, v in entry.labels.items()) or "none catalogued"
            raise CatalogueError(f"{entry.name} has no label value {label_value!r} (known: {known})") from None

    def datasets_of_modality(self, modality: str) -> list[str]:
        wanted = _text_key(modality)
        if wanted not in {_text_key(m) for m in MODALITIES}:
            raise CatalogueError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
        return sorted(n for n, e in self.datasets.items() if _text_key(e.modality) == wanted)

    def synonyms(self, concept: str) -> list[str]:
        """The synonym group of ``concept`` (canonical first), or ``[concept]`` when it has none."""
        group = self._groups.get(_text_key(concept))
        return list(group) if group else [concept]

    def canonical_concept(self, text: str) -> str:
        """The canonical concept for a prompt text (first of its synonym group), else the text, normalised."""
        group = self._groups.get(_text_key(text))
        return group[0] if group else _text_key(text)

    def eval_prompt(self, dataset: str, paper: str | None = None) -> str:
        """The prompt a paper evaluates ``dataset`` with.

        ``paper`` is ``"medical_sam3"`` (its release's prompt) or ``"medsam3"`` (its phrase table); ``None``
        takes the first of the two that exists, else the dataset's concepts joined with ' & '.
        """
        entry = self.get(dataset)
        if paper is not None and paper not in PAPERS:
            raise CatalogueError(f"unknown paper {paper!r}; known: {', '.join(PAPERS)}")
        for name in (paper,) if paper else PAPERS:
            info = entry.papers.get(name)
            text = info and (info.get("prompt") if name == "medical_sam3" else info.get("phrase"))
            if text:
                return text
        if paper:
            raise CatalogueError(f"{paper} gives no prompt for {entry.name}")
        return " & ".join(entry.labels.values() or entry.concepts)


def load_schema(name: str, root: Path | None = None) -> dict[str, Any]:
    """``datasets_meta/schema/<name>.schema.json`` (``dataset``, ``synonyms``, ``papers``, ``datalist``)."""
    return json.loads(((root or meta_dir()) / "schema" / f"{name}.schema.json").read_text(encoding="utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CatalogueError(f"{path}: invalid JSON ({err})") from None


def _read_entry(path: Path, schema: Any) -> DatasetEntry:
    """One ``datasets/<name>.json``, checked against the dataset schema and for label concepts missing from its
    ``concepts``; every error names the file."""
    from .schemas import schema_errors

    data = _read_json(path)
    errors = schema_errors(data, schema)
    if errors:
        raise CatalogueError(f"{path} does not match datasets_meta/schema/dataset.schema.json:\n  "
                             + "\n  ".join(errors))
    entry = DatasetEntry.from_json(data)
    if path.stem != entry.name:
        raise CatalogueError(f"{path}: file name must be '<name>.json' for dataset {entry.name!r}")
    unlisted = [concept for concept in entry.labels.values() if concept not in entry.concepts]
    if unlisted:
        raise CatalogueError(f"{path}: the label concepts {unlisted} are not in its 'concepts' "
                             f"{list(entry.concepts)}: add them there (concepts lists every label's concept)")
    rules = {entry.instance_rule, *entry.instance_rule_by_label.values()}
    if "instance_ids" in rules and entry.mask_encoding not in (None, "instance_map"):
        raise CatalogueError(f"{path}: instance_rule 'instance_ids' reads each instance's id from the mask, which "
                             f"mask_encoding {entry.mask_encoding!r} does not keep: give mask_encoding "
                             "'instance_map' (or another instance_rule, e.g. 'components')")
    stray = sorted(set(entry.instance_rule_by_label) - set(entry.labels), key=int)
    if stray:
        raise CatalogueError(f"{path}: instance_rule_by_label names label value(s) {stray} that 'labels' "
                             f"({sorted(entry.labels, key=int)}) does not have")
    if entry.converter is not None:
        from .converters import CONVERTERS, get_converter
        from .pairs import DatalistError

        try:
            converter = get_converter(entry.converter)
        except DatalistError:
            raise CatalogueError(f"{path}: converter {entry.converter!r} does not exist; give one of "
                                 f"{', '.join(sorted(CONVERTERS))}, or null when none reads its layout") from None
        if converter.name != entry.converter:  # 'kvasir-seg': the converter's own spelling
            entry = replace(entry, converter=converter.name)
    return entry


@lru_cache(maxsize=4)
def _load(root: Path) -> Catalogue:
    datasets: dict[str, DatasetEntry] = {}
    from .schemas import schema_validator

    schema = schema_validator(load_schema("dataset", root))
    for path in sorted((root / "datasets").glob("*.json")):
        entry = _read_entry(path, schema)
        datasets[entry.name] = entry
    groups = tuple(tuple(group) for group in _read_json(root / "synonyms.json")["groups"])
    return Catalogue(datasets=datasets, synonym_groups=groups, papers=_read_json(root / "papers.json"), root=root)


def load_catalogue(root: Path | str | None = None) -> Catalogue:
    """Load (and cache) the catalogue from ``root`` or :func:`meta_dir`."""
    return _load(Path(root).resolve() if root else meta_dir())


def get_dataset(name: str) -> DatasetEntry:
    return load_catalogue().get(name)


def concept_for(dataset: str, label_value: str | int) -> str:
    """Canonical concept text of ``label_value`` in ``dataset`` (e.g. Hippocampus 2 -> 'posterior hippocampus')."""
    return load_catalogue().concept_for(dataset, label_value)


def datasets_of_modality(modality: str) -> list[str]:
    return load_catalogue().datasets_of_modality(modality)


def synonyms(concept: str) -> list[str]:
    return load_catalogue().synonyms(concept)


def canonical_concept(text: str) -> str:
    return load_catalogue().canonical_concept(text)


def eval_prompt(dataset: str, paper: str | None = None) -> str:
    return load_catalogue().eval_prompt(dataset, paper)
