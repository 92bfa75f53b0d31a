#!/usr/bin/env python
"""Benchmark the tracker's propagation of many prompts: one prompt at a time vs a batch of prompts.

Prints one JSON object. The volume: the TotalSegmentator example CT (122 x 101 x 30 voxels at 3 mm; a synthetic
body when the folder is absent), each slice repeated ``--repeat`` times along z (default 4: 120 slices), through the
evaluation's preprocessing to the tiny network's slice space; ``--prompts`` organ prompts (default 12). The tiny
tracker's features of every slice are computed once (in the tiny detector's pass, which also gives the seed masks).
Two sets of seeds: ``detector_seeds``, the slices the tiny detector picks (score threshold 0, so every prompt is
tracked; a random-weight detector picks nearly the same slice for every prompt), and ``spread_seeds``, seeds spread
evenly over the volume (organs along a CT: the planner's worst case). For each, ``inferers.tracking.track_prompts``
runs with ``max_batch`` 1 (each prompt alone, as transformers' tracker runs its objects) and ``--batch`` (default 8):

* ``seconds``: the median of ``--repeats`` runs of each, and ``one_at_a_time_over_batched``, their ratio (one run);
* ``operators_per_prompt_slice``: the operators each run dispatches (``bench_train.OperatorCount``) per prompt and
  slice -- on a GPU about the kernel launches, which bound the tracker's small per-slice steps there;
* ``batches``: the seeds as the planner batched them, and ``steps_per_prompt_slice`` (a batch runs on a common
  timeline, longer than one prompt's when its seeds differ; its extra steps are computed and discarded);
* ``differing_pixels``: the pixels whose mask differs between the two runs (batched matrix products may round the
  last bit differently; the tests hold it to at most 1 in 10,000).

    python scripts/bench_tracker.py                      # tiny, CPU, 1 thread
    python scripts/bench_tracker.py --threads 2 --prompts 24 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
sys.path.insert(0, str(REPO / "scripts"))
SHARED = REPO.parent / "shared" / "data"

ORGANS = ["liver", "spleen", "left kidney", "right kidney", "stomach", "pancreas", "aorta", "inferior vena cava",
          "gallbladder", "esophagus", "left lung", "right lung", "heart", "urinary bladder", "duodenum", "colon"]


def ct_slices(network, repeat: int, work: Path) -> tuple[torch.Tensor, str]:
    """The example CT (else a synthetic body), each slice ``repeat`` times along z, as the evaluation's
    preprocessing gives its slices to the volume path: (D, C, S, S) at the network's slice side."""
    import nibabel as nib

    from medsam3_monai.engines.evaluation import evaluation_transforms
    from medsam3_monai.tensors import plain_tensor

    path = SHARED / "TotalSegmentator_example_CT_MR" / "images" / "example_ct_sm.nii.gz"
    if path.is_file():
        nifti = nib.load(str(path))
        image, affine, source = np.asarray(nifti.dataobj).astype(np.int16), nifti.affine, "TotalSegmentator CT"
    else:
        grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (122, 101, 30)), indexing="ij"))
        image = np.where((grid[:2] ** 2).sum(0) < 0.8, 40, -1000).astype(np.int16)
        affine, source = np.diag([3.0, 3.0, 3.0, 1.0]), "synthetic body"
    file = work / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.repeat(image, repeat, axis=2), affine), str(file))
    item = {"image": str(file), "modality": "CT", "prompts": {"1": "liver"}, "case": "ct"}
    slices = evaluation_transforms(network.image_size)(item)
    return torch.stack([plain_tensor(s["image"]) for s in slices]), source


def compare(tracker, features, seeds: list[int], seed_masks: torch.Tensor, size: int, args) -> dict:
    """``track_prompts`` with these seeds one prompt at a time and ``args.batch`` at a time (module docstring)."""
    from bench_train import OperatorCount
    from medsam3_monai.inferers import BitMasks
    from medsam3_monai.inferers.tracking import plan_tracking_groups, track_prompts, tracker_lookahead

    depth, prompts = len(features.frames), len(seeds)

    def run(max_batch: int) -> dict[int, torch.Tensor]:
        return dict(track_prompts(tracker, features.frames, features.positions, seeds, seed_masks, size,
                                  max_batch=max_batch))

    result: dict = {"seeds": seeds, "seconds": {}, "operators_per_prompt_slice": {}, "steps_per_prompt_slice": {}}
    masks = {}
    for max_batch in (1, args.batch):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            masks[max_batch] = run(max_batch)
            times.append(time.perf_counter() - start)
        with OperatorCount() as count:
            run(max_batch)
        key = f"batch_{max_batch}"
        result["seconds"][key] = round(statistics.median(times), 3)
        result["operators_per_prompt_slice"][key] = round(count.calls / (prompts * depth), 1)
        groups = plan_tracking_groups(seeds, depth, tracker_lookahead(tracker), max_batch)
        result["steps_per_prompt_slice"][key] = round(sum(g.num_steps * len(g.members) for g in groups)
                                                      / (prompts * depth), 3)
    result["one_at_a_time_over_batched"] = round(result["seconds"]["batch_1"] / result["seconds"][key], 3)
    result["batches"] = [list(g.seeds) for g in plan_tracking_groups(seeds, depth, tracker_lookahead(tracker),
                                                                     args.batch)]
    result["differing_pixels"] = sum(
        int((BitMasks(masks[1][p], size).unpack() != BitMasks(masks[args.batch][p], size).unpack()).sum())
        for p in range(prompts))
    return result


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=at_least(1), default=12)
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--repeat", type=at_least(1), default=4, help="each CT slice this many times along z")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from medsam3_monai.inferers.volume import _TrackerFeatures, detect_slices, select_seeds
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.tracker import build_tracker

    network = MedSAM3Net("tiny").eval()
    tracker = build_tracker("tiny", detector=network).eval()
    prompts = (ORGANS * (args.prompts // len(ORGANS) + 1))[: args.prompts]
    with tempfile.TemporaryDirectory(prefix="bench_tracker_") as work:
        slices, source = ct_slices(network, args.repeat, Path(work))
    size, depth = network.image_size, slices.shape[0]
    features = _TrackerFeatures(tracker)
    with torch.no_grad():
        detected, scores = detect_slices(network, slices, prompts, vision_hook=features.from_vit_output,
                                         pixels_normalized=True)
    detector_seeds = select_seeds(detected, scores, 0.0).tolist()
    spread_seeds = np.linspace(0, depth - 1, len(prompts)).round().astype(int).tolist()
    result: dict = {"volume": source, "slices": depth, "slice_size": size, "prompts": len(prompts),
                    "batch": args.batch, "threads": torch.get_num_threads()}
    for name, seeds in (("detector_seeds", detector_seeds), ("spread_seeds", spread_seeds)):
        seed_masks = torch.stack([detected[p, s].unpack() for p, s in enumerate(seeds)])
        result[name] = compare(tracker, features, seeds, seed_masks, size, args)
    result.update(torch=torch.__version__, machine=platform.machine(), loadavg_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
