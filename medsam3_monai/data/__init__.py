"""Datalists, dataset converters, splits and the dataset catalogue (``datasets_meta``).

The names below are imported from their submodules on first use (PEP 562 ``__getattr__``): importing the
package, e.g. for the ``medsam3 datalist`` parser, loads neither numpy, jsonschema nor MONAI.
``from medsam3_monai.data import load_datalists`` and ``$medsam3_monai.data.load_datalists(...)`` in the bundle
configs work as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# public name -> submodule defining it
_LAZY_NAMES = {
    "Catalogue": "catalogue",
    "CatalogueError": "catalogue",
    "DatasetEntry": "catalogue",
    "canonical_concept": "catalogue",
    "concept_for": "catalogue",
    "datasets_of_modality": "catalogue",
    "eval_prompt": "catalogue",
    "get_dataset": "catalogue",
    "load_catalogue": "catalogue",
    "synonyms": "catalogue",
    "DatalistResult": "datalist",
    "build_datalist": "datalist",
    "concept_pool": "datalist",
    "load_datalist": "datalist",
    "load_datalists": "datalist",
    "write_datalist": "datalist",
    "DatalistError": "pairs",
    "split_items": "splits",
    "CACHE_MODES": "caching",  # caching imports MONAI (slow)
    "build_dataloader": "caching",
    "build_dataset": "caching",
}

__all__ = sorted(_LAZY_NAMES)

if TYPE_CHECKING:  # static analysers and IDEs see the names; at run time __getattr__ imports them
    from .caching import CACHE_MODES, build_dataloader, build_dataset
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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY_NAMES)
