"""``medsam3 reproduce medical-sam3|medsam3``: a paper's table, reproduced in one command, beside its published numbers.

Finds every evaluation set of the table under ``--data-root`` (one folder per dataset), builds its datalist with the
paper's split rules and prompts, evaluates ``--checkpoint`` (and ``--baseline``) with the paper's protocol and writes
ours / published / Δ, labelled means, radar charts, a manifest and one MLflow run into ``--out``. Only the standard
library is imported here; the work happens in :mod:`medsam3_monai.reproduce`.
"""

from __future__ import annotations

import argparse
import sys

from .agent_cli import add_planner_options  # stdlib only
from .arguments import at_least

__all__ = ["add_parser", "run"]

_PAPERS = {
    "medical-sam3": ("Medical SAM3 Table 3: 10 internal + 7 external sets, SAM3 vs Medical SAM3, text prompts",
                     "Medical SAM3 weights (the release file, or any source `medsam3 evaluate` takes)",
                     "SAM3 weights for the SAM3 column (facebook/sam3 folder or sam3.pt)"),
    "medsam3": ("MedSAM3's comparison: BUSI, RIM-ONE, ISIC 2018, Kvasir-SEG; SAM 3 vs MedSAM-3, T and T+I",
                "MedSAM3 weights (e.g. a bundle trained with --mode medsam3: models/model.pt)",
                "SAM 3 weights for the SAM 3 columns (facebook/sam3 folder or sam3.pt)"),
}

_EPILOG = """\
The data root holds one folder per dataset, named like the dataset or a catalogue alias (Kvasir-SEG, DRIVE,
Dataset_BUSI_with_GT, ...) in the layout `medsam3 datalist --list` shows. Datasets that are missing, unreadable or
have no converter yet are listed with what was expected, and stay in the table as not found; averages over the
found datasets only are labelled so. Published numbers come from datasets_meta/papers.json with their sources.
Guide: bundles/medsam3/docs/reproduce.md.
"""


def _add_paper(subparsers: argparse._SubParsersAction, paper: str) -> None:
    summary, checkpoint, baseline = _PAPERS[paper]
    parser = subparsers.add_parser(paper, help=summary, description=summary, epilog=_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, metavar="DIR", help="folder with one sub-folder per dataset")
    parser.add_argument("--checkpoint", required=True, metavar="SRC", help=checkpoint + "; 'tiny' tries the machinery")
    parser.add_argument("--baseline", default=None, metavar="SRC", help=baseline + " (optional: without it that column "
                                                                                   "is 'not run')")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    if paper == "medsam3":
        parser.add_argument("--protocol", action="append", choices=("T", "T+I"), default=None, dest="protocols",
                            help="T (text) and/or T+I (text + box of the truth's largest component); default both")
        agent = parser.add_argument_group("MedSAM-3 agent row (--agent)")
        agent.add_argument("--agent", action="store_true",
                           help="also evaluate the MedSAM3 agent (the --checkpoint, text requests) on each found "
                                "dataset: the 'MedSAM-3 agent' column, traces in OUT/medsam3_agent/<dataset>/traces")
        add_planner_options(agent)
    else:
        parser.add_argument("--release-rules", action="store_true",
                            help="score the 2D datasets by the Medical-SAM3 release's evaluation script: the best "
                                 "query above 0.1 (else an empty mask), images without foreground skipped; volumes "
                                 "as without it (default: the papers' top query, empty truths scored)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size: tiny 112 by default; a checkpoint file without a configuration "
                             "(sam3.pt, a Medical-SAM3 file) is built at it (default 1008; 504 for the release's 3D "
                             "checkpoint); others must match theirs")
    parser.add_argument("--max-cases", type=int, default=None, metavar="N",
                        help="at most N cases per dataset (a seeded sample; the table then says it is not the "
                             "paper's protocol)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits and of the --max-cases sample (42)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tracker", default="auto", metavar="SRC", help="3D tracker (as `medsam3 evaluate`)")
    parser.add_argument("--overlays", type=at_least(0), default=2, metavar="N",
                        help="overlay images per dataset (2; 0: none)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///OUT/mlruns.db, artifacts in OUT/mlartifacts)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (medsam3-reproduce)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip cases whose files cannot be read (listed per dataset) instead of stopping: in "
                             "the datasets' layouts (an image without its mask, a broken header; named in "
                             "datasets.md) and when a case loads")
    parser.add_argument("--dry-run", action="store_true",
                        help="only find the datasets and build their datalists in memory: print what was found and "
                             "what was expected; load and write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--num-workers", type=at_least(0), default=0, metavar="N", help="data loader workers (0)")
    parser.set_defaults(func=run, paper=paper)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reproduce", help="reproduce a paper's table (Medical SAM3 Table 3, MedSAM3) beside its published numbers",
        description="Reproduce a paper's table in one command: find the datasets, evaluate, compare with the "
                    "published numbers.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    papers = parser.add_subparsers(dest="paper", metavar="PAPER", required=True)
    for paper in _PAPERS:
        _add_paper(papers, paper)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..reproduce.runner import ReproduceSettings, reproduce

    if args.max_cases is not None and args.max_cases < 1:
        raise ValueError(f"--max-cases must be at least 1, got {args.max_cases}")
    settings = ReproduceSettings(
        paper=args.paper, data_root=args.data_root, checkpoint=args.checkpoint, out=args.out, baseline=args.baseline,
        image_size=args.image_size, max_cases=args.max_cases, seed=args.seed,
        protocols=tuple(getattr(args, "protocols", None) or ()) or None, device=args.device, tracker=args.tracker,
        overlays=args.overlays, tracking_uri=args.tracking_uri, experiment=args.experiment,
        skip_unreadable=args.skip_unreadable, release_rules=bool(getattr(args, "release_rules", False)),
        progress=not args.no_progress, num_workers=args.num_workers,
        dry_run=args.dry_run, agent=bool(getattr(args, "agent", False)), llm=getattr(args, "llm", "auto"),
        llm_url=getattr(args, "llm_url", None), llm_model=getattr(args, "llm_model", None),
        api_key_env=getattr(args, "api_key_env", None),
        command=["medsam3", *getattr(args, "argv", sys.argv[1:])],
    )
    result = reproduce(settings)
    if args.dry_run:
        return 0
    print((result.out_dir / "table.md").read_text(encoding="utf-8"))
    where = f"; MLflow run {result.run_id} in {result.tracking_uri}" if result.run_id else ""
    print(f"medsam3 reproduce: everything in {result.out_dir}{where}", file=sys.stderr)
    return 0
