#!/usr/bin/env python
"""Benchmark batched ``medsam3 segment``: images/s over the shared 2D samples at batch size 1 vs 8.

Prints one JSON object. The inputs are the 2D samples of ../shared/data (Kvasir-SEG JPEGs 529-1348 px RGB, chest
X-rays 512 px grey; synthetic pictures of the same sizes when the folder is absent), copied ``--copies`` times
under distinct names. With one loaded network (tiny, CPU by default) each setting runs what
``medsam3 segment FOLDER --out-dir DIR`` runs after loading: ``Predictor.predict_many`` (DataLoader over the
inference.json preprocessing, several 2D images per forward, inversion and merge) and the same writers (PNG mask +
JSON sidecar per input). Reported per setting: the median over ``--repeats`` passes of images/s end to end, and,
apart, the network alone (``segment_image_batch`` on already-preprocessed images: forward + protocol) at batch
1 vs 8. ``masks_identical``: every batch-8 mask equals its batch-1 mask; ``differing_pixels``: how many pixels do not
(a pixel whose mask logit lies within float rounding of 0 may fall on either side in a batched forward:
``tests/test_batched_segment.py`` checks that only such pixels differ).

    python scripts/bench_segment.py                      # tiny, CPU, 1 thread
    python scripts/bench_segment.py --threads 2 --copies 8 --device cuda --checkpoint /weights/sam3-hf
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
SHARED = REPO.parent / "shared" / "data"


def sample_pictures(folder: Path, copies: int) -> tuple[list[Path], str]:
    """The shared 2D samples (else synthetic pictures of the same sizes), ``copies`` times, distinct names."""
    sources = []
    for name in ("Kvasir-SEG_sample", "ChestXray_lung_sample"):
        if (SHARED / name / "images").is_dir():
            sources += sorted((SHARED / name / "images").glob("*.jpg"))
    origin = "shared samples"
    if not sources:
        from PIL import Image

        origin = "synthetic"
        rng = np.random.default_rng(0)
        for i, (h, w, mode) in enumerate([(529, 622, "RGB"), (1070, 1348, "RGB"), (512, 512, "L")] * 3):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            path = folder / f"synthetic{i}.png"
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
            sources.append(path)
    pictures = []
    for copy in range(copies):
        for i, source in enumerate(sources):
            target = folder / f"c{copy}_{i}_{source.name}"
            if source != target:
                shutil.copy(source, target)
            pictures.append(target)
    return pictures, origin


def end_to_end(predictor, items: list[dict], out: Path, batch_size: int, workers: int) -> float:
    """One pass of what ``medsam3 segment ... --out-dir`` does after loading; returns seconds."""
    from medsam3_monai.deploy.segment_cli import write_prediction

    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    for item, prediction in predictor.predict_many(items, batch_size=batch_size, num_workers=workers):
        target = out / f"{Path(item['image']).stem}_seg.png"
        write_prediction(prediction, item["image"], target, Path(f"{target}.json"))
    return time.perf_counter() - start


def forward_only(network, images: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Images/s of ``segment_image_batch`` (forward + protocol) over preprocessed images; median of repeats."""
    from medsam3_monai.inferers.batch import segment_image_batch

    def one_pass() -> None:
        for start in range(0, images.shape[0], batch_size):
            part = images[start:start + batch_size]
            segment_image_batch(network, part, [["polyp"]] * part.shape[0])

    one_pass()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(times)


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--copies", type=at_least(1), default=4, help="copies of the sample set (9 pictures each)")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[1, 8])
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 2],
                        help="DataLoader workers to try at the largest batch size (the others run with the first)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads (1: stable on shared cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from medsam3_monai.inferers.predict import Predictor
    from medsam3_monai.tensors import plain_tensor

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_segment.py: --device {args.device}: this machine has no CUDA device")
    from medsam3_monai.networks import CheckpointError

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=torch.device(args.device), tracker="none")
    except (CheckpointError, ValueError) as err:  # the CLI's one line, not a traceback
        raise SystemExit(f"bench_segment.py: --checkpoint {args.checkpoint}: {err}") from None
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        pictures, origin = sample_pictures(tmp / "in", args.copies)
        items = [predictor.item(p, ["polyp"]) for p in pictures]
        end_to_end(predictor, items[:4], tmp / "warmup", 2, 0)  # first-call costs (caches, allocator)

        settings = [(b, args.workers[0]) for b in args.batch_sizes]
        settings += [(max(args.batch_sizes), w) for w in args.workers[1:]]
        results, passes = {}, {}
        for _ in range(args.repeats):  # interleaved: a noisy machine slows every setting alike
            for batch_size, workers in settings:
                key = f"batch_{batch_size}" + (f"_workers_{workers}" if workers else "")
                passes.setdefault(key, []).append(
                    end_to_end(predictor, items, tmp / f"out_{key}", batch_size, workers))
        for key, times in passes.items():
            results[key] = {"images_per_s": round(len(items) / statistics.median(times), 3),
                            "seconds_median": round(statistics.median(times), 3)}

        first, last = (f"batch_{b}" for b in (min(args.batch_sizes), max(args.batch_sizes)))
        differing = sum(  # a pixel whose logit lies within float rounding of 0 may flip between batch sizes
            int(np.count_nonzero(np.asarray(_png(tmp / f"out_{first}" / p.name)) != np.asarray(_png(p))))
            for p in sorted((tmp / f"out_{last}").glob("*.png"))
        )

        preprocessing, _ = predictor.pipeline()
        images = torch.stack([plain_tensor(preprocessing(dict(item))[0]["image"]) for item in items])
        network_only = {f"batch_{b}": round(forward_only(predictor.network, images, b, args.repeats), 3)
                        for b in args.batch_sizes}

    result = {
        "benchmark": "segment (batched, --out-dir)",
        "checkpoint": args.checkpoint,
        "image_size": int(predictor.network.image_size),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "inputs": len(items),
        "inputs_from": origin,
        "end_to_end": results,
        "end_to_end_speedup": round(results[last]["images_per_s"] / results[first]["images_per_s"], 3),
        "network_only_images_per_s": network_only,
        "network_only_speedup": round(network_only[last] / network_only[first], 3),
        "masks_identical": differing == 0,
        "differing_pixels": differing,
        "torch": torch.__version__,
        "host": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


def _png(path: Path):
    from PIL import Image

    return Image.open(path)


if __name__ == "__main__":
    main()
