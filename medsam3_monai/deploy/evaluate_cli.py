"""``medsam3 evaluate``: evaluate one checkpoint (or compare two) on datalists and write the report.

One checkpoint -> ``OUT/{cases.csv, table.md, table.csv, radar.png, overlays/}`` and an MLflow run in
``OUT/mlruns.db``. Two checkpoints -> the same report per checkpoint under ``OUT/<label>/`` plus
``OUT/comparison.{md,csv}`` (Δ = second − first), with an MLflow parent run holding the comparison and one
child run per checkpoint. Input errors (missing datalist, empty split, unreadable checkpoint, OUT not empty)
are reported before anything is written; a failure later removes what was written (no partial OUT).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ..data.selection import SPLIT_CHOICES  # light (the data package imports its submodules on first use)
from ..protocol_registry import DEFAULT_PROTOCOL, PROTOCOLS

__all__ = ["add_parser", "checkpoint_labels", "run"]

_EPILOG = """\
split: 'auto' (default) takes each datalist's test list when it has one, else its validation list
(several datasets have no official test split); --max-cases N keeps the first N cases of each datalist.
Protocols (2D): """ + "; ".join(f"{p.name} = {p.describe('--score-threshold')}" for p in PROTOCOLS.values()) + """.
--box-prompts adds the box of the ground truth's largest connected component (T+I). Volumes: detector on every slice (top query, score >=
--score-threshold) merged with SAM3 tracker propagation from the most confident slice (--tracker).
Metrics are computed in each input's own geometry; NSD (2 mm) and HD95 where the spacing is known.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint (or compare two) on datalists: CSV, tables, radar chart, overlays, MLflow",
        description="Per-case and per-dataset Dice / IoU (NSD / HD95 with known spacing) of text-prompted "
                    "segmentation, as in Medical SAM3 Table 3.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--datalist", action="append", required=True, metavar="FILE",
                        help="datalist JSON (repeat for several datasets)")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="SRC",
                        help="'tiny', an HF folder, sam3.pt, a Medical-SAM3 or medsam3-monai checkpoint; "
                             "give it twice to compare two checkpoints")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (must not exist or be empty)")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                        help="cases to evaluate (default auto: test if present, else validation)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help=f"2D protocol ({DEFAULT_PROTOCOL})")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="query score threshold of the threshold protocol and of volume detections (0.5)")
    parser.add_argument("--box-prompts", action="store_true",
                        help="text + box prompts: the ground truth's largest component box (2D images)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size of the tiny network (default 112); must match a real checkpoint")
    parser.add_argument("--max-cases", type=int, default=None, metavar="N",
                        help="at most N cases per datalist: a seeded sample (--seed), kept in file order")
    parser.add_argument("--seed", type=int, default=42, help="seed of the --max-cases sample (42)")
    parser.add_argument("--tracker", default="auto", metavar="SRC",
                        help="3D tracker: auto (tiny for tiny, the checkpoint's for a facebook/sam3 folder, "
                             "else none), none, tiny or an HF folder")
    parser.add_argument("--overlays", type=int, default=8, metavar="N", help="overlay images to draw (8; 0: none)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///OUT/mlruns.db, artifacts in OUT/mlartifacts)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (medsam3-evaluate)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip cases whose image or mask cannot be read (listed in OUT/skipped.csv and counted "
                             "at the end) instead of stopping at the first one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (0)")
    parser.set_defaults(func=run)
    return parser


# ------------------------------------------------------------------------------------------------ pieces
def checkpoint_labels(sources: list[str]) -> list[str]:
    """Short distinct names for report folders, table headers and MLflow run names ('tiny', a file's stem, a
    folder's name; a bundle's ``models/model.pt`` is named after the bundle folder)."""
    names = []
    for source in sources:
        path = Path(source)
        if source == "tiny":
            name = source
        elif path.name == "model.pt" and path.parent.name == "models":  # a bundle's weights: the bundle's name
            name = path.parent.parent.resolve().name
        else:
            name = path.stem if path.is_file() else path.name
        names.append(re.sub(r"[^0-9A-Za-z._-]+", "_", name) or "checkpoint")
    if len(set(names)) < len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return names


# ------------------------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    import torch

    from ..engines.evaluation import evaluation_items, is_volume_item, run_evaluation
    from ..engines.reports import default_tracking_uri, open_experiment
    from ..networks import load_network
    from ..networks.tracker import resolve_tracker

    sources = list(args.checkpoint)
    if len(sources) > 2:
        raise ValueError(f"--checkpoint given {len(sources)} times; evaluate one checkpoint or compare two")
    items = evaluation_items(args.datalist, args.split, args.max_cases, seed=args.seed)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new --out")
    networks = [load_network(source, args.image_size) for source in sources]
    volumes = sum(is_volume_item(item) for item in items)
    trackers = [resolve_tracker(args.tracker, s, n, described=True) if volumes else (None, "none")
                for s, n in zip(sources, networks)]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    labels = checkpoint_labels(sources)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        tracking_uri, client, parent = args.tracking_uri, None, None
        if len(sources) == 2 and not args.no_mlflow:
            tracking_uri = tracking_uri or default_tracking_uri(out)
            client, experiment_id = open_experiment(tracking_uri, args.experiment or "medsam3-evaluate",
                                                    out / "mlartifacts" if args.tracking_uri is None else None)
            parent = client.create_run(experiment_id, run_name=f"{labels[0]} vs {labels[1]}").info.run_id
        reports = []
        for source, label, network, (tracker, tracker_name) in zip(sources, labels, networks, trackers):
            report = run_evaluation(
                network, items, out if len(sources) == 1 else out / label, checkpoint=source,
                datalists=[Path(p).resolve() for p in args.datalist], split=args.split, max_cases=args.max_cases,
                protocol=args.protocol, score_threshold=args.score_threshold, box_prompts=args.box_prompts,
                tracker=tracker, tracker_name=tracker_name, device=device, max_overlays=args.overlays,
                progress=not args.no_progress, num_workers=args.num_workers, mlflow=not args.no_mlflow,
                tracking_uri=tracking_uri, experiment=args.experiment, run_name=label, parent_run_id=parent,
                skip_unreadable=args.skip_unreadable,
            )
            network.to("cpu")
            if tracker is not None:
                tracker.to("cpu")
            reports.append(report)
            if report.unreadable:
                print(f"medsam3 evaluate: skipped {len(report.unreadable)} unreadable case(s) of {len(items)}; "
                      f"listed in {report.out_dir / 'skipped.csv'}", file=sys.stderr)
            print(f"== {label} ({source})\n{(report.out_dir / 'table.md').read_text()}")
        if len(reports) == 2:
            _write_comparison(reports, labels, out, client, parent)
    except BaseException:
        if parent is not None:  # an external tracking store keeps the run: mark it failed
            try:
                client.set_terminated(parent, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise
    where = f"; MLflow: {tracking_uri or default_tracking_uri(out)}" if not args.no_mlflow else ""
    print(f"medsam3 evaluate: reports in {out}{where}", file=sys.stderr)
    return 0


def _write_comparison(reports: list[Any], labels: list[str], out: Path, client: Any, parent: str | None) -> None:
    from ..metrics.aggregate import compare

    comparison = compare(reports[0].table, reports[1].table, labels=(labels[0], labels[1]))
    comparison.to_csv(out / "comparison.csv")
    title = f"{labels[1]} vs {labels[0]} (Δ = {labels[1]} − {labels[0]}; protocol {reports[0].table.protocol})"
    (out / "comparison.md").write_text(comparison.to_markdown(title=title), encoding="utf-8")
    print(f"== comparison\n{(out / 'comparison.md').read_text()}")
    if client is None:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for row in comparison.rows:
        prefix = {"dataset": row["name"], "group": f"group/{row['name']}", "overall": "overall"}[row["kind"]]
        for metric in comparison.metrics:
            value = row[f"{metric}_delta"]
            if value == value:
                key = re.sub(r"[^0-9A-Za-z_\-. :/]+", "_", f"{prefix}/{metric}_delta")
                metrics.append(Metric(key, float(value), now, 0))
    client.log_batch(parent, metrics=metrics)
    for name in ("comparison.csv", "comparison.md"):
        client.log_artifact(parent, str(out / name))
    client.set_terminated(parent)
