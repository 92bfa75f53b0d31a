"""Converter registry: name -> reader of one dataset folder layout (see each module's docstring)."""

from __future__ import annotations

from ..catalogue import Catalogue, DatasetEntry, normalise_name
from ..pairs import DatalistError
from . import busi, dermoscopy, endoscopy, retina, samples, ultrasound, volumes
from ._common import Converter

__all__ = ["CONVERTERS", "Converter", "get_converter", "resolve"]

CONVERTERS: dict[str, Converter] = {
    converter.name: converter
    for module in (busi, retina, endoscopy, dermoscopy, ultrasound, samples, volumes)
    for converter in module.CONVERTERS
}
_BY_KEY = {normalise_name(name): converter for name, converter in CONVERTERS.items()}


def _known(catalogue: Catalogue | None = None) -> str:
    text = f"known converters: {', '.join(sorted(CONVERTERS))}"
    if catalogue is not None:
        text += " (or a catalogued dataset name or alias whose entry names one of them)"
    return text


def get_converter(name: str) -> Converter:
    """The converter called ``name`` (case, spaces, '-' and '_' ignored)."""
    try:
        return _BY_KEY[normalise_name(name)]
    except KeyError:
        raise DatalistError(f"unknown converter {name!r}; {_known()}") from None


def resolve(name: str, catalogue: Catalogue) -> tuple[Converter, DatasetEntry | None]:
    """The converter and catalogue entry for a ``medsam3 datalist NAME``.

    NAME is a converter name (``BUSI``, ``MSD``) or any catalogued dataset name or alias
    (``Kvasir-SEG_sample``, ``MSD_Task04_Hippocampus_cropped``), which selects its entry's converter.
    """
    converter = _BY_KEY.get(normalise_name(name))
    entry = catalogue.get(name) if name in catalogue else None
    if converter is not None:
        if entry is not None and entry.converter != converter.name:
            entry = None  # a converter named like a dataset it does not produce (none today)
        return converter, entry
    if entry is None:
        raise DatalistError(f"unknown dataset or converter {name!r}; {_known(catalogue)}")
    if entry.converter is None:
        raise DatalistError(
            f"dataset {entry.name} is catalogued but no converter reads its layout yet: write its datalist yourself "
            f"(README, \"Data\": one item per image with image, label and prompts; its labels here: "
            f"{dict(entry.labels) or 'not verified'}) and check it with `medsam3 datalist --check FILE`, or give "
            f"a converter whose layout it has ({_known()})"
        )
    return CONVERTERS[entry.converter], entry
