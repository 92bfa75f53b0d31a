#!/usr/bin/env python
"""Benchmark a volume's way in: a CT through the inference bundle's preprocessing to the slices the volume inferer
stacks, against the float RGB chain the bundle had before (and the training chain still has). Prints one JSON object.

The volume: the TotalSegmentator example CT (122 x 101 x 30 voxels at 3 mm; a synthetic body when the folder is
absent) with each voxel repeated ``--factors`` times (default 3 3 10: 366 x 303 x 300 voxels, a CT-sized case),
written once as NIfTI. Each variant runs in a fresh child process (so that one's freed memory
cannot hide the other's peak): load -> intensity -> axial slices -> slice space at ``--image-size`` (default
SAM3's 1008) -> the host-side stack of all slices that ``PromptInferer`` hands to ``segment_volume``.

* ``levels`` (the inference bundle now, ``configs/inference.json``): each slice goes through the per-slice steps
  on its own (``EachItem``), is kept as its uint8 8-bit levels (``Sam3Normalized(levels=True)``) and stays grey
  (``GreyToRGBd(repeat_volume_slices=False)``): (1, S, S) uint8; the detector batch is repeated to RGB and
  normalised on the network's device (``networks.network_pixels``).
* ``float_rgb`` (before): the same steps as a flat ``Compose`` (every slice through one step, then the next),
  grey repeated to RGB before the resize, SAM3-normalised float32: (3, S, S) float32.

Per variant: ``seconds`` (the chain and the stack), ``peak_rss_gib`` above the child's RSS right before the chain
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``; the lifetime ``ru_maxrss`` where that is not
allowed), ``slices_gib`` (the bytes the slice items and the stack hold at the end). ``float_rgb_over_levels``: the
ratios of the two, measured in this one run. The network input of both is checked equal (float32 exactly, except
on one thread where ATen's CPU resize rounds 3 channels differently in the last bit: ``inputs_differing`` counts
the pixels whose 8-bit level moved).

    python scripts/bench_volume_input.py                   # 1 thread, 1008 px, 366 x 303 x 300
    python scripts/bench_volume_input.py --threads 2 --factors 3 3 4
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

from bench_memory import _reset_peak, _status_kb  # same folder: VmRSS / VmHWM, peak reset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
SHARED = REPO.parent / "shared" / "data"
VARIANTS = ("levels", "float_rgb")


def write_ct(path: Path, factors: tuple[int, int, int]) -> tuple[list[int], str]:
    """The example CT repeated ``factors`` times along its axes (spacing divided accordingly), as NIfTI."""
    import nibabel as nib
    import numpy as np

    source = SHARED / "TotalSegmentator_example_CT_MR" / "images" / "example_ct_sm.nii.gz"
    if source.is_file():
        image = nib.load(str(source))
        values, affine, name = np.asarray(image.dataobj).astype(np.int16), image.affine.copy(), "TotalSegmentator"
    else:  # a smooth synthetic body: HU from -1000 (air) to 400
        grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (122, 101, 30)), indexing="ij"))
        values = (np.where((grid[:2] ** 2).sum(0) < 0.8, 40 + 300 * np.cos(4 * grid[0]) * np.sin(3 * grid[1]), -1000)
                  .astype(np.int16))
        affine, name = np.diag([3.0, 3.0, 3.0, 1.0]), "synthetic"
    for axis, factor in enumerate(factors):
        values = values.repeat(factor, axis=axis)
        affine[:3, axis] /= factor
    nib.save(nib.Nifti1Image(values, affine), str(path))
    return list(values.shape), name


def chain_of(variant: str, image_size: int):
    from monai.transforms import Compose

    from medsam3_monai.engines.evaluation import evaluation_transforms
    from medsam3_monai.transforms import EachItem, GreyToRGBd, Sam3Normalized, TiledResizeToSliced, transforms_of

    chain = evaluation_transforms(image_size)  # the inference bundle's preprocessing
    if variant == "levels":
        return chain
    head = list(chain.transforms[:-1])  # load, decode, intensity, axial slices
    each = chain.transforms[-1]
    assert isinstance(each, EachItem)
    [resize] = [t for t in transforms_of(each) if isinstance(t, TiledResizeToSliced)]
    return Compose(head + [GreyToRGBd(keys="image"), resize, Sam3Normalized(keys="image")])


def child(variant: str, path: str, image_size: int, reference: str | None) -> None:
    """Runs inside the measured process; prints one JSON line."""
    import torch

    from medsam3_monai.networks import network_pixels

    chain = chain_of(variant, image_size)
    item = {"image": path, "modality": "CT", "prompts": {"1": "liver"}}
    chain_of(variant, 16)({"image": path, "modality": "CT", "prompts": {"1": "liver"}})  # warm-up: imports, code paths
    import gc

    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    items = chain(item)
    slices = torch.stack([s["image"].as_tensor() for s in items])  # what PromptInferer hands to segment_volume
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    held = sum(s["image"].numel() * s["image"].element_size() for s in items) + slices.numel() * slices.element_size()
    out = {"seconds": seconds, "baseline_kb": baseline_kb, "peak_kb": peak_kb, "held_bytes": held,
           "slices": len(items), "slice": list(items[0]["image"].shape), "dtype": str(slices.dtype)[6:],
           "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss"}
    picks = list(range(0, len(items), max(1, len(items) // 8)))  # the network input of a few slices, to compare
    pixels = torch.stack([network_pixels(slices[z : z + 1], "cpu")[0] for z in picks])
    if reference is None:
        torch.save({"picks": picks, "pixels": pixels}, Path(path).with_suffix(".input.pt"))
    else:
        saved = torch.load(reference)
        if saved["picks"] != picks:
            raise SystemExit("the variants sliced the volume differently")
        levels = lambda x: torch.round((x + 1) * 127.5)  # noqa: E731 (normalised float -> its 8-bit level)
        out["inputs_equal"] = bool(torch.equal(pixels, saved["pixels"]))
        out["inputs_differing"] = int((levels(pixels) != levels(saved["pixels"])).sum())
        out["inputs_max_level_step"] = float((levels(pixels) - levels(saved["pixels"])).abs().max())
    print(json.dumps(out))


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least, slice_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=slice_size, default=1008)
    parser.add_argument("--factors", type=at_least(1), nargs=3, default=[3, 3, 10], help="repeats of the example CT")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch threads in the children")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medsam3-bench-volume-input"))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], args.child[1], args.image_size, args.reference)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"ct_{'x'.join(map(str, args.factors))}.nii.gz"
    shape, source = write_ct(path, tuple(args.factors))
    results: dict[str, object] = {"source": source, "volume_shape": shape, "image_size": args.image_size,
                                  "threads": args.threads}
    raw: dict[str, dict] = {}
    for variant in VARIANTS:  # levels first: it saves the network input that float_rgb is compared with
        command = [sys.executable, __file__, "--child", variant, str(path), "--image-size", str(args.image_size),
                   "--threads", str(args.threads)]
        if variant != VARIANTS[0]:
            command += ["--reference", str(path.with_suffix(".input.pt"))]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SystemExit(f"{variant}: exit {done.returncode}: {' | '.join(tail)}")
        raw[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        r = raw[variant]
        results[variant] = {
            "seconds": round(r["seconds"], 2),
            "peak_rss_gib": round((r["peak_kb"] - r["baseline_kb"]) / 2**20, 3),
            "slices_gib": round(r["held_bytes"] / 2**30, 3),
            "slice": r["slice"], "dtype": r["dtype"], "peak_source": r["peak_source"],
            **{k: r[k] for k in ("inputs_equal", "inputs_differing", "inputs_max_level_step") if k in r},
        }
    new, old = results["levels"], results["float_rgb"]
    results["float_rgb_over_levels"] = {key: round(old[key] / new[key], 2)
                                       for key in ("seconds", "peak_rss_gib", "slices_gib") if new[key] > 0}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
