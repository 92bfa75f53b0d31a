"""``medsam3 train --datalist FILE --out DIR``: the training bundle in one command.

A thin front to ``bundles/medsam3/configs/train.json``: it checks the datalists and the starting checkpoint, then
runs ``python -m monai.bundle run`` with the bundle's metadata, logging and MLflow settings (or, with ``--nproc N``,
``torchrun`` with ``multi_gpu_train.json`` overlaid) and returns its exit status. The command it runs is printed
first (``--dry-run``: printed only), so every run can be repeated or adapted with MONAI's own runner.

Options map to bundle keys: ``--out`` -> ``bundle_root``, ``--datalist`` -> ``datalists``, ``--epochs`` ->
``max_epochs``, ...; ``--set KEY=VALUE`` passes any other key of ``train.json`` (``--set lr#detector=1e-4``), its
value read as ``python -m monai.bundle run --KEY VALUE`` reads it. Run the same command again to resume from the
newest checkpoint in ``--out`` (``--set resume=false`` starts afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..bundle import BUNDLE_CONFIGS, FRONT_OPTIONS_VARIABLE, FRONT_VALUES_VARIABLE, FRONT_VARIABLE
from ..bundle import front_words as bundle_front_words
from .arguments import at_least, check_writable

__all__ = ["add_parser", "bundle_command", "one_rate_overrides", "run", "run_folder"]

#: the bundle key of each dedicated option (``--set`` may not set them a second time)
OPTION_KEYS = {"--out": "bundle_root", "--datalist": "datalists", "--checkpoint": "checkpoint",
               "--image-size": "image_size", "--mode": "mode", "--box-prompts": "box_prompts", "--epochs": "max_epochs",
               "--batch-size": "batch_size", "--val-interval": "val_interval", "--save-interval": "save_interval"}

_EPILOG = """\
Examples:
  # the tiny network on the shared Kvasir sample (a minute or two on 2 CPU cores), one learning rate for every group
  medsam3 datalist Kvasir-SEG_sample ../shared/data/Kvasir-SEG_sample --out kvasir.json
  medsam3 train --datalist kvasir.json --out runs/tiny --lr 5e-4 --epochs 10 --batch-size 2 \\
      --set val_protocol=semantic
  # Medical SAM3 (full fine-tuning) from real weights, 8 GPUs
  medsam3 train --datalist kvasir.json --datalist busi.json --out runs/medical-sam3 \\
      --checkpoint /weights/sam3-hf --image-size 1008 --nproc 8 --set gradient_checkpointing=true
  # MedSAM3 (frozen encoders, text + box prompts)
  medsam3 train --datalist kvasir.json --out runs/medsam3 --checkpoint /weights/sam3-hf --image-size 1008 \\
      --mode medsam3 --box-prompts
Outputs under --out: models/model.pt (the final network), runs/checkpoints/ (checkpoint_iterN.pt, resumable;
model_best_val_dice.pt), runs/mlruns.db (MLflow). Every key: bundles/medsam3/docs/README.md.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="fine-tune on datalists with the training bundle (Medical SAM3 or MedSAM3; torchrun for N GPUs)",
        description=__doc__.replace("``", "`"), epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--datalist", action="append", required=True, metavar="FILE",
                        help="a datalist JSON (`medsam3 datalist`); repeatable: the datasets are trained together")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the run's folder (bundle_root): model, checkpoints, MLflow store; the same --out again "
                             "resumes")
    parser.add_argument("--checkpoint", default=None, metavar="SRC",
                        help="starting weights: tiny (random init, the bundle's default), an HF folder, sam3.pt, a "
                             "Medical-SAM3 release, a model.pt")
    parser.add_argument("--image-size", type=at_least(1), default=None, metavar="N",
                        help="slice-space size (default: the checkpoint's own: tiny 112, 1008 for a sam3.pt or "
                             "Medical-SAM3 file; 504 for the release's 3D checkpoint)")
    parser.add_argument("--mode", choices=["full", "medsam3"], default=None,
                        help="full: Medical SAM3, every part trained (default); medsam3: frozen encoders")
    parser.add_argument("--box-prompts", action="store_true",
                        help="MedSAM3's text + box prompts: a present concept's prompt carries the box of its "
                             "target's largest connected component, with probability box_prompt_probability "
                             "(default 0.5; --set box_prompt_probability=1.0 boxes every one)")
    parser.add_argument("--epochs", type=at_least(1), default=None, metavar="N", help="max_epochs (default 10)")
    parser.add_argument("--batch-size", type=at_least(1), default=None, metavar="N",
                        help="datalist items (pictures, or volumes giving slices_per_volume slices) per step and "
                             "process, each with its prompts and negatives as find-queries (default 4)")
    parser.add_argument("--val-interval", type=at_least(1), default=None, metavar="N",
                        help="iterations between validations (default 50)")
    parser.add_argument("--save-interval", type=at_least(1), default=None, metavar="N",
                        help="iterations between checkpoints (default 50)")
    parser.add_argument("--lr", type=float, default=None, metavar="RATE",
                        help="one learning rate for every parameter group, no layer or weight decay, a slow decay "
                             "(scheduler#timescale 1000): a tiny network learning from scratch; default: the papers' "
                             "fine-tuning rates")
    parser.add_argument("--nproc", type=at_least(1), default=1, metavar="N",
                        help="processes on this machine, one per GPU: N > 1 runs torchrun with multi_gpu_train.json "
                             "(gloo on CPU)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="no MLflow tracking (default: runs/mlruns.db in --out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="any other train.json key, e.g. --set lr#detector=1e-4 --set val_protocol=semantic "
                             "(repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the bundle command and exit without running it")
    parser.set_defaults(func=run)
    return parser


def one_rate_overrides(lr: float) -> dict[str, float | int]:
    """Bundle overrides that train every parameter group at ``lr``, without layer decay or weight decay, on a slow
    inverse-square-root decay: a random-init (tiny) network learning from scratch, not the papers' fine-tuning."""
    return {"lr#detector": lr, "lr#vision": lr, "lr#language": lr, "lr#geometry": lr, "lr#layer_decay": 1.0,
            "lr#weight_decay": 0.0, "scheduler#timescale": 1000}


def front_words(message: str, values: dict[str, str] | None = None) -> str:
    """A training bundle message in this command's words (:func:`~medsam3_monai.bundle.front_words` with its options
    and the bundle values it gave, ``values``): ``--max_epochs`` -> ``--epochs``, ``--resume false`` -> ``--set
    resume=false``."""
    return bundle_front_words(message, front_options(), values)


def front_options() -> dict[str, str]:
    """Bundle key -> this command's option (``OPTION_KEYS`` turned round)."""
    return {key: option for option, key in OPTION_KEYS.items()}


def _settings(pairs: Sequence[str], given: dict[str, str]) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs -> ``{key: value}``; ``given`` maps the keys dedicated options set to the option."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not value:
            raise ValueError(f"--set {pair!r}: give KEY=VALUE, e.g. --set lr#detector=1e-4")
        if key in given:
            raise ValueError(f"--set {key}: use {given[key]} for it")
        if key in settings:
            raise ValueError(f"--set {key} is given twice")
        settings[key] = value
    return settings


def bundle_command(args: argparse.Namespace) -> list[str]:
    """The ``python -m monai.bundle run`` (or ``torchrun``) argument list of ``args``, values as MONAI's runner
    reads them from a command line."""
    configs = [str(BUNDLE_CONFIGS / "train.json")]
    if args.nproc > 1:
        configs.append(str(BUNDLE_CONFIGS / "multi_gpu_train.json"))
        # torchrun, ending as its ranks did when they said an input error (deploy/torchrun.py)
        command = [sys.executable, "-m", "medsam3_monai.deploy.torchrun", "--standalone", "--nproc_per_node",
                   str(args.nproc)]
    else:
        command = [sys.executable]
    command += ["-m", "monai.bundle", "run", "--config_file", configs[0] if len(configs) == 1 else json.dumps(configs),
                "--meta_file", str(BUNDLE_CONFIGS / "metadata.json"),
                "--logging_file", str(BUNDLE_CONFIGS / "logging.conf")]
    if not args.no_mlflow:
        command += ["--tracking", str(BUNDLE_CONFIGS / "mlflow.json")]
    datalists = [str(Path(p).expanduser().resolve()) for p in args.datalist]
    values = {"--out": str(run_folder(args)), "--datalist": json.dumps(datalists), "--checkpoint": args.checkpoint,
              "--image-size": args.image_size, "--mode": args.mode,
              "--box-prompts": "true" if args.box_prompts else None, "--epochs": args.epochs,
              "--batch-size": args.batch_size, "--val-interval": args.val_interval,
              "--save-interval": args.save_interval}
    overrides: dict[str, object] = {OPTION_KEYS[option]: value for option, value in values.items() if value is not None}
    dedicated = {key: option for option, key in OPTION_KEYS.items()}
    if args.lr is not None:
        dedicated |= dict.fromkeys(one_rate_overrides(args.lr), "--lr")
        overrides |= one_rate_overrides(args.lr)
    overrides |= _settings(args.settings, dedicated)
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _check(args: argparse.Namespace) -> None:
    missing = [p for p in args.datalist if not Path(p).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"datalist not found: {', '.join(missing)} (make one with `medsam3 datalist`)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a folder for the run (new, or a run's folder to resume)")
    check_writable(out, "--out", folder=True)
    store, chosen_by = tracking_store(args, out)
    if chosen_by is not None and not args.no_mlflow:  # MLflow would refuse a store only after the data is cached
        from ..engines.reports import check_tracking_uri

        check_tracking_uri(store, chosen_by)
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: give a learning rate > 0 (leave --lr out for the papers' rates)")
    from ..bundle import check_network_source

    try:  # the training bundle's own check, before it starts
        check_network_source(args.checkpoint or "tiny", args.image_size)
    except ValueError as err:  # (a size the checkpoint does not work at: named as this command's option)
        raise ValueError(front_words(str(err))) from None


def run_folder(args: argparse.Namespace) -> Path:
    """The run's folder (``--out``, absolute): the bundle's ``bundle_root``."""
    return Path(args.out).expanduser().resolve()


def _wait(process: subprocess.Popen) -> int:
    """The bundle's exit status. Ctrl-C reaches the bundle too (one process group), which ends on its own; a
    SIGTERM to this process is passed on to it."""
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_if_config_only(root: Path) -> None:
    """Remove the run folder ``root`` this command created when a failed bundle left nothing in it but the executed
    config MONAI's ``--tracking`` saves before the bundle starts (``runs/config_<time>.json``): an input error
    leaves no output behind. A folder holding anything else (a checkpoint to resume from) is kept."""
    if all(_is_executed_config(p, root) for p in root.rglob("*") if not p.is_dir()):
        shutil.rmtree(root, ignore_errors=True)


def _is_executed_config(path: Path, root: Path) -> bool:
    """Whether ``path`` is an executed config MONAI's ``--tracking`` saved in the run folder ``root``
    (``runs/config_<time>.json``)."""
    return path.parent == root / "runs" and path.name.startswith("config_") and path.suffix == ".json"


def _run_files(root: Path) -> dict[Path, int]:
    """The files of a run folder and their modification times (ns), to tell what a bundle run wrote."""
    if not root.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _check_keys(command: Sequence[str]) -> None:
    """The bundle's own check that every ``--key`` is a setting of its configs, before anything runs, in this
    command's words."""
    from ..bundle import check_runner_arguments

    arguments = command[command.index("run", command.index("monai.bundle")) + 1:]
    try:
        check_runner_arguments(arguments)
    except ValueError as err:  # a key only --set gives is named as it was given
        values = {key[2:]: value for key, value in zip(arguments[::2], arguments[1::2])}
        raise ValueError(front_words(str(err), values)) from None


def tracking_store(args: argparse.Namespace, root: Path) -> tuple[str, str | None]:
    """The MLflow store the run logs to, and what chose it: ``MLFLOW_TRACKING_URI`` (MONAI's MLFlowHandler lets it
    override the bundle's ``tracking_uri``), ``--set tracking_uri``, or None for the default ``runs/mlruns.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    given = _settings(args.settings, {}).get("tracking_uri")
    if given is not None:
        return str(given), "--set tracking_uri"
    from ..bundle import sqlite_uri

    return sqlite_uri(root / "runs" / "mlruns.db"), None


def _say_how_it_ended(args: argparse.Namespace, root: Path, status: int, trained: bool, store: str,
                      chosen_by: str | None) -> None:
    """After a training process that did not finish: an interrupt, a signal that killed it (the out-of-memory
    killer's SIGKILL), or an error after it trained (a full disk; its one line is above): how the same command goes
    on, and its MLflow run marked KILLED (a signal) or FAILED, so that the resume opens a new run."""
    from ..engines.checkpointing import latest_checkpoint

    interrupted = status in (130, 143, -signal.SIGINT, -signal.SIGTERM)
    if not (interrupted or status < 0 or trained):
        return  # an input error before any checkpoint (said above), or a crash before training: nothing to go on from
    newest = latest_checkpoint(root / "runs" / "checkpoints") if root.is_dir() else None
    if not args.no_mlflow:
        _end_interrupted_runs(root, store, chosen_by, "KILLED" if interrupted or status < 0 else "FAILED")
    goes_on = (f"the same command resumes from the newest checkpoint, {newest}" if newest is not None else
               "the same command starts the run again")
    if interrupted:
        ended = "interrupted" if newest is not None else "interrupted before the first checkpoint"
    elif status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        oom = " (often the out-of-memory killer, or the job's memory or time limit)"
        ended = f"the training process was killed by {name}" + (oom if -status == signal.SIGKILL else "")
    else:
        ended = f"the training stopped with status {status} (the error is above)"
    print(f"medsam3 train: {ended}; {goes_on}", file=sys.stderr)


def _end_interrupted_runs(root: Path, tracking_uri: str, chosen_by: str | None, status: str = "KILLED") -> None:
    """Mark the MLflow runs the stopped training left RUNNING (experiment ``medsam3``, named after ``root``) as
    ``status`` (KILLED, FAILED): the bundle's handler (``engines.mlflow_runs.MLFlowRunHandler``) continues only a
    RUNNING run of its name, so a resume then opens a new run, and another training of that name in the store is never
    mixed into it."""
    if chosen_by is None and not (root / "runs" / "mlruns.db").is_file():
        return
    try:
        from mlflow import MlflowClient

        from ..engines.mlflow_runs import running_runs

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name("medsam3")
        if experiment is None:
            return
        for found in running_runs(client, experiment.experiment_id, root.name):
            client.set_terminated(found.info.run_id, status)
    except Exception as err:  # noqa: BLE001 - the store is the user's; the interrupt line is said whatever happens
        print(f"medsam3 train: note: the MLflow run could not be marked {status} ({type(err).__name__}: {err})",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    command = bundle_command(args)  # (--set mistakes first: they need no file)
    _check_keys(command)
    _check(args)
    print(shlex.join(command), file=sys.stdout if args.dry_run else sys.stderr, flush=True)
    if args.dry_run:
        return 0
    root = run_folder(args)
    store, chosen_by = tracking_store(args, root)
    if chosen_by == "MLFLOW_TRACKING_URI" and not args.no_mlflow:
        print(f"medsam3 train: note: MLFLOW_TRACKING_URI is set: the run is logged to {store} (it takes priority over "
              "the bundle's tracking_uri, as in MONAI's MLFlowHandler)", file=sys.stderr)
    created = not root.exists()
    before = _run_files(root)
    from .output_lock import held_descriptors

    status = _wait(subprocess.Popen(command, env={**os.environ, FRONT_VARIABLE: "medsam3 train",
                                                  FRONT_OPTIONS_VARIABLE: json.dumps(front_options()),
                                                  FRONT_VALUES_VARIABLE: json.dumps(_settings(args.settings, {}))},
                                    pass_fds=held_descriptors()))  # --out's lock lasts while the training runs
    written = [path for path, stamp in _run_files(root).items() if before.get(path) != stamp]
    trained = any(p.suffix == ".pt" and p.parent.name in ("checkpoints", "models") for p in written)  # (not a cache)
    if status == 2 and not trained:  # an input error before any checkpoint: no output is left
        if created:  # (the executed config, the MLflow store of a run that never trained, an empty checkpoints dir)
            shutil.rmtree(root, ignore_errors=True)
        for path in written:  # an existing run's folder: the executed config MONAI saved describes no run
            if _is_executed_config(path, root):
                path.unlink(missing_ok=True)
    if status != 0:
        if created and root.exists():
            _remove_if_config_only(root)
        _say_how_it_ended(args, root, status, trained, store, chosen_by)
        return status if status > 0 else 128 - status  # ended by a signal: the shell's 128 + signal
    print(f"medsam3 train: {'final model' if trained else 'nothing trained; the run had finished: its final model'} "
          f"{root / 'models' / 'model.pt'}; checkpoints {root / 'runs' / 'checkpoints'}"
          + ("" if args.no_mlflow else
             f"; browse the run with: {shlex.quote(str(Path(sys.executable).with_name('mlflow')))} ui "
             f"--backend-store-uri {shlex.quote(store)}"),
          file=sys.stderr)
    return 0
