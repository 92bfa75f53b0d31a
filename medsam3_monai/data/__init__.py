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
]
