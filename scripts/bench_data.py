"""Data pipeline throughput per CPU core: images per second through load + the training transforms.

Three sets of ../shared/data, each through the training chain of ``bundles/medsam3/configs/train.json``
(``slice_space_transforms(train=True)``: load, decode, intensity (a 2D picture's mapping applied inside the resize),
random slice, instances, resize to S x S, 8-bit levels (SAM3-normalised later, on the training device), grey->RGB,
targets, one sampled negative):

* ``rgb``: 2D RGB (GBM40 H&E nuclei, up to 100 instance masks per image; or the Kvasir-SEG sample)
* ``grey``: 2D grey (BUSI ultrasound)
* ``3d``: MSD hippocampus volumes, one random axial slice per volume (``RandAxialSliced``), counted per slice

``cold``: no cache, the whole chain per item, the first pass over the items. ``cold_again``: the same uncached pass
once more, what each later epoch costs a loader worker that caches nothing: the first pass also pays, once per
process, the page faults of growing the heap to the largest picture's buffers (tens of ms for a 1348 x 1070 picture,
which the allocator then keeps: ``keep_freed_buffers`` below). ``cached``: the training bundle's warmed cache
(``data.caching.build_training_dataset``: a 2D picture cached in slice space with its targets, a volume's load,
decode and intensity), then only the part from the first random transform on, for ``--epochs`` passes. One thread
(``torch.set_num_threads(1)``), one process: ``img_per_s`` is images per CPU-second of this process (per core,
robust to other load on the machine); ``img_per_s_wall`` uses elapsed time. Like the bundles' ``initialize``, the
process first calls ``medsam3_monai.allocator.keep_freed_buffers()`` (freed 12 MB buffers are reused, not faulted in
again). ``cores_for_60_img_per_s`` =
ceil(60 / per-core rate) of the slowest set. Collation and worker IPC are not included.

``--runs N``: N fresh processes, one after the other, each measuring everything once (so each pays its own first
pass); every rate is then the median over them, with each run's value in ``runs``. A single run on a shared machine
varies by +-20 %; the median of five is what to compare with a target.

    python scripts/bench_data.py [--image-size 1008] [--items 16] [--epochs 2] [--data-root ../shared/data]
    python scripts/bench_data.py --rgb kvasir --runs 5
    python scripts/bench_data.py --resize-kernel monai   # MONAI's resize (the bundles' resize_kernel)

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))

# set -> choice -> folder in the data root
SETS = {
    "rgb": {"gbm40": "GBM40_HE_nuclei", "kvasir": "Kvasir-SEG_sample"},
    "grey": {"busi": "BUSI"},
    "3d": {"hippocampus": "MSD_Task04_Hippocampus_cropped"},
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _count(out: Any) -> int:
    """Images (slices) in one dataset item: the chain returns a list of slice items."""
    return len(out) if isinstance(out, list) else 1


def _timed(fn) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    images = fn()
    return images, time.perf_counter() - wall, time.process_time() - cpu


def _rates(images: int, wall: float, cpu: float) -> dict[str, float]:
    return {"images": images, "img_per_s": round(images / cpu, 2), "img_per_s_wall": round(images / wall, 2),
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}


def bench_set(name: str, folder: Path, args: argparse.Namespace, concepts: list[str]) -> dict[str, Any]:
    from medsam3_monai.data import build_datalist
    from medsam3_monai.data.caching import build_training_dataset
    from medsam3_monai.transforms import slice_space_transforms

    if not folder.is_dir():
        raise SystemExit(f"{folder}: not found (give --data-root, the folder holding {folder.name})")
    datalist = build_datalist(folder.name, folder, check_values=False).datalist
    items = (datalist["training"] + datalist["validation"])[: args.items]

    def chain(pictures_only: bool = False):
        transform = slice_space_transforms(args.image_size, train=True, negative_concepts=concepts,
                                           slices_per_volume=args.slices_per_volume, pictures_only=pictures_only,
                                           resize_kernel=args.resize_kernel)
        return transform.set_random_state(seed=0)

    def dataset_of(cache: str):  # the training bundle's dataset: pictures and volumes through their own chains
        return build_training_dataset(items, chain(pictures_only=True), chain(), cache=cache, num_workers=1,
                                      progress=False)

    # cold: every item loaded and transformed in full (one warm-up item first: lazy imports, reader set-up)
    dataset = dataset_of("none")
    dataset[0]
    _log(f"{name}: cold, {len(items)} items of {folder.name} at {args.image_size} px")
    cold = _rates(*_timed(lambda: sum(_count(dataset[i]) for i in range(len(dataset)))))
    _log(f"{name}: cold again (a later uncached epoch)")
    cold_again = _rates(*_timed(lambda: sum(_count(dataset[i]) for i in range(len(dataset)))))

    # cached: fill the memory cache (timed apart), then passes over the random tail only
    _log(f"{name}: cached, {args.epochs} passes")
    fill_wall = time.perf_counter()
    cached_set = dataset_of("memory")
    fill_wall = time.perf_counter() - fill_wall
    cached_set[0]
    cached = _rates(*_timed(lambda: sum(_count(cached_set[i]) for _ in range(args.epochs)
                                        for i in range(len(cached_set)))))
    cached["cache_fill_s"] = round(fill_wall, 3)
    return {"dataset": folder.name, "items": len(items), "cold": cold, "cold_again": cold_again, "cached": cached}


KINDS = ("cold", "cold_again", "cached")


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Add ``worst`` (the slowest set of each kind) and ``cores_for_60_img_per_s`` (and ``_wall``) to ``report``."""
    sets = report["sets"]
    for kind in KINDS:
        worst = min(sets, key=lambda name: sets[name][kind]["img_per_s"])
        rate, wall_rate = sets[worst][kind]["img_per_s"], sets[worst][kind]["img_per_s_wall"]
        report.setdefault("worst", {})[kind] = {"set": worst, "img_per_s": rate, "img_per_s_wall": wall_rate}
        report.setdefault("cores_for_60_img_per_s", {})[kind] = math.ceil(60 / rate)
        report.setdefault("cores_for_60_img_per_s_wall", {})[kind] = math.ceil(60 / wall_rate)
    return report


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Reports of fresh processes (:func:`main` with ``--runs 1``) -> one report: per set and kind the median of each
    rate, each run's ``img_per_s`` in ``runs``; ``worst`` and the cores from those medians."""
    first = runs[0]
    sets: dict[str, Any] = {}
    for name, measured in first["sets"].items():
        sets[name] = {"dataset": measured["dataset"], "items": measured["items"]}
        for kind in KINDS:
            entries = [run["sets"][name][kind] for run in runs]
            sets[name][kind] = {key: round(statistics.median(entry[key] for entry in entries), 3) for key in entries[0]}
            sets[name][kind]["runs"] = [entry["img_per_s"] for entry in entries]
    report = {key: value for key, value in first.items()
              if key not in ("sets", "worst", "cores_for_60_img_per_s", "cores_for_60_img_per_s_wall", "machine")}
    report.update(runs=len(runs), statistic="median over fresh processes", sets=sets)
    summarize(report)
    report["machine"] = {**first["machine"], "loadavg_1min": [run["machine"]["loadavg_1min"] for run in runs],
                         "bench_wall_s": round(sum(run["machine"]["bench_wall_s"] for run in runs), 1)}
    return report


def _fresh_runs(argv: list[str], runs_wanted: int) -> dict[str, Any]:
    """``runs_wanted`` fresh processes of this script with the same arguments ``argv`` and ``--runs 1`` (the last
    occurrence wins), combined by :func:`median_of_runs`."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--runs", "1"]
    runs = []
    for index in range(runs_wanted):
        _log(f"run {index + 1}/{runs_wanted} (a fresh process)")
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"run {index + 1} failed with exit status {done.returncode} (its stderr is above)")
        runs.append(json.loads(done.stdout))
    report = median_of_runs(runs)
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from medsam3_monai.deploy.arguments import slice_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=slice_size, default=1008, help="slice size S (default 1008, real weights)")
    parser.add_argument("--items", type=int, default=16,
                        help="at most this many items (images or volumes) per set (default 16; each set reports how "
                             "many it had)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the warmed cache (default 2)")
    parser.add_argument("--slices-per-volume", type=int, default=1, help="RandAxialSliced num_samples (default 1)")
    parser.add_argument("--rgb", choices=sorted(SETS["rgb"]), default="gbm40", help="the 2D RGB set (default gbm40)")
    parser.add_argument("--resize-kernel", choices=["sam3", "monai"], default="sam3",
                        help="the bundles' resize_kernel (default sam3, SAM3's image processor's resize)")
    parser.add_argument("--data-root", default="../shared/data",
                        help="folder of the shared samples; relative paths are relative to the repo root")
    parser.add_argument("--runs", type=int, default=1,
                        help="fresh processes to measure in, one after the other; rates are their medians (default 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if min(args.items, args.epochs, args.runs) < 1:
        parser.error("--items, --epochs and --runs must be >= 1")
    if args.runs > 1:
        return _fresh_runs(argv, args.runs)
    root = Path(args.data_root)
    root = root if root.is_absolute() else (REPO_ROOT / root).resolve()

    torch.set_num_threads(1)
    from medsam3_monai.allocator import keep_freed_buffers

    freed_buffers_kept = keep_freed_buffers()  # as the bundles' ``initialize`` does
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    folders = {"rgb": SETS["rgb"][args.rgb], "grey": "BUSI", "3d": "MSD_Task04_Hippocampus_cropped"}
    # negatives from the concepts of all three sets, as the bundle's concept_pool of a mixed datalist would give
    concepts = ["cell nucleus", "polyp", "breast tumor", "anterior hippocampus", "posterior hippocampus"]

    started = time.perf_counter()
    sets = {name: bench_set(name, root / folder, args, concepts) for name, folder in folders.items()}
    report: dict[str, Any] = {
        "image_size": args.image_size,
        "max_items_per_set": args.items,  # each set's own count is its "items" (a sample may hold fewer)
        "cached_epochs": args.epochs,
        "slices_per_volume": args.slices_per_volume,
        "resize_kernel": args.resize_kernel,
        "torch_threads": torch.get_num_threads(),
        "keep_freed_buffers": freed_buffers_kept,
        "rate_unit": "img_per_s = images per CPU-second of one single-threaded process (per core); "
                     "img_per_s_wall = images per elapsed second",
        "sets": sets,
    }
    summarize(report)
    report["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
                         "bench_wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
