#!/usr/bin/env python
"""Benchmark the memory of ``medsam3 segment`` on large 2D inputs: peak bytes per input pixel.

Prints one JSON object ``{"1Mpx": {"bytes_per_pixel": ..., "seconds": ...}, "16Mpx": ..., "64Mpx": ...}``
(plus the measurement's raw numbers), for synthetic RGB pictures of 1000², 4000² and 8000² pixels (target:
``bytes_per_pixel <= 20``).

What is measured (one fresh child process per size, tiny network, CPU):

1. the child imports the package and runs ``medsam3 segment small.png --prompt ... --out ...`` once on a
   64 x 64 picture (warm-up: libraries, the network's first forward and the bundle's config parsing are
   in place and their working memory is in the heap, none of which grows with the input);
2. it runs the same command, in the same process, on the large picture. Right before that run reads the
   image (the first call of ``transforms.io.load_medical_image``, after the network is built) it records
   its RSS (``/proc/self/status`` ``VmRSS``): the **baseline**; it then resets the kernel's peak-RSS mark
   (``/proc/self/clear_refs`` = 5; where that is not allowed, ``ru_maxrss`` -- the lifetime peak, which can
   only make the figure larger -- is used instead);
3. **peak** = ``VmHWM`` (peak RSS since the reset) after the command returned, mask PNG and sidecar written.

``bytes_per_pixel = (peak - baseline) / (H * W)``: everything the command allocated and touched because of
this input, from decoding the file to writing the mask, counted in resident memory (torch's and numpy's
allocations included, which ``tracemalloc`` would miss); ``within_target``: at most 20. Not counted: the
process's memory before the read (libraries, the network), which does not depend on the input. ``seconds``
is the wall time of the whole command (load, inference, inversion, merge, writing) on the large picture; on
shared cores it varies with the load. The pictures are written once to ``--workdir`` (fast PNG,
``compress_level=1``) and reused.

    python scripts/bench_memory.py                    # 1, 16, 64 Mpx
    python scripts/bench_memory.py --sizes 1000 4000  # a subset (side lengths)
    python scripts/bench_memory.py --overlay          # the same with --overlay PNG written too
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))

PROMPT = "bright disc"
TARGET_BYTES_PER_PIXEL = 20.0


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_picture(path: Path, side: int) -> None:
    """A smooth RGB picture with a bright disc, ``side`` x ``side``, written in row bands (bounded memory)."""
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (side, side))
    band = max(1, 4_000_000 // side)
    cols = np.arange(side, dtype=np.float32)
    for top in range(0, side, band):
        rows = np.arange(top, min(side, top + band), dtype=np.float32)[:, None]
        r = 60 + 60 * np.sin(rows / side * 6.0) * np.cos(cols / side * 4.0)
        g = 80 + 40 * np.cos(rows / side * 3.0 + cols / side * 2.0)
        b = np.broadcast_to(90 + 50 * (cols / side), r.shape)
        disc = (rows - side * 0.45) ** 2 + (cols - side * 0.55) ** 2 < (side * 0.2) ** 2
        rgb = np.stack([r, g, b], axis=-1)
        rgb[disc] = 230
        image.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB"), (0, top))
    image.save(path, format="PNG", compress_level=1)


OVERLAY_ENV = "MEDSAM3_BENCH_OVERLAY"


def child(image: str, small: str, out: str) -> None:
    """Runs inside the measured process; prints one JSON line."""
    from medsam3_monai.deploy.cli import main
    from medsam3_monai.transforms import io

    def segment(path: str, target: str) -> int:
        overlay = ["--overlay", str(Path(target).with_suffix(".overlay.png"))] if os.environ.get(OVERLAY_ENV) else []
        return main(["segment", path, "--prompt", PROMPT, "--out", target, "--overwrite", *overlay])

    if segment(small, str(Path(out).with_name("warmup.png"))) != 0:
        raise SystemExit("warm-up run failed")
    import gc

    gc.collect()
    state: dict[str, object] = {}
    original = io.load_medical_image

    def load(path, *args, **kwargs):
        if str(path) == image and "baseline_kb" not in state:
            state["baseline_kb"] = _status_kb("VmRSS")
            state["reset"] = _reset_peak()
            state["maxrss_before_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return original(path, *args, **kwargs)

    io.load_medical_image = load
    start = time.perf_counter()
    code = segment(image, out)
    seconds = time.perf_counter() - start
    if code != 0 or "baseline_kb" not in state:
        raise SystemExit(f"segment failed (exit {code})")
    peak_kb = _status_kb("VmHWM") if state["reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"baseline_kb": state["baseline_kb"], "peak_kb": peak_kb, "seconds": seconds,
                      "peak_source": "VmHWM after clear_refs" if state["reset"] else "ru_maxrss"}))


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=at_least(1), nargs="+", default=[1000, 4000, 8000], help="square side lengths")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medsam3-bench-memory"))
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads in the child (default: torch's)")
    parser.add_argument("--overlay", action="store_true", help="also write --overlay (measured with it)")
    parser.add_argument("--child", nargs=3, metavar=("IMAGE", "SMALL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        child(*args.child)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    small = work / "small_64.png"
    if not small.exists():
        write_picture(small, 64)
    results: dict[str, object] = {}
    for side in args.sizes:
        picture = work / f"rgb_{side}.png"
        if not picture.exists():
            write_picture(picture, side)
        command = [sys.executable, __file__, "--child", str(picture), str(small), str(work / f"mask_{side}.png")]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({OVERLAY_ENV: "1"} if args.overlay else {})}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        megapixels = side * side / 1e6
        name = f"{round(megapixels)}Mpx" if megapixels >= 1 else f"{megapixels:.2g}Mpx"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            results[name] = {"error": " | ".join(tail), "exit": done.returncode}
            continue
        raw = json.loads(done.stdout.strip().splitlines()[-1])
        pixels = side * side
        bytes_per_pixel = (raw["peak_kb"] - raw["baseline_kb"]) * 1024 / pixels
        results[name] = {
            "bytes_per_pixel": round(bytes_per_pixel, 2),
            "within_target": bytes_per_pixel <= TARGET_BYTES_PER_PIXEL,
            "seconds": round(raw["seconds"], 2),
            "pixels": pixels,
            "baseline_mb": round(raw["baseline_kb"] / 1024, 1),
            "peak_mb": round(raw["peak_kb"] / 1024, 1),
            "peak_source": raw["peak_source"],
        }
    results["target_bytes_per_pixel"] = TARGET_BYTES_PER_PIXEL
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
