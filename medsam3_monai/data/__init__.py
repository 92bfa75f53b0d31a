"""Datalists, dataset converters, splits and the dataset catalogue (``datasets_meta``)."""

from .catalogue import (
    Catalogue,
    CatalogueError,
    DatasetEntry,
    canonical_concept,
    concept_for,
    datasets_of_modality,
    eval_prompt,
    get_dataset,
    load_catalogue,
    synonyms,
)
from .datalist import DatalistResult, build_datalist, concept_pool, load_datalist, load_datalists, write_datalist
from .pairs import DatalistError
from .splits import split_items

__all__ = [
    "Catalogue",
    "CatalogueError",
    "DatalistError",
    "DatalistResult",
    "DatasetEntry",
    "build_datalist",
    "canonical_concept",
    "concept_for",
    "datasets_of_modality",
    "eval_prompt",
    "get_dataset",
    "load_catalogue",
    "concept_pool",
    "load_datalist",
    "load_datalists",
    "split_items",
    "synonyms",
    "write_datalist",
    "CACHE_MODES",
    "build_dataloader",
    "build_dataset",
]

_CACHING_NAMES = ("CACHE_MODES", "build_dataloader", "build_dataset")  # from .caching, imported on first use


def __getattr__(name: str):
    """Import :mod:`.caching` (and so MONAI, slow to import) only when its names are used."""
    if name in _CACHING_NAMES:
        from . import caching

        return getattr(caching, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
