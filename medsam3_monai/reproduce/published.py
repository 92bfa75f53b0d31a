"""The published tables a reproduction is compared with, read from the catalogue (``datasets_meta/papers.json``).

Nothing here is typed in by hand: every dataset, prompt, published Dice and source line comes from the catalogue,
and a value the catalogue does not hold (``null``) stays ``None`` and is shown as unknown. Light (stdlib only).

* Medical SAM3 Table 3 (:func:`medical_sam3_table`): the 10 internal and 7 external evaluation sets, SAM3 and
  Medical SAM3 Dice per dataset and the group means, the release's evaluation prompts,
  text prompts only, the top query.
* MedSAM3's comparison (:func:`medsam3_table`): BUSI, RIM-ONE, ISIC 2018, Kvasir-SEG; U-Net, MedSAM (published
  only), SAM 3 and MedSAM-3 under the T (text) and T+I (text + box) protocols, with MedSAM3's phrases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AGENT_KEY", "PAPERS", "Column", "PaperTable", "format_source", "medical_sam3_table", "medsam3_agent_column",
           "medsam3_table", "paper_table"]

PAPERS = ("medical-sam3", "medsam3")
#: the column (and report sub-folder) of the MedSAM-3 agent (``medsam3 reproduce medsam3 --agent``)
AGENT_KEY = "medsam3_agent"


@dataclass(frozen=True)
class Column:
    """One method (under one protocol) of a published table.

    Attributes:
        key: short id, also the report sub-folder (``medical_sam3``, ``sam3_t``).
        method: the paper's name for it (``Medical SAM3``, ``SAM 3``).
        protocol: ``T`` (text prompt), ``T+I`` (text + box) or None (a method without text prompts).
        runs: which checkpoint reproduces it: ``checkpoint`` (``--checkpoint``), ``baseline`` (``--baseline``) or
            None (published only: U-Net, MedSAM are not SAM checkpoints).
        published: dataset -> published Dice (%), None when not known.
        averages: group -> published mean Dice (%) of the group, None when not known.
    """

    key: str
    method: str
    protocol: str | None
    runs: str | None
    published: Mapping[str, float | None]
    averages: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def box_prompts(self) -> bool:
        return self.protocol == "T+I"


@dataclass(frozen=True)
class PaperTable:
    """A published table: its datasets (in the paper's order, with their group), columns, prompts and sources."""

    paper: str
    title: str
    datasets: tuple[tuple[str, str], ...]
    columns: tuple[Column, ...]
    prompts: Mapping[str, str]
    protocol: str
    sources: tuple[str, ...]
    protocols: tuple[str, ...] = ("T",)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(group for _, group in self.datasets))

    def members(self, group: str) -> list[str]:
        return [name for name, g in self.datasets if g == group]

    def column(self, key: str) -> Column:
        for column in self.columns:
            if column.key == key:
                return column
        raise KeyError(f"{self.paper} has no column {key!r}")


def format_source(source: Mapping[str, Any]) -> str:
    """One line: what, the paper's table and page (or that they are unknown), where the numbers were taken from."""
    where = source.get("table") or "table not named by the source"
    page = f"p. {source['page']}" if source.get("page") else "page unknown"
    checked = "checked against the paper" if source.get("checked_against_paper") else "not checked against the paper"
    what = f"{source['numbers']}: " if source.get("numbers") else ""
    return f"{what}{source['document']}, {where}, {page}; via {source['via']} ({checked})"


def _catalogue(catalogue: Any = None) -> Any:
    if catalogue is not None:
        return catalogue
    from ..data.catalogue import load_catalogue

    return load_catalogue()


def medical_sam3_table(catalogue: Any = None) -> PaperTable:
    """Medical SAM3 Table 3: SAM3 (``--baseline``) and Medical SAM3 (``--checkpoint``), text prompts, top query."""
    catalogue = _catalogue(catalogue)
    paper = catalogue.papers["medical_sam3"]
    table3 = paper["table3"]
    rows = [(row, "internal") for row in paper["internal_eval"]] + [(row, "external") for row in paper["external_eval"]]
    datasets = tuple((row["dataset"], group) for row, group in rows)
    columns = []
    for value_key, method in table3["methods"].items():
        published = {row["dataset"]: row.get(value_key) for row, _ in rows}
        averages = {group: paper["averages"].get(keys[value_key]) for group, keys in table3["averages_keys"].items()
                    if value_key in keys}
        key = value_key.removesuffix("_dice")
        columns.append(Column(key, method, "T", "baseline" if key == "sam3" else "checkpoint", published, averages))
    prompts = {name: catalogue.eval_prompt(name, "medical_sam3") for name, _ in datasets}
    return PaperTable(
        paper="medical-sam3", title=f"Medical SAM3 (arXiv {paper['arxiv']}) Table 3", datasets=datasets,
        columns=tuple(columns), prompts=prompts, protocol=table3["protocol"],
        sources=tuple(format_source(s) for s in table3["sources"]),
    )


def medsam3_table(catalogue: Any = None) -> PaperTable:
    """MedSAM3's comparison: SAM 3 (``--baseline``) and MedSAM-3 (``--checkpoint``) under T and T+I; U-Net and
    MedSAM published only."""
    catalogue = _catalogue(catalogue)
    paper = catalogue.papers["medsam3"]
    results = paper["results"]
    names = [catalogue.get(name).name for name in results["datasets"]]
    columns = []
    for spec in results["columns"]:
        method = spec["method"]
        runs = {"SAM 3": "baseline", "MedSAM-3": "checkpoint"}.get(method)
        published = {name: (results["dice"].get(name) or {}).get(spec["key"]) for name in names}
        columns.append(Column(spec["key"], method, spec["protocol"], runs, published, {"all": None}))
    prompts = {name: catalogue.eval_prompt(name, "medsam3") for name in names}
    protocol = "; ".join(f"{name}: {text}" for name, text in results["protocols"].items())
    return PaperTable(
        paper="medsam3", title=f"MedSAM3 (arXiv {paper['arxiv']}) comparison",
        datasets=tuple((name, "all") for name in names), columns=tuple(columns), prompts=prompts,
        protocol=f"{protocol}; per prompt the highest-scoring query's mask (top_query); Dice per dataset",
        sources=(format_source(results["source"]),), protocols=tuple(results["protocols"]),
    )


def medsam3_agent_column(catalogue: Any = None) -> Column:
    """The MedSAM-3 agent (``--checkpoint`` driven by the agent, text requests): published Dice from the catalogue's
    ``results.dice[<dataset>]["medsam3_agent"]`` where it has one, else None (unknown)."""
    catalogue = _catalogue(catalogue)
    results = catalogue.papers["medsam3"]["results"]
    names = [catalogue.get(name).name for name in results["datasets"]]
    published = {name: (results["dice"].get(name) or {}).get(AGENT_KEY) for name in names}
    return Column(AGENT_KEY, "MedSAM-3 agent", "T", "checkpoint", published, {"all": None})


def paper_table(paper: str, catalogue: Any = None) -> PaperTable:
    """The table of ``paper`` (``medical-sam3`` or ``medsam3``)."""
    if paper == "medical-sam3":
        return medical_sam3_table(catalogue)
    if paper == "medsam3":
        return medsam3_table(catalogue)
    raise ValueError(f"unknown paper {paper!r}; choose from {', '.join(PAPERS)}")
