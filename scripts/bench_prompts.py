#!/usr/bin/env python
"""Benchmark many prompts: time and peak memory of one volume evaluated with P class prompts.

Prints one JSON object. The case is the TotalSegmentator example CT of ``../shared/data`` (117 labelled classes,
122 x 101 x 30 voxels; a synthetic CT of that size and class count when the folder is absent), evaluated the way
``medsam3 evaluate`` does it (``CaseInferer`` with the tiny tracker: detector on every slice, tracker propagation,
the way back to the volume's geometry, merge, metrics), tiny network at ``--image-size`` (default 224), CPU.

Runs, each in a fresh child process (as ``bench_memory.py``): its **baseline** is the RSS once the network, the
tracker and the preprocessed case are in memory; the peak-RSS mark is then reset (``/proc/self/clear_refs``) and
**peak_mb** = ``VmHWM`` - baseline after the case is scored; **seconds** is its wall time.

* ``prompts``: the first 1, 16 and all 117 classes, with the network's default ``detector_chunk`` (16
  find-queries per detector pass): the peak should grow with the prompts by about the prompts' masks (1 bit a
  slice-space pixel, ``inferers.BitMasks``), not by the detector's working memory.
* ``one_pass``: all classes with ``detector_chunk`` = slices per batch x prompts (every find-query of a slice
  batch in one detector pass, what inference did before chunking); ``one_pass_over_chunked`` gives its peak
  and time over the chunked run's.

    python scripts/bench_prompts.py                  # 224 px, 1 thread
    python scripts/bench_prompts.py --image-size 112 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import _reset_peak, _status_kb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
SHARED = REPO.parent / "shared" / "data" / "TotalSegmentator_example_CT_MR"
SLICE_BATCH = 8  # the volume path's default slices per detector call


def _case_item(work: Path) -> dict:
    """The datalist item of the example CT (all its classes), or of a synthetic CT like it."""
    from medsam3_monai.data import build_datalist

    if SHARED.is_dir():
        items = build_datalist("TotalSegmentator_example_CT_MR", SHARED).datalist["training"]
        return next(item for item in items if "ct" in Path(item["image"]).name)
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (122, 101, 30)
    image = rng.normal(40, 20, shape).astype(np.float32)
    label = (rng.integers(0, 118, (16, 13, 4)).repeat(8, 0).repeat(8, 1).repeat(8, 2)[:122, :101, :30]).astype(np.uint8)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), work / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), work / "seg.nii.gz")
    return {"image": str(work / "ct.nii.gz"), "label": str(work / "seg.nii.gz"), "modality": "CT",
            "dataset": "synthetic CT", "mask_encoding": "label_map",
            "prompts": {str(v): f"organ {v}" for v in range(1, 118)}}


def _subset(item: dict, prompts: int, work: Path) -> dict:
    """The item with its first ``prompts`` classes: their prompts, and a label file where the others are background
    (a class in the label but not in the prompts is an error of the evaluation's label decoding)."""
    import nibabel as nib
    import numpy as np

    values = sorted(item["prompts"], key=int)[:prompts]
    if len(values) == len(item["prompts"]):
        return item
    label = nib.load(item["label"])
    kept = np.where(np.isin(np.asarray(label.dataobj), [int(v) for v in values]), np.asarray(label.dataobj), 0)
    path = work / f"label_{prompts}.nii.gz"
    nib.save(nib.Nifti1Image(kept.astype(np.uint8), label.affine), path)
    return dict(item, label=str(path), prompts={value: item["prompts"][value] for value in values})


def child(prompts: int, chunk: int, image_size: int, work: str) -> None:
    import torch

    from medsam3_monai.engines.evaluation import CaseInferer, case_records, evaluation_transforms
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.tracker import build_tracker

    item = _subset(_case_item(Path(work)), prompts, Path(work))
    network = MedSAM3Net("tiny", image_size=image_size, detector_chunk=chunk).eval()
    tracker = build_tracker("tiny", detector=network)
    transform = evaluation_transforms(image_size)
    inferer = CaseInferer(transform, tracker=tracker, score_threshold=0.2)  # tiny scores ~0.25: the tracker runs
    case = transform(item)
    baseline_kb, reset = _status_kb("VmRSS"), _reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        records = case_records(inferer(case, network), inferer.label)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"slices": len(case), "records": len(records), "baseline_kb": baseline_kb, "peak_kb": peak_kb,
                      "seconds": seconds, "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss"}))


def run(prompts: int, chunk: int, args: argparse.Namespace, work: Path) -> dict:
    command = [sys.executable, __file__, "--child", str(prompts), str(chunk), str(args.image_size), str(work),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"prompts": prompts, "detector_chunk": chunk, "error": " | ".join(tail), "exit": done.returncode}
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {"prompts": prompts, "detector_chunk": chunk, "slices": raw["slices"], "seconds": round(raw["seconds"], 2),
            "peak_mb": round((raw["peak_kb"] - raw["baseline_kb"]) / 1024, 1),
            "baseline_mb": round(raw["baseline_kb"] / 1024, 1), "peak_source": raw["peak_source"]}


def main() -> int:
    from medsam3_monai.deploy.arguments import at_least, slice_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=slice_size, default=224)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--child", nargs=4, metavar=("PROMPTS", "CHUNK", "SIZE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        child(int(args.child[0]), int(args.child[1]), int(args.child[2]), args.child[3])
        return 0
    from medsam3_monai.networks.medsam3_net import DETECTOR_CHUNK

    with tempfile.TemporaryDirectory(prefix="bench_prompts_") as tmp:
        work = Path(tmp)
        total = len(_case_item(work)["prompts"])
        chunked = [run(count, DETECTOR_CHUNK, args, work) for count in sorted({1, 16, total})]
        one_pass = run(total, SLICE_BATCH * total, args, work)
    result = {"case": "TotalSegmentator example CT" if SHARED.is_dir() else "synthetic CT", "network": "tiny",
              "image_size": args.image_size, "threads": args.threads, "prompts": chunked, "one_pass": one_pass}
    last = chunked[-1]
    if "error" not in last and "error" not in one_pass:
        result["one_pass_over_chunked"] = {"peak": round(one_pass["peak_mb"] / last["peak_mb"], 2),
                                           "seconds": round(one_pass["seconds"] / last["seconds"], 2)}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps(result, indent=1))
    failed = [run for run in (*chunked, one_pass) if "error" in run]
    if failed:  # the JSON above says which and why
        print(f"bench_prompts.py: {len(failed)} of {len(chunked) + 1} runs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
