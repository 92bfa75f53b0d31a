"""One reproduction end to end: find the datasets, build their datalists, evaluate every checkpoint of the paper's
table with its prompts and protocol, write the table beside the published numbers, charts, manifest, MLflow run.

Output folder (``--out``)::

    table.md, table.csv         the reproduction: ours, published and Δ per dataset and column, labelled means
    datasets.md                 every dataset of the table: found (folder, splits, prompt, Table 1 count) or not
                                (the folder and layout that were expected)
    timing.md                   measured seconds per case and the full-run estimate per dataset
    radar.png, radar_*.png      the paper's figure with our numbers; ours vs published per checkpoint
    datalists/<dataset>.json    the datalists evaluated (paper prompts, 85/15 seed 42, official test kept)
    <column>/cases.csv, table.md, table.csv   all datasets of one checkpoint (and protocol)
    <column>/<dataset>/...      the evaluation report of one dataset (``medsam3 evaluate``'s files, overlays)
    medsam3_agent/<dataset>/traces/, agent_cases.csv   with ``--agent``: the agent's traces, one row per request
    manifest.json               command, settings, datasets, checkpoints with SHA-256, timings, versions, commit
    mlruns.db, mlartifacts/     the single MLflow run holding all of the above

Nothing is written before the inputs are checked (data root, datasets, checkpoints); a failure later removes the
folder (as ``medsam3 evaluate`` does).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..agent.runner import AgentSettings, check_planner, planner_name
from ..deploy.arguments import check_writable, remove_output
from .discovery import DatasetStatus, discover
from .manifest import checkpoint_files
from .published import AGENT_KEY, PaperTable, medsam3_agent_column, paper_table
from .report import Timing, datasets_markdown, table_notes, timing_markdown
from .table import ReproductionTable, build_table

__all__ = ["ReproduceSettings", "Reproduction", "reproduce"]

AGENT_NOTE = ("MedSAM-3 agent: not run (add --agent, with --llm none|openai|auto and --llm-url/--llm-model for an "
              "MLLM planner, to score it beside the published value; bundles/medsam3/docs/agent.md).")


@dataclass
class ReproduceSettings:
    """The command's options (``medsam3 reproduce PAPER --help``)."""

    paper: str
    data_root: str
    checkpoint: str
    out: str
    baseline: str | None = None
    image_size: int | None = None
    max_cases: int | None = None
    seed: int = 42
    protocols: tuple[str, ...] | None = None
    device: str = "auto"
    tracker: str = "auto"
    overlays: int = 2
    tracking_uri: str | None = None
    experiment: str | None = None
    mlflow: bool = True
    skip_unreadable: bool = False
    release_rules: bool = False
    progress: bool = True
    num_workers: int = 0
    dry_run: bool = False
    agent: bool = False
    llm: str = "auto"
    llm_url: str | None = None
    llm_model: str | None = None
    api_key_env: str | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class Reproduction:
    """What :func:`reproduce` did: the datasets, the table, timings and where everything is."""

    out_dir: Path | None
    paper: PaperTable
    statuses: list[DatasetStatus]
    table: ReproductionTable | None = None
    timings: list[Timing] = field(default_factory=list)
    run_id: str | None = None
    tracking_uri: str | None = None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _columns(paper: PaperTable, settings: ReproduceSettings) -> list[tuple[Any, str]]:
    """(column, checkpoint source) of every column this run evaluates."""
    protocols = set(settings.protocols or paper.protocols)
    unknown = protocols - set(paper.protocols)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)} for {paper.paper}; choose from "
                         f"{', '.join(paper.protocols)}")
    sources = {"checkpoint": settings.checkpoint, "baseline": settings.baseline}
    return [(c, sources[c.runs]) for c in paper.columns
            if c.runs and sources[c.runs] and (c.protocol or "T") in protocols]


def _agent_settings(settings: ReproduceSettings) -> Any:
    """The agent's planner settings (``--agent``), checked before anything is loaded or written."""
    agent = AgentSettings(llm=settings.llm, llm_url=settings.llm_url, llm_model=settings.llm_model,
                          api_key_env=settings.api_key_env)
    check_planner(agent)
    return agent


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new --out")
    check_writable(out, "--out", folder=True)


def reproduce(settings: ReproduceSettings, say: Callable[[str], None] = _say) -> Reproduction:
    """Run the reproduction described by ``settings`` (see the module doc for the output)."""
    paper = paper_table(settings.paper)
    out = Path(settings.out) if settings.out else None
    if out is not None:  # (--dry-run too: it checks what the run would refuse)
        _check_out(out)
    agent = None
    if settings.agent:
        if paper.paper != "medsam3":
            raise ValueError(f"--agent is MedSAM3's agent row: `medsam3 reproduce medsam3`, not {paper.paper}")
        if "T" not in (settings.protocols or paper.protocols):
            raise ValueError("--agent answers text requests (protocol T): include --protocol T")
        agent = _agent_settings(settings)
        paper = replace(paper, columns=paper.columns + (medsam3_agent_column(),))
    runs = _columns(paper, settings)
    statuses = discover(settings.data_root, paper, seed=settings.seed, skip_unreadable=settings.skip_unreadable)
    found = [s for s in statuses if s.found]
    say(f"{paper.title}: {len(found)} of {len(statuses)} evaluation sets found under {settings.data_root}")
    for status in statuses:
        say("  " + status.line())
    for status in statuses:
        if status.split_warning():
            say(f"WARNING: {status.split_warning(settings.max_cases)}")
    result = Reproduction(out, paper, statuses)
    if not found:
        broken = [s.dataset for s in statuses if s.status == "unreadable"]
        if broken:
            raise ValueError(f"none of the {len(statuses)} evaluation sets of {paper.title} under "
                             f"{settings.data_root} can be evaluated: {', '.join(broken)} "
                             f"{'is' if len(broken) == 1 else 'are'} there but not readable in the expected layout "
                             "(listed above): repair or remove those files")
        raise FileNotFoundError(f"none of the {len(statuses)} evaluation sets of {paper.title} was found under "
                                f"{settings.data_root}: one folder per dataset, named like it, in its layout "
                                "(listed above)")
    from ..bundle import check_network_source

    for source in sorted({source for _, source in runs}):  # a mistyped weights path: before the data, dry run too
        check_network_source(source, settings.image_size)
    if settings.dry_run:
        return result
    if settings.mlflow:
        from ..engines.reports import check_tracking_uri

        check_tracking_uri(settings.tracking_uri)

    from ..networks import load_network

    sources = {source for _, source in runs}
    networks = {source: load_network(source, settings.image_size) for source in sorted(sources)}
    if sources - {"tiny"}:
        say("SHA-256 of the checkpoint files ...")
    checkpoints = {source: checkpoint_files(source) for source in sorted(sources)}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    run = None
    try:
        if settings.mlflow:
            from .tracking import ReproductionRun

            run = ReproductionRun(out, settings.tracking_uri, settings.experiment, run_name=paper.paper)
            result.run_id, result.tracking_uri = run.run_id, run.tracking_uri
        _write_outputs(settings, paper, statuses, runs, networks, checkpoints, result, run, say, agent)
    except BaseException:
        if run is not None:
            run.fail()
        remove_output(out, created)
        raise
    return result


#: the Medical-SAM3 release's 2D evaluation (``inference/run_medsam3_evaluation.py``): the best query above 0.1, images
#: without foreground skipped (``--release-rules``; conventions.md, "The Medical-SAM3 release's own scripts")
RELEASE_RULES_2D = {"protocol": "top_query_floor", "score_threshold": 0.1, "skip_empty_truth": True}


def evaluation_rules(settings: ReproduceSettings, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``run_evaluation``'s protocol settings for one dataset's ``items``: the papers' ``top_query`` (empty truths
    scored), or with ``release_rules`` the release's 2D rules for a 2D dataset (volumes keep ``top_query`` and
    their 0.5 detection threshold, which the release's 3D inference uses too)."""
    from ..data.selection import is_volume_item

    if settings.release_rules and not any(is_volume_item(item) for item in items):
        return dict(RELEASE_RULES_2D)
    return {"protocol": "top_query"}


def _evaluate(settings: ReproduceSettings, paper: PaperTable, statuses: Sequence[DatasetStatus], runs: Sequence,
              networks: dict, datalists: dict[str, Path], out: Path, say: Callable[[str], None], agent: Any = None):
    """Every (column, dataset): ``run_evaluation`` (the agent column through the agent's case inferer, its traces
    and ``agent_cases.csv`` per dataset); returns ours (column -> dataset -> Dice %), cases, timings, device and
    the agent's request rows."""
    from ..data.selection import evaluation_items, is_volume_item
    from ..engines.evaluation import DEFAULT_AGENT_REQUEST, AgentRecorder, agent_evaluation, run_evaluation
    from ..engines.reports import NothingReadable
    from ..metrics.aggregate import aggregate, write_cases_csv
    from ..networks.tracker import resolve_tracker
    from ..tensors import resolve_device

    device = resolve_device(settings.device)
    found = [s for s in statuses if s.found]
    items = {s.dataset: evaluation_items([datalists[s.dataset]], "auto", settings.max_cases, seed=settings.seed)
             for s in found}
    for status in found:
        for item in items[status.dataset]:
            item["group"] = status.group
    volumes = any(is_volume_item(item) for batch in items.values() for item in batch)
    ours: dict[str, dict[str, float]] = {}
    cases: dict[str, int] = {}
    skipped: dict[str, int] = {}  # dataset -> unreadable cases left out (--skip-unreadable)
    unreadable_example: dict[str, str] = {}  # dataset none of whose cases read -> its first case's error
    timings: list[Timing] = []
    agent_rows: list[dict[str, Any]] = []
    for column, source in runs:
        network = networks[source]
        tracker, tracker_name = resolve_tracker(settings.tracker, source, network, needed=volumes, described=True)
        records = []
        ours[column.key] = {}
        for status in [s for s in found if s.found]:  # (a dataset none of whose cases was readable drops out)
            start = time.perf_counter()
            extra: dict[str, Any] = {}
            batch = items[status.dataset]
            if column.key == AGENT_KEY:
                recorder = AgentRecorder(out / column.key / status.dataset / "traces", on_error="fail")
                batch, inferer = agent_evaluation(batch, agent, recorder, DEFAULT_AGENT_REQUEST)
                extra = {"inferer": inferer,
                         "notes": [f"Agent: planner {planner_name(agent)}; request per class "
                                   f"{DEFAULT_AGENT_REQUEST!r}. Traces in traces/, one row per request in "
                                   "agent_cases.csv."]}
            try:
                report = run_evaluation(
                    network, batch, out / column.key / status.dataset, checkpoint=source,
                    datalists=[datalists[status.dataset]], split="auto", max_cases=settings.max_cases,
                    box_prompts=column.box_prompts, tracker=tracker, tracker_name=tracker_name,
                    device=device, max_overlays=settings.overlays, progress=settings.progress,
                    num_workers=settings.num_workers, mlflow=False, skip_unreadable=settings.skip_unreadable,
                    **evaluation_rules(settings, batch), **extra,
                )
            except NothingReadable as error:  # (--skip-unreadable) the other datasets are still scored
                _no_readable_case(status, error.unreadable, out / column.key / status.dataset)
                skipped[status.dataset] = len(error.unreadable)
                unreadable_example[status.dataset] = error.unreadable[0].error
                for column_scores in ours.values():
                    column_scores.pop(status.dataset, None)
                say(f"  {column.key:<14} {status.dataset}: {status.message}")
                continue
            if column.key == AGENT_KEY:
                recorder.write_csv(out / column.key / status.dataset / "agent_cases.csv", report.records)
                agent_rows += recorder.rows
            seconds = time.perf_counter() - start
            dice = 100.0 * report.table.row(status.dataset, "dataset")["dice"]
            evaluated = len(items[status.dataset]) - len(report.unreadable)
            ours[column.key][status.dataset] = dice
            cases[status.dataset] = evaluated
            if report.unreadable:
                skipped[status.dataset] = max(skipped.get(status.dataset, 0), len(report.unreadable))
            records += report.scored_records()[0]  # (--release-rules: without the empty truths it skipped)
            timings.append(Timing(column.key, status.dataset, evaluated, seconds, status.evaluation_cases()))
            published = column.published.get(status.dataset)
            say(f"  {column.key:<14} {status.dataset}: Dice {dice:.1f} (published "
                f"{'unknown' if published is None else f'{published:.1f}'}), {evaluated} case(s) in {seconds:.1f} s")
        network.to("cpu")
        if tracker is not None:
            tracker.to("cpu")
        if not any(s.found for s in found):  # (the output folder goes: say the files here)
            raise ValueError("no dataset could be scored: no case of " + "; of ".join(
                f"{dataset} ({skipped[dataset]} case(s); e.g. {example})" for dataset, example
                in unreadable_example.items()) + " could be read (--skip-unreadable): repair or replace those files")
        table = aggregate(records)
        folder = out / column.key
        write_cases_csv(records, folder / "cases.csv")
        table.to_csv(folder / "table.csv")
        (folder / "table.md").write_text(table.to_markdown(title=f"{column.method} ({column.protocol}), `{source}`"),
                                         encoding="utf-8")
    return ours, cases, skipped, timings, str(device), agent_rows


def _no_readable_case(status: DatasetStatus, unreadable: Sequence[Any], folder: Path) -> None:
    """Mark a found dataset none of whose cases could be read (``--skip-unreadable``) as ``unreadable_cases`` and
    write its ``skipped.csv`` in ``folder``, naming each case's files and error."""
    from ..engines.reports import write_skipped_csv

    folder.mkdir(parents=True, exist_ok=True)
    write_skipped_csv(folder / "skipped.csv", unreadable)
    status.status = "unreadable_cases"
    status.message = (f"none of its {len(unreadable)} case(s) could be read (--skip-unreadable), e.g. "
                      f"{unreadable[0].error}; {folder / 'skipped.csv'} names them")


def _write_outputs(settings: ReproduceSettings, paper: PaperTable, statuses: list[DatasetStatus], runs: Sequence,
                   networks: dict, checkpoints: dict, result: Reproduction, run: Any,
                   say: Callable[[str], None], agent: Any = None) -> None:
    from ..data.datalist import write_datalist
    from .charts import reproduction_charts
    from .manifest import write_manifest
    from .tracking import table_metrics

    out = result.out_dir
    datalists = {s.dataset: write_datalist(s.datalist, out / "datalists" / f"{s.dataset}.json")
                 for s in statuses if s.found}
    ours, cases, skipped, timings, device, agent_rows = _evaluate(settings, paper, statuses, runs, networks,
                                                                  datalists, out, say, agent)
    result.timings = timings
    ran = {column.key: True for column, _ in runs}
    sources = {column.key: source for column, source in runs}
    notes = table_notes(paper, statuses, settings, ran, sources)
    if skipped:
        notes.insert(0, "WARNING: unreadable cases left out (--skip-unreadable), so n is below the split's count: "
                        + ", ".join(f"{dataset} {n}" for dataset, n in skipped.items())
                        + " (each dataset's skipped.csv names them).")
    left_out = {s.dataset: len(s.left_out) for s in statuses if s.found and s.left_out}
    if left_out:
        notes.insert(0, "WARNING: files of the datasets' layouts left out (a missing mask, an unreadable header; "
                        "--skip-unreadable), so the splits hold fewer images than the datasets publish: "
                        + ", ".join(f"{dataset} {n}" for dataset, n in left_out.items())
                        + " (datasets.md names them).")
    if paper.paper == "medsam3":
        notes.append(_agent_note(paper, agent, agent_rows) if agent is not None else AGENT_NOTE)
    shown = {s.dataset: s.status.replace("_", " ").replace("missing", "not found") for s in statuses}
    table = build_table(paper, ours, shown, cases, ran, notes, splits={s.dataset: s.evaluated_split for s in statuses})
    result.table = table
    table.to_csv(out / "table.csv")
    protocols = [p for p in paper.protocols if p in (settings.protocols or paper.protocols)]
    if len(paper.protocols) > 1:
        sections = [table.to_markdown([c for c in table.columns if c.protocol in (None, p)],
                                      title=f"{paper.title}, protocol {p} (Dice %)", notes=False)
                    for p in protocols]
        text = "\n".join(sections) + "".join(f"\n- {n}" for n in table.notes) + "\n"
    else:
        text = table.to_markdown(title=f"{paper.title} (Dice %)")
    (out / "table.md").write_text(text, encoding="utf-8")
    charts = []
    for protocol in protocols:
        chosen = {c.key: ours[c.key] for c, _ in runs if (c.protocol or "T") == protocol}
        suffix = "" if len(paper.protocols) == 1 else "_" + protocol.replace("+", "")
        charts += reproduction_charts(paper, chosen, out, protocol=f"top_query, {protocol}", suffix=suffix)
    (out / "datasets.md").write_text(datasets_markdown(paper.title, statuses, Path(settings.data_root)),
                                     encoding="utf-8")
    (out / "timing.md").write_text(timing_markdown(timings, device), encoding="utf-8")
    manifest = {
        "paper": paper.paper, "title": paper.title, "status": "complete", "command": settings.command,
        "settings": {k: v for k, v in asdict(settings).items() if k != "command"},
        "mlflow": {"tracking_uri": result.tracking_uri, "run_id": result.run_id},
        "checkpoints": [{"role": role, "source": source, "files": checkpoints[source]}
                        for role, source in (("checkpoint", settings.checkpoint), ("baseline", settings.baseline))
                        if source in checkpoints],
        "device": device,
        "datasets": [{"dataset": s.dataset, "group": s.group, "status": s.status, "folder": str(s.folder or ""),
                      "message": s.message, "counts": s.counts, "images_found": s.images_found,
                      "table1_images": s.published_images, "prompts": s.prompts,
                      "evaluated_split": s.evaluated_split,
                      "warning": s.split_warning(settings.max_cases) or None} for s in statuses],
        "timings": [t.as_dict() for t in timings],
        "skipped_unreadable_cases": skipped,
        "left_out_unreadable_files": {s.dataset: s.left_out for s in statuses if s.found and s.left_out},
        "published_sources": list(paper.sources),
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                        and not p.relative_to(out).parts[0].startswith(("mlruns", "mlartifacts"))) + ["manifest.json"],
        "charts": [p.name for p in charts],
    }
    write_manifest(out / "manifest.json", manifest)
    if run is not None:
        params = {"paper": paper.paper, "data_root": settings.data_root, "checkpoint": settings.checkpoint,
                  "baseline": settings.baseline or "", "image_size": settings.image_size or "checkpoint's",
                  "max_cases": settings.max_cases or "all", "seed": settings.seed, "device": device,
                  "release_rules": bool(settings.release_rules),
                  "found": ", ".join(s.dataset for s in statuses if s.found),
                  "not_found": ", ".join(s.dataset for s in statuses if not s.found)}
        if agent is not None:
            params.update(agent_planner=planner_name(agent), llm=settings.llm, llm_url=settings.llm_url or "",
                          llm_model=settings.llm_model or "", api_key_env=settings.api_key_env or "",
                          agent_requests=len(agent_rows))
        for entry in manifest["checkpoints"]:
            for file in entry["files"]:
                source = Path(entry["source"]).resolve()
                name = Path(file["path"]).relative_to(source) if source.is_dir() else Path(file["path"]).name
                params[f"sha256/{entry['role']}/{name}"] = file["sha256"]
        run.finish(params, table_metrics(table))


def _agent_note(paper: PaperTable, agent: Any, rows: Sequence[dict[str, Any]]) -> str:
    """The table's line on the agent column: planner, requests by status, where the traces are, published or not."""
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    counted = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "none"
    published = paper.column(AGENT_KEY).published
    known = ("published values from the catalogue" if any(v is not None for v in published.values())
             else "its published values are not in the catalogue (unknown)")
    return (f"MedSAM-3 agent: the --checkpoint driven by the agent, planner {planner_name(agent)}, text requests "
            f"(protocol T); {len(rows)} requests ({counted}); traces in {AGENT_KEY}/<dataset>/traces, one row per "
            f"request in {AGENT_KEY}/<dataset>/agent_cases.csv (all in the MLflow run); {known}.")
