"""Prompt robustness: how much a dataset's score depends on the wording of its prompt.

Results swing with the wording ("liver" / "hepatic parenchyma", "nuclei" / "cell"), so ``medsam3 evaluate
--prompt-variants synonyms`` scores every dataset with each phrasing of its concepts and with their ensemble:

1. :func:`concept_phrasings`: the phrasings of one concept, from the catalogue (``datasets_meta``): the datalist's
   own prompt first, then the canonical concept, the dataset's paper prompts that name it (Medical SAM3's
   evaluation prompt, MedSAM3's phrase table) and its synonym group (``synonyms.json``); duplicates (case, spacing,
   punctuation) removed. :func:`plan_phrasings` does this for every (dataset, label value) of the evaluated items.
2. :class:`PhrasingPlan`: the runs. Run ``canonical`` is phrasing 0 (the datalist's prompt, what a plain
   ``medsam3 evaluate`` scores), run ``phrasing-k`` replaces every class prompt by its k-th phrasing (a class with
   fewer phrasings keeps its prompt there and is left out of that run's robustness rows; an item with no class
   left to vary is left out of the run), and run ``ensemble`` gives each class all its phrasings at once, fused by
   confidence as the offline agent planner fuses them (``engines.evaluation.EnsembleCaseInferer``).
3. :func:`robustness_table` turns the runs' metric records into :class:`RobustnessTable`: Dice (and IoU) per
   dataset, concept and phrasing, and per dataset and concept the worst phrasing, the spread (best - worst over the
   single phrasings), their mean and the ensemble. ``robustness.csv`` / ``robustness_summary.csv`` hold fractions,
   ``robustness.md`` percentages, ``robustness.png`` the plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CANONICAL",
    "ENSEMBLE",
    "Phrasing",
    "PhrasingPlan",
    "RobustnessTable",
    "concept_phrasings",
    "plan_phrasings",
    "robustness_plot",
    "robustness_table",
]

CANONICAL = "canonical"
ENSEMBLE = "ensemble"
_METRICS = ("dice", "iou")


@dataclass(frozen=True)
class Phrasing:
    """One wording of a concept and where it came from."""

    text: str
    source: str


def _key(text: str) -> str:
    from ..agent.concepts import phrase_key

    return phrase_key(text)


def concept_phrasings(text: str, dataset: str | None = None, max_phrasings: int | None = None,
                      catalogue: Any = None) -> list[Phrasing]:
    """The phrasings of the concept ``text`` names (see the module docstring), ``text`` itself first.

    Args:
        text: a class prompt (normally a datalist's, i.e. the catalogue concept).
        dataset: the dataset the class belongs to (its paper prompts are added when they name the concept).
        max_phrasings: keep at most this many (None: all).
        catalogue: a loaded :class:`~medsam3_monai.data.catalogue.Catalogue` (default: ``load_catalogue()``).
    """
    from ..data.catalogue import load_catalogue

    if max_phrasings is not None and int(max_phrasings) < 1:
        raise ValueError(f"max_phrasings must be at least 1, got {max_phrasings}")
    catalogue = catalogue or load_catalogue()
    canonical = catalogue.canonical_concept(text)
    candidates = [Phrasing(text, "datalist prompt"), Phrasing(canonical, "canonical concept (datasets_meta)")]
    if dataset is not None and dataset in catalogue:
        entry = catalogue.get(dataset)
        prompt = (entry.papers.get("medical_sam3") or {}).get("prompt")
        phrase = (entry.papers.get("medsam3") or {}).get("phrase")
        for part, source in [(prompt, "Medical SAM3 prompt"),
                             *[(p, "MedSAM3 phrase table") for p in (phrase or "").split("&")]]:
            if part and part.strip() and catalogue.canonical_concept(part.strip()) == canonical:
                candidates.append(Phrasing(part.strip(), f"{source} ({entry.name})"))
    candidates += [Phrasing(synonym, "synonyms.json") for synonym in catalogue.synonyms(canonical)]
    out, seen = [], set()
    for candidate in candidates:
        key = _key(candidate.text) or candidate.text.strip()  # a text without a letter keeps itself (refused later)
        if key and key not in seen:
            seen.add(key)
            out.append(candidate)
    return out[: int(max_phrasings)] if max_phrasings is not None else out


def _prompts(item: Mapping[str, Any]) -> tuple[list[int], list[str]]:
    from ..inferers.inputs import item_prompts

    return item_prompts(item, str(item.get("image", "item")))


@dataclass
class PhrasingPlan:
    """The phrasings of every (dataset, label value) of an evaluation, and the items of each run.

    Attributes:
        phrasings: (dataset, label value) -> phrasings, the datalist's prompt first.
        groups: dataset -> its group (``internal`` / ``external`` / ...), for the tables.
    """

    phrasings: dict[tuple[str, int], list[Phrasing]]
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Phrasings of the class that has the most (the number of single-phrasing runs)."""
        return max((len(p) for p in self.phrasings.values()), default=0)

    def variants(self) -> list[str]:
        """Run names: ``canonical``, ``phrasing-1`` ... ``phrasing-(depth-1)``, ``ensemble``."""
        return [CANONICAL, *[f"phrasing-{k}" for k in range(1, self.depth)], ENSEMBLE]

    @staticmethod
    def index(variant: str) -> int | None:
        """The phrasing index of a single-phrasing run (None for the ensemble)."""
        if variant == CANONICAL:
            return 0
        if variant.startswith("phrasing-"):
            return int(variant.split("-", 1)[1])
        return None

    def items_for(self, items: Sequence[Mapping[str, Any]], variant: str) -> list[dict[str, Any]]:
        """``items`` with their class prompts for run ``variant`` (see the module docstring)."""
        index = self.index(variant)
        out = []
        for item in items:
            values, texts = _prompts(item)
            dataset = str(item.get("dataset", ""))
            lists = [self.phrasings.get((dataset, v)) or [Phrasing(t, "datalist prompt")]
                     for v, t in zip(values, texts)]
            if index is None:
                new = dict(item, prompts={str(v): p[0].text for v, p in zip(values, lists)},
                           prompt_variants={str(v): [x.text for x in p] for v, p in zip(values, lists)})
            else:
                if not any(index < len(p) for p in lists):
                    continue
                new = dict(item, prompts={str(v): (p[index] if index < len(p) else p[0]).text
                                          for v, p in zip(values, lists)})
            out.append(new)
        return out

    def as_json(self) -> list[dict[str, Any]]:
        return [{"dataset": dataset, "label": value, "concept": p[0].text,
                 "phrasings": [{"text": x.text, "source": x.source} for x in p]}
                for (dataset, value), p in self.phrasings.items()]


def plan_phrasings(items: Sequence[Mapping[str, Any]], max_phrasings: int | None = None,
                   catalogue: Any = None) -> PhrasingPlan:
    """The :class:`PhrasingPlan` of evaluation items: for each (dataset, label value) the phrasings of its first
    item's prompt (a datalist gives every item of a dataset the same prompts)."""
    from ..data.catalogue import load_catalogue

    catalogue = catalogue or load_catalogue()
    phrasings: dict[tuple[str, int], list[Phrasing]] = {}
    groups: dict[str, str] = {}
    prompts: dict[tuple[str, int], str] = {}
    for item in items:
        dataset = str(item.get("dataset", ""))
        groups.setdefault(dataset, str(item.get("group", "other")))
        for value, text in zip(*_prompts(item)):
            first = prompts.setdefault((dataset, value), text)
            if text != first:  # the runs would prompt every item of the pair with the first item's phrasings
                raise ValueError(f"dataset {dataset!r}, label value {value}: items prompt {first!r} and {text!r}; "
                                 "the study varies one concept per dataset and label value: give the items of "
                                 "another concept their own 'dataset' name (or their own datalist)")
            if (dataset, value) not in phrasings:
                phrasings[(dataset, value)] = concept_phrasings(text, dataset or None, max_phrasings, catalogue)
    if not phrasings:
        raise ValueError("no class prompts to vary: the items carry no prompts")
    single = [p[0].text for p in phrasings.values() if len(p) < 2]
    if len(single) == len(phrasings):
        raise ValueError(f"no concept here has a second phrasing in the catalogue ({', '.join(map(repr, single))}): "
                         "nothing to vary; add wordings to datasets_meta/synonyms.json (a group: the canonical "
                         "concept first)")
    return PhrasingPlan(phrasings, groups)


# ------------------------------------------------------------------------------------------------ table
def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    mean = _mean(values)
    values = [v for v in values if not math.isnan(v)]
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan


def _metric(record: Mapping[str, Any], name: str) -> float:
    metrics = record.get("metrics", record)
    value = metrics.get(name)
    return math.nan if value in (None, "") else float(value)


@dataclass
class RobustnessTable:
    """Dice per dataset, concept and phrasing (``rows``) and per dataset and concept (``summary``).

    ``rows``: dataset, group, label, concept, variant, phrasing, source, n, dice, dice_std, iou, dice_delta (vs the
    canonical phrasing). ``summary``: dataset, group, label, concept, phrasings, canonical, best, best_phrasing,
    worst, worst_phrasing, spread (best - worst over the single phrasings), mean (over them), ensemble,
    ensemble_delta (ensemble - canonical), ensemble_phrasings; the last row (dataset ``overall``) holds the means
    of the rows above. Values are fractions (Dice in [0, 1]). Both carry each dataset's ``protocol`` (a run of
    pictures and volumes runs them under two); ``protocol`` is the list of them.
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    protocol: str | None = None

    ROW_FIELDS = ("dataset", "group", "label", "concept", "variant", "phrasing", "source", "n", "dice", "dice_std",
                  "iou", "dice_delta", "protocol")
    SUMMARY_FIELDS = ("dataset", "group", "label", "concept", "phrasings", "canonical", "best", "best_phrasing",
                      "worst", "worst_phrasing", "spread", "mean", "ensemble", "ensemble_delta", "protocol")

    def to_csv(self, path: str | Path) -> Path:
        from .aggregate import write_csv

        return write_csv(path, list(self.ROW_FIELDS), self.rows)

    def summary_to_csv(self, path: str | Path) -> Path:
        from .aggregate import write_csv

        return write_csv(path, list(self.SUMMARY_FIELDS), self.summary)

    def to_markdown(self, title: str | None = None, notes: Sequence[str] = ()) -> str:
        def pct(value: float, signed: bool = False) -> str:
            if value is None or math.isnan(value):
                return "–"
            value = 0.0 if abs(100 * value) < 0.005 else value  # no "-0.00"
            return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"

        lines = [f"**{title}**", ""] if title else []
        lines += ["| Dataset | Concept | Worst phrasing | Worst Dice (%) | Canonical Dice (%) | Best Dice (%) | "
                  "Spread (pp) | Mean (%) | Ensemble Dice (%) | Ensemble − canonical |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.summary:
            name = s["dataset"] if s["dataset"] != "overall" else "**overall (mean)**"
            worst = f"{s['worst_phrasing']}" if s["worst_phrasing"] else "–"
            lines.append(f"| {name} | {s['concept']} | {worst} | {pct(s['worst'])} | {pct(s['canonical'])} | "
                         f"{pct(s['best'])} | {pct(s['spread'])} | {pct(s['mean'])} | {pct(s['ensemble'])} | "
                         f"{pct(s['ensemble_delta'], True)} |")
        lines += ["", "Per phrasing:", "",
                  "| Dataset | Concept | Run | Phrasing | Source | n | Dice (%) | IoU (%) | Δ Dice vs canonical |",
                  "|---|---|---|---|---|---:|---:|---:|---:|"]
        for r in self.rows:
            phrasing = f"**{r['phrasing']}**" if r["variant"] == ENSEMBLE else r["phrasing"]
            lines.append(f"| {r['dataset']} | {r['concept']} | {r['variant']} | {phrasing} | {r['source']} | "
                         f"{r['n']} | {pct(r['dice'])} | {pct(r['iou'])} | {pct(r['dice_delta'], True)} |")
        text = "\n".join(lines) + "\n"
        if notes:
            text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        return text

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``<dataset>/<concept>/dice_{worst,canonical,best,spread,mean,ensemble}`` and
        ``overall/...`` (fractions)."""
        import re

        out = {}
        for s in self.summary:
            prefix = "overall" if s["dataset"] == "overall" else f"{s['dataset']}/{s['concept']}"
            for name in ("worst", "canonical", "best", "spread", "mean", "ensemble", "ensemble_delta"):
                value = s[name]
                if value == value:
                    out[re.sub(r"[^0-9A-Za-z_\-. :/]+", "_", f"{prefix}/dice_{name}")] = float(value)
        return out


def robustness_table(records: Mapping[str, Iterable[Mapping[str, Any]]], plan: PhrasingPlan) -> RobustnessTable:
    """The table of the runs' metric records (``records[variant]``, the records of ``medsam3 evaluate`` runs over
    :meth:`PhrasingPlan.items_for` items). A single-phrasing run counts for a class only when it had a phrasing of
    that index, and the record's prompt is that phrasing."""
    per: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    protocol_of: dict[str, str] = {}  # a run of pictures and volumes: each dataset's own
    for variant, recs in records.items():
        index = plan.index(variant)
        for record in recs:
            key = (str(record["dataset"]), int(record["label"]))
            phrasings = plan.phrasings.get(key)
            if phrasings is None:
                continue
            if index is not None and (index >= len(phrasings) or
                                      _key(str(record.get("prompt", ""))) != _key(phrasings[index].text)):
                continue
            if index is not None and record.get("protocol"):
                protocol_of.setdefault(key[0], str(record["protocol"]))
            per.setdefault((*key, variant), []).append(record)
    protocols = ", ".join(dict.fromkeys(protocol_of.values()))  # the table's (the overall row's): every dataset's
    rows, summary = [], []
    for (dataset, value), phrasings in plan.phrasings.items():
        group = plan.groups.get(dataset, "other")
        concept = phrasings[0].text
        base = {"dataset": dataset, "group": group, "label": value, "concept": concept,
                "protocol": protocol_of.get(dataset, "")}
        singles: list[tuple[str, float]] = []
        canonical = math.nan
        for k, phrasing in enumerate(phrasings):
            variant = CANONICAL if k == 0 else f"phrasing-{k}"
            recs = per.get((dataset, value, variant), [])
            if not recs:
                continue
            dice = _mean([_metric(r, "dice") for r in recs])
            if k == 0:
                canonical = dice
            singles.append((phrasing.text, dice))
            rows.append({**base, "variant": variant, "phrasing": phrasing.text, "source": phrasing.source,
                         "n": len(recs), "dice": dice, "dice_std": _std([_metric(r, "dice") for r in recs]),
                         "iou": _mean([_metric(r, "iou") for r in recs]), "dice_delta": dice - canonical})
        ensemble = math.nan
        recs = per.get((dataset, value, ENSEMBLE), [])
        if recs:
            ensemble = _mean([_metric(r, "dice") for r in recs])
            rows.append({**base, "variant": ENSEMBLE, "phrasing": f"ensemble of {len(phrasings)}",
                         "source": "confidence fusion (offline agent planner)", "n": len(recs), "dice": ensemble,
                         "dice_std": _std([_metric(r, "dice") for r in recs]),
                         "iou": _mean([_metric(r, "iou") for r in recs]), "dice_delta": ensemble - canonical})
        if not singles and not recs:
            continue
        varied = len(singles) >= 2  # one phrasing: no worst, spread or mean to speak of
        best = max(singles, key=lambda t: t[1]) if varied else ("", math.nan)
        worst = min(singles, key=lambda t: t[1]) if varied else ("", math.nan)
        summary.append({**base, "phrasings": len(singles), "canonical": canonical, "best": best[1],
                        "best_phrasing": best[0], "worst": worst[1], "worst_phrasing": worst[0],
                        "spread": best[1] - worst[1], "mean": _mean([d for _, d in singles]) if varied else math.nan,
                        "ensemble": ensemble, "ensemble_delta": ensemble - canonical, "varied": varied})
    counted = [s for s in summary if s["varied"]]
    if counted:
        left_out = len(summary) - len(counted)
        overall = {"dataset": "overall", "group": "all", "label": "",
                   "concept": f"{len(counted)} concept{'s' * (len(counted) != 1)}"
                              + (f" ({left_out} with one phrasing left out)" if left_out else ""),
                   "phrasings": sum(s["phrasings"] for s in counted), "best_phrasing": "", "worst_phrasing": "",
                   "protocol": protocols, "varied": True}
        for name in ("canonical", "best", "worst", "spread", "mean", "ensemble", "ensemble_delta"):
            overall[name] = _mean([s[name] for s in counted])
        summary.append(overall)
    return RobustnessTable(rows, summary, protocols or None)


# ------------------------------------------------------------------------------------------------ plot
def robustness_plot(table: RobustnessTable, path: str | Path, title: str | None = None) -> Path:
    """Dice (%) per dataset and concept: every single phrasing (grey dots) with the worst-to-best range, the
    canonical phrasing, the worst one and the ensemble. Matplotlib's object API on an Agg canvas."""
    from .plots import _figure, plain_text, save_figure

    entries = [s for s in table.summary if s["dataset"] != "overall"]
    if not entries:
        raise ValueError("robustness_plot needs at least one dataset row")
    figure = _figure(max(5.0, 1.3 * len(entries) + 2.5), 4.8)
    ax = figure.add_subplot(111)
    first = {"range": True, "phrasing": True}
    for x, s in enumerate(entries):
        dices = [100 * r["dice"] for r in table.rows if r["dataset"] == s["dataset"] and r["label"] == s["label"]
                 and r["variant"] != ENSEMBLE]
        if dices:
            ax.vlines(x, min(dices), max(dices), color="#999999", linewidth=6, alpha=0.35,
                      label="worst–best range" if first["range"] else None)
            ax.scatter([x] * len(dices), dices, color="#555555", s=14, zorder=3,
                       label="a phrasing" if first["phrasing"] else None)
            first = {"range": False, "phrasing": False}
    xs = list(range(len(entries)))

    def series(name: str) -> list[float]:
        return [100 * s[name] if s[name] == s[name] else math.nan for s in entries]

    ax.scatter(xs, series("canonical"), marker="o", s=60, facecolors="none", edgecolors="#0072B2", linewidths=2,
               zorder=4, label="canonical")
    ax.scatter(xs, series("worst"), marker="v", s=55, color="#D55E00", zorder=4, label="worst phrasing")
    ax.scatter([x + 0.22 for x in xs], series("ensemble"), marker="*", s=140, color="#E69F00", edgecolors="black",
               linewidths=0.5, zorder=5, label="ensemble (fusion)")
    for x, s in enumerate(entries):
        if s["spread"] == s["spread"]:
            ax.annotate(f"spread {100 * s['spread']:.1f}", (x, 100 * s["best"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7, color="#555555")
    ax.set_xticks(xs)
    ax.set_xticklabels([plain_text(f"{s['dataset']}\n{s['concept']}") for s in entries], fontsize=8)
    ax.set_xlim(-0.6, len(entries) - 0.4)
    ax.set_ylim(0, 105)
    ax.set_ylabel("Dice (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.8)
    heading = title or "Dice per prompt phrasing"
    if table.protocol:
        heading += f" ({table.protocol})"
    ax.set_title(plain_text(heading), fontsize=10)
    return save_figure(figure, path)
