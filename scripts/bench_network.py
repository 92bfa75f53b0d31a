#!/usr/bin/env python
"""Benchmark MedSAM3Net: forward and train-step time, and the overhead of our forward over Sam3Model.forward.

Prints one JSON object. Timings are medians over interleaved repeats in one run, so the ratio
``forward_ratio_vs_sam3model`` (target <= 1.02) is steadier than either time on a noisy machine (one thread on
CPU by default; the JSON records the load average, as the other benchmarks do). The reference does the same work
as ours: ``Sam3Model.forward`` on SAM3's official text-only prompt (text tokens + the geometry encoder's token,
``official_numerics.sam3model_text_only_forward``); ours adds every decoder layer's outputs.

    python scripts/bench_network.py                     # tiny preset on CPU
    python scripts/bench_network.py --full --device cuda --dtype bfloat16 --batch 1 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))

from medsam3_monai.networks import MedSAM3Net, full_sam3_config, normalize_pixels
from medsam3_monai.networks.official_numerics import sam3model_text_only_forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least, slice_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full SAM3 config at 1008 px (random init)")
    parser.add_argument("--image-size", type=slice_size, default=None)
    parser.add_argument("--batch", type=at_least(1), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the train step")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch threads (default: 1 on CPU, where more threads on shared cores make the ratio "
                             "noisy; torch's own on a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (leave --device out: cpu)")
    config = full_sam3_config(args.image_size or 1008) if args.full else None
    net = MedSAM3Net("tiny", config=config, image_size=args.image_size, gradient_checkpointing=args.checkpointing)
    net.to(device)
    size = net.image_size
    images = torch.rand(args.batch, 3, size, size, device=device)
    prompts = ["polyp", "liver tumor", "cell nucleus", "retinal blood vessel"] * (args.batch // 4 + 1)
    prompts = prompts[: args.batch]
    input_ids, attention_mask = (t.to(device) for t in net.tokenize(prompts))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    repeats = max(3, args.repeats)

    net.eval()
    net.text_cache.max_size = 0  # compare like with like: both paths encode the text every call
    ours, bare = [], []
    with torch.no_grad(), autocast:
        def reference():
            return sam3model_text_only_forward(net.sam3, normalize_pixels(images), input_ids, attention_mask)

        for _ in range(2):  # warm-up
            net(images, prompts)
            reference()
        for _ in range(repeats):
            ours.append(_timed(lambda: net(images, prompts), device))
            bare.append(_timed(reference, device))

    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def train_step() -> None:
        with autocast:
            out = net(images, prompts)
            # surrogate objective touching every output head (the set-prediction criterion is benchmarked in bench_train)
            loss = out.pred_masks.float().sigmoid().mean() + out.all_pred_logits.float().mean()
            loss = loss + out.all_pred_boxes.float().mean() + out.semantic_seg.float().mean()
            loss = loss + out.all_presence_logits.float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step()
    steps = [_timed(train_step, device) for _ in range(max(3, repeats // 2))]
    forward_ms = statistics.median(ours) * 1e3
    bare_ms = statistics.median(bare) * 1e3
    result = {
        "benchmark": "network",
        "config": "full" if args.full else "tiny",
        "image_size": size,
        "batch": args.batch,
        "device": str(device),
        "dtype": args.dtype,
        "gradient_checkpointing": args.checkpointing,
        "parameters": sum(p.numel() for p in net.parameters()),
        "threads": torch.get_num_threads(),
        "forward_ms": round(forward_ms, 3),
        "sam3model_forward_ms": round(bare_ms, 3),
        "forward_ratio_vs_sam3model": round(forward_ms / bare_ms, 4),
        "train_step_ms": round(statistics.median(steps) * 1e3, 3),
        "images_per_s_train": round(args.batch / statistics.median(steps), 2),
        "host": platform.processor() or platform.machine(),
        "loadavg_1min": round(os.getloadavg()[0], 2),  # a busy machine's numbers say so
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
