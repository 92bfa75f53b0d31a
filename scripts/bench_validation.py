"""Memory of one validation pass of the training bundle over sliced volumes, for a given ``val_images_per_batch``.

The training bundle (``bundles/medsam3/configs/train.json``) validates every slice of each validation volume;
``val_images_per_batch`` bounds the slices per forward. This builds the bundle's own ``validate#evaluator`` on the
first ``--volumes`` validation volumes of the MSD hippocampus sample (tiny random-init network, no cache) and runs
one pass. Each setting needs its own process (peak RSS is per process):

    python scripts/bench_validation.py --images-per-batch 8
    python scripts/bench_validation.py --images-per-batch 1000000   # every slice in one forward (the old way)

Prints one JSON object: forwards (Ignite iterations), slices, the validation Dice, peak resident memory before and
after the pass (GB), seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"
HIPPOCAMPUS = "MSD_Task04_Hippocampus_cropped"


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # kB on Linux


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least, slice_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-batch", type=at_least(1), default=8, help="val_images_per_batch (default 8)")
    parser.add_argument("--volumes", type=at_least(1), default=4, help="validation volumes (default 4: one batch_size)")
    parser.add_argument("--image-size", type=slice_size, default=1008, help="slice size S (default 1008)")
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medsam3_monai.bundle import FRONT_OPTIONS_VARIABLE, FRONT_VARIABLE

    # the bundle's input errors in this script's name and options (--images-per-batch, not --val_images_per_batch)
    os.environ[FRONT_VARIABLE] = "bench_validation.py"
    os.environ[FRONT_OPTIONS_VARIABLE] = json.dumps({"val_images_per_batch": "--images-per-batch",
                                                     "image_size": "--image-size"})
    # the logs (MONAI's handlers and the bundle's logging.conf write to stdout, bound when they are made) go to
    # stderr: stdout is the JSON alone
    with contextlib.redirect_stdout(sys.stderr):
        result = _measure(args)
    print(json.dumps(result, indent=1))


def _measure(args: argparse.Namespace) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from medsam3_monai.data import build_datalist, write_datalist

    folder = Path(args.data_root) / HIPPOCAMPUS
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not found (give --data-root, the folder holding {HIPPOCAMPUS})")
    datalist = build_datalist(HIPPOCAMPUS, folder, check_values=False).datalist
    datalist = {"training": datalist["training"][:1], "validation": datalist["validation"][: args.volumes]}
    with tempfile.TemporaryDirectory() as work:
        path = write_datalist(datalist, Path(work) / "hippocampus.json")
        workflow = ConfigWorkflow(
            config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", bundle_root=str(Path(work) / "run"),
            datalists=[str(path)], image_size=args.image_size, cache="none", val_protocol="semantic",
            val_images_per_batch=args.images_per_batch,
        )
        workflow.initialize()
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        slices: list[int] = []
        evaluator.add_event_handler(Events.ITERATION_STARTED, lambda e: slices.append(len(e.state.batch["images"])))
        before = _peak_rss_gib()
        start = time.perf_counter()
        evaluator.run()
        seconds = time.perf_counter() - start
    return {
        "images_per_batch": args.images_per_batch, "volumes": args.volumes, "image_size": args.image_size,
        "forwards": evaluator.state.iteration, "slices": sum(slices), "largest_forward": max(slices),
        "val_dice": round(float(evaluator.state.metrics["val_dice"]), 6),
        "peak_rss_gib_before": before, "peak_rss_gib": _peak_rss_gib(), "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
