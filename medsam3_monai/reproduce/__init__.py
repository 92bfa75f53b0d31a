"""Reproduce the papers' tables in one command (``medsam3 reproduce medical-sam3|medsam3``).

Modules, one role each:

* :mod:`.published` -- the published tables (datasets, groups, prompts, Dice, sources) read from the catalogue.
* :mod:`.discovery` -- finding each dataset under a data root, its datalist with the paper's prompts, Table 1 counts.
* :mod:`.table` -- ours / published / Δ per dataset and column, labelled group means (Markdown, CSV).
* :mod:`.charts` -- the radar charts (the paper's figure with our numbers; ours vs published).
* :mod:`.report` -- ``datasets.md``, ``timing.md`` and the notes under the table.
* :mod:`.manifest` -- versions, commit, checkpoint SHA-256.
* :mod:`.tracking` -- the one MLflow run.
* :mod:`.runner` -- the whole reproduction (``reproduce``, ``ReproduceSettings``).

Documentation: ``bundles/medsam3/docs/reproduce.md``. Importing this package is light (no torch).
"""

from __future__ import annotations

from ..lazy import lazy_exports

__all__ = ["PaperTable", "ReproduceSettings", "Reproduction", "build_table", "discover", "paper_table", "reproduce"]

_WHERE = {"PaperTable": "published", "paper_table": "published", "discover": "discovery", "build_table": "table",
          "ReproduceSettings": "runner", "Reproduction": "runner", "reproduce": "runner"}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
