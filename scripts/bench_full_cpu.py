#!/usr/bin/env python
"""Full-size CPU smoke: one 1008-px picture through ``medsam3 segment`` with the full SAM3 architecture (random
weights), so the real-size path (ViT at 72 x 72 tokens, 288-px masks, 1008-px slice space, inversion) runs on every
machine; the tiny network's run of the same command is the reference.

Prints one JSON object: per network, seconds (building the network, then segmenting + writing) and the peak
resident memory of its process, and the full / tiny ratios. Each network runs in a fresh process (peak RSS is per
process). The full network comes from ``networks.presets.full_sam3_config`` with random initialisation; it is
built here, in the script (``medsam3 segment`` has no random full-size source on purpose: a user must never get
random weights by accident): ``Predictor.from_checkpoint`` is swapped for the duration of the command, and the
sidecar records the checkpoint as ``full-random``. Everything else is the command as users run it:
``medsam3_monai.deploy.cli.main(["segment", PICTURE, "--prompt", "polyp", "--out", ...])``.

    python scripts/bench_full_cpu.py                  # both networks, 2 threads
    python scripts/bench_full_cpu.py --threads 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
SHARED = REPO.parent / "shared" / "data"
FULL_SOURCE = "full-random"


def make_picture(path: Path, size: int = 1008) -> str:
    """A ``size`` x ``size`` RGB picture: a shared Kvasir-SEG sample resized, else a synthetic one."""
    import numpy as np
    from PIL import Image

    samples = sorted((SHARED / "Kvasir-SEG_sample" / "images").glob("*.jpg")) if SHARED.is_dir() else []
    if samples:
        Image.open(samples[0]).convert("RGB").resize((size, size), Image.BILINEAR).save(path)
        return f"{samples[0].name} resized to {size}x{size}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return f"synthetic {size}x{size}"


def worker(network: str, picture: str, out: str, threads: int) -> dict:
    """Runs in its own process: the ``medsam3 segment`` command on ``picture``; timings and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from medsam3_monai.deploy.cli import main
    from medsam3_monai.inferers import predict

    timings: dict[str, float] = {}
    original = predict.Predictor.from_checkpoint.__func__
    network_info: dict[str, object] = {}

    def from_checkpoint(cls, checkpoint="tiny", image_size=None, device=None, detector_chunk=None, **kwargs):
        start = time.perf_counter()
        if network == "full":
            from medsam3_monai.networks import MedSAM3Net, full_sam3_config

            chunk = {} if detector_chunk is None else {"detector_chunk": detector_chunk}
            net = MedSAM3Net("tiny", config=full_sam3_config(), **chunk).eval()  # random init, full architecture
            predictor = cls(net.to(device) if device is not None else net, checkpoint=FULL_SOURCE, **kwargs)
        else:
            predictor = original(cls, checkpoint, image_size, device, detector_chunk, **kwargs)
        timings["build_s"] = time.perf_counter() - start
        network_info.update(parameters=sum(p.numel() for p in predictor.network.parameters()),
                            image_size=int(predictor.network.image_size))
        return predictor

    predict.Predictor.from_checkpoint = classmethod(from_checkpoint)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    code = main(["segment", picture, "--prompt", "polyp", "--out", out, "--no-progress", "--tracker", "none",
                 "--device", "cpu"])
    total = time.perf_counter() - start
    sidecar = json.loads(Path(f"{out}.json").read_text()) if code == 0 else {}
    return {
        "exit_code": code,
        **network_info,
        "build_s": round(timings.get("build_s", float("nan")), 2),
        "segment_s": round(total - timings.get("build_s", 0.0), 2),
        "command_s": round(total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_command_mb": round(rss_before, 1),
        "mask_shape": sidecar.get("shape"),
        "checkpoint": sidecar.get("checkpoint"),
    }


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--networks", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--worker", choices=["tiny", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--picture", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.picture, args.out, args.threads)))
        return

    result: dict[str, object] = {"benchmark": "full-size CPU smoke (medsam3 segment, one 1008-px picture)",
                                 "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-full-cpu-") as tmp:
        picture = Path(tmp) / "picture_1008.png"
        result["picture"] = make_picture(picture)
        for network in args.networks:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--worker", network, "--picture", str(picture),
                                   "--out", str(Path(tmp) / f"{network}_mask.png"), "--threads", str(args.threads)],
                                  capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                result[network] = {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
                continue
            entry = json.loads(done.stdout.strip().splitlines()[-1])
            entry["process_s"] = round(time.perf_counter() - start, 2)  # imports included
            if entry["exit_code"] != 0:
                entry["error"] = [f"medsam3 segment exited {entry['exit_code']}"]
            result[network] = entry
    full, tiny = result.get("full"), result.get("tiny")
    if isinstance(full, dict) and isinstance(tiny, dict) and "error" not in full and "error" not in tiny:
        result["full_over_tiny"] = {key: round(full[key] / tiny[key], 1)
                                    for key in ("segment_s", "command_s", "peak_rss_mb") if tiny[key]}
    import torch

    result.update(torch=torch.__version__, host=platform.processor() or platform.machine())
    print(json.dumps(result, indent=2))
    failed = [network for network in args.networks if "error" in result.get(network, {})]
    if failed:
        sys.exit(f"bench_full_cpu.py: {', '.join(failed)} failed (see 'error' above)")


if __name__ == "__main__":
    main()
