"""`medsam3 demo`: the whole pipeline in minutes on a laptop, or on your data and weights.

1. data: a phantom dataset with two named concepts ("bright disc", "dark bar"; ``data.phantoms``), or the
   datalists given with ``--data``;
2. training: the real training bundle (``bundles/medsam3/configs/train.json``) through MONAI's
   ``ConfigWorkflow``, MLflow tracking on, a progress bar per epoch;
3. evaluation: the real evaluator (``medsam3 evaluate``) of the starting checkpoint and of the fine-tuned one
   on the held-out split (protocol ``--protocol``), side by side with Δ columns: per-case CSV, Markdown/CSV tables, radar chart,
   overlays, MLflow runs.

It prints where everything is. With ``--checkpoint tiny`` (the default) nothing is downloaded and no weights are
needed; the tiny network learns from scratch, so the demo uses one learning rate for every group
(``--lr``, 5e-4) instead of the papers' fine-tuning rates.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from ..bundle import BUNDLE_CONFIGS, sqlite_uri
from ..protocol_registry import DEFAULT_PROTOCOL, PROTOCOLS
from .arguments import at_least, check_writable
from .train_cli import one_rate_overrides


def _rate(value: str) -> float:
    """``--lr``: a learning rate >= 0 (0: the papers' rates)."""
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not rate >= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give a learning rate > 0, or 0 for the papers' rates")
    return rate


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="build a small labelled dataset, fine-tune, evaluate, report (no weights or downloads needed)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default ./runs/demo-<date>-<time>; must not exist or be empty)")
    parser.add_argument("--data", action="append", metavar="DATALIST",
                        help="train and evaluate on these datalists instead of the phantoms (repeatable)")
    parser.add_argument("--checkpoint", default="tiny", metavar="SRC",
                        help="starting weights: tiny (random init, default), an HF folder, sam3.pt, ...")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size (tiny: 112; real weights: 1008)")
    parser.add_argument("--epochs", type=at_least(1), default=None,
                        help="training epochs (phantoms: 20; --quick: 2; --data: 5)")
    parser.add_argument("--batch-size", type=at_least(1), default=4, metavar="N",
                        help="datalist items per training step (default 4)")
    parser.add_argument("--lr", type=_rate, default=5e-4,
                        help="one learning rate for every parameter group (tiny from scratch); 0: the papers' rates")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="evaluation protocol (default: the papers' top_query)")
    parser.add_argument("--quick", action="store_true", help="a reduced run (fewer images and epochs) for CI")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    parser.set_defaults(func=run)
    return parser


def _check_model_arguments(args: argparse.Namespace) -> None:
    """The slice size and the starting checkpoint, checked before any data is made, by the training bundle's own check
    (``bundle.check_network_source``: a checkpoint file's tensor names, a folder's config.json, the size a checkpoint
    stores); the training bundle loads and checks the weights themselves."""
    from ..bundle import check_network_source, front_words

    try:
        check_network_source(args.checkpoint, args.image_size)
    except ValueError as err:  # (a size the checkpoint does not work at: named as this command's option)
        raise ValueError(front_words(str(err), {"image_size": "--image-size"})) from None


def _train(datalists: list[str], out: Path, args: argparse.Namespace, epochs: int) -> Path:
    """Run the training bundle; returns the final model path."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    overrides: dict = {
        "bundle_root": str(out), "datalists": datalists, "checkpoint": args.checkpoint, "max_epochs": epochs,
        "batch_size": args.batch_size, "save_interval": 10**6, "val_interval": 10**6, "resume": False,
        "log_interval": 5,  # short runs: loss terms and learning rates reach MLflow every 5 iterations
    }
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.device != "auto":
        overrides["device"] = f"$torch.device('{args.device}')"
    if args.lr > 0:
        overrides |= one_rate_overrides(args.lr)
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"), meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=str(BUNDLE_CONFIGS / "logging.conf"), workflow_type="train", tracking=str(BUNDLE_CONFIGS / "mlflow.json"), **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"]["loss"]))
    workflow.run()
    workflow.finalize()
    per_epoch = max(len(losses) // epochs, 1)
    first, last = losses[:per_epoch], losses[-per_epoch:]
    print(f"training: {len(losses)} iterations, mean loss first epoch {sum(first) / len(first):.1f} -> "
          f"last epoch {sum(last) / len(last):.1f}", file=sys.stderr)
    return out / "models" / "model.pt"


def run(args: argparse.Namespace) -> int:
    from ..data.phantoms import make_phantom_datalist
    from . import evaluate_cli

    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new --out")
    check_writable(out, "--out", folder=True)  # (the default, runs/ here, in a read-only checkout too)
    if args.data:
        missing = [p for p in args.data if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"datalist not found: {', '.join(missing)} (make one with `medsam3 datalist`)")
    _check_model_arguments(args)
    start = time.perf_counter()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.data:
            datalists = [str(Path(p).resolve()) for p in args.data]
            epochs = args.epochs or 5
        else:
            counts = (12, 3, 4) if args.quick else (40, 6, 8)
            datalists = [str(make_phantom_datalist(out / "data", *counts))]
            epochs = args.epochs or (2 if args.quick else 20)
            print(f"data: {sum(counts)} phantom images with 'bright disc' and 'dark bar' in {out / 'data'}",
                  file=sys.stderr)
        model = _train(datalists, out / "train", args, epochs)
        protocol = args.protocol
        evaluation = [
            "--out", str(out / "evaluation"), "--checkpoint", args.checkpoint, "--checkpoint", str(model),
            "--overlays", "4" if args.quick else "8", "--device", args.device, "--protocol", protocol,
        ]
        for datalist in datalists:
            evaluation += ["--datalist", datalist]
        if args.image_size:
            evaluation += ["--image-size", str(args.image_size)]
        eval_args = evaluate_cli.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(evaluation)
        evaluate_cli.run(eval_args)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    evaluation_dir = out / "evaluation"
    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "datalists": datalists,
        "final_model": str(model),
        "training_mlflow": sqlite_uri((out / "train" / "runs" / "mlruns.db").resolve()),
        "comparison_table": str(evaluation_dir / "comparison.md"),
        "tables": sorted(str(p) for p in evaluation_dir.glob("*/table.md")),
        "radar_charts": sorted(str(p) for p in evaluation_dir.glob("*/radar.png")),
        "overlays": sorted(str(p) for p in evaluation_dir.glob("*/overlays")),
        "evaluation_mlflow": sqlite_uri((evaluation_dir / "mlruns.db").resolve()),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    mlflow = shlex.quote(str(Path(sys.executable).with_name("mlflow")))  # this environment's, active or not
    print(f"\n{mlflow} ui --backend-store-uri {shlex.quote(summary['training_mlflow'])}   # browse the training run",
          file=sys.stderr)
    return 0
