#!/usr/bin/env python
"""Benchmark training: iterations/s, images/s and peak memory of MedSAM3Trainer (the bundle's engine).

Prints one JSON object. Synthetic find-query batches, collated as the training bundle's loader collates slice-space
items (random uint8 8-bit-level images as MONAI MetaTensors, one prompt per image with random box targets and masks),
go through the real iteration: ``PrepareFindBatch`` (normalised on the device), MedSAM3Net forward, SetCriterion
(all terms, one-to-many included), backward, gradient clipping, AdamW with SAM3's parameter groups.

    python scripts/bench_train.py                                   # tiny preset on CPU
    python scripts/bench_train.py --full --device cuda --batch 4    # full SAM3 at 1008 px, bf16 autocast
    python scripts/bench_train.py --full --device cuda --checkpointing
    python scripts/bench_train.py --full --device cuda --compile    # the vision encoder under torch.compile

``train_step_tflop``: the FLOPs of one training step, counted by ``torch.utils.flop_counter``; on CUDA also the
FLOPs utilisation ``mfu``: those FLOPs divided by the step time and the GPU's dense bf16 peak (``--peak-tflops``, 989
for an H100 SXM). With ``--checkpointing`` they include the forward recomputed in the backward (hardware FLOPs);
``model_step_tflop`` and ``mfu_model_flops`` leave it out (the step's model FLOPs, as MFU is usually quoted).
``operators_per_step``: the operators an eager step dispatches in its forward, criterion and backward (on a GPU, about
its kernel launches: what bounds a step of small kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Events
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))

from medsam3_monai.engines import MedSAM3Trainer, PrepareFindBatch, build_optimizer
from medsam3_monai.engines import autocast_for as trainer_autocast
from medsam3_monai.engines.batch import collate_find_queries
from medsam3_monai.losses import SetCriterion
from medsam3_monai.networks import MedSAM3Net, full_sam3_config


def synthetic_batch(batch: int, size: int, instances: int, seed: int = 0) -> dict:
    """A loader batch as the training bundle's gives it: ``batch`` slice-space items -- the image a MONAI
    ``MetaTensor`` of uint8 8-bit levels (3, S, S), one prompt with ``instances`` square targets -- collated by
    ``engines.collate_find_queries``."""
    from monai.data import MetaTensor

    from medsam3_monai.instance_masks import InstanceMasks

    generator = torch.Generator().manual_seed(seed)
    prompts = ["polyp", "liver tumor", "cell nucleus", "retinal blood vessel"] * (batch // 4 + 1)
    items = []
    for index in range(batch):
        centre = torch.rand(instances, 2, generator=generator) * 0.6 + 0.2
        side = torch.rand(instances, 1, generator=generator) * 0.2 + 0.1
        box = torch.cat([centre, side, side], dim=1)
        mask = torch.zeros(instances, size, size, dtype=torch.bool)
        for k, (cx, cy, w, h) in enumerate((box * size).round().long().tolist()):
            mask[k, max(cy - h // 2, 0): cy + h // 2, max(cx - w // 2, 0): cx + w // 2] = True
        image = MetaTensor(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
                           meta={"filename_or_obj": f"synthetic_{index}.png"})
        target = {"label": 1, "text": prompts[index], "boxes": box, "masks": InstanceMasks.from_dense(mask),
                  "is_negative": False}
        items.append({"image": image, "targets": [target]})
    return collate_find_queries(items)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    from medsam3_monai.deploy.arguments import at_least, slice_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full SAM3 config (random init) at 1008 px")
    parser.add_argument("--image-size", type=slice_size, default=None)
    parser.add_argument("--batch", type=at_least(1), default=4)
    parser.add_argument("--instances", type=at_least(1), default=4, help="target instances per prompt")
    parser.add_argument("--iterations", type=at_least(1), default=20)
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the vision encoder's forward (inferers.batch.compile_network)")
    parser.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU")
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--profile", default=None, help="write the operators of one more step, by device time, here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (leave --device out: cpu)")
    if args.compile:  # before the network is built and its FLOPs counted
        from medsam3_monai.inferers.batch import check_compile_toolchain

        try:
            check_compile_toolchain(device)
        except ValueError as err:
            parser.error(str(err))
    torch.manual_seed(0)
    config = full_sam3_config(args.image_size or 1008) if args.full else None
    network = MedSAM3Net("tiny", config=config, image_size=args.image_size,
                         gradient_checkpointing=args.checkpointing).to(device)
    size = network.image_size
    optimizer = build_optimizer(network)
    batch = synthetic_batch(args.batch, size, args.instances)
    flops = step_flops(network, batch, device, not args.no_bf16)  # counted eagerly, before any compilation
    model_flops = flops
    if args.checkpointing:  # the step's model FLOPs: without the forward that checkpointing recomputes
        network.set_gradient_checkpointing(False)
        model_flops = step_flops(network, batch, device, not args.no_bf16)
        network.set_gradient_checkpointing(True)
    operators = step_operators(network, batch, device, not args.no_bf16)
    if args.compile:
        from medsam3_monai.inferers.batch import compile_network

        compile_network(network, compile=True)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    trainer = MedSAM3Trainer(device=device, max_epochs=1, train_data_loader=[batch] * (args.warmup + args.iterations),
                             network=network, optimizer=optimizer, loss_function=SetCriterion(),
                             bf16=not args.no_bf16, amp=False)
    times: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: (_sync(device), times.append(time.perf_counter())))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (_sync(device), times.append(time.perf_counter())))
    trainer.run()
    times = times[2 * args.warmup:]
    steps = sorted(end - start for start, end in zip(times[::2], times[1::2]))
    median = steps[len(steps) // 2]
    result = {
        "config": "full" if args.full else "tiny",
        "image_size": size,
        "batch": args.batch,
        "device": str(device),
        "bf16": device.type == "cuda" and not args.no_bf16,
        "gradient_checkpointing": args.checkpointing,
        "compile": args.compile,
        "optimizer": "fused AdamW" if optimizer.defaults.get("fused") else "AdamW",
        "parameters": sum(p.numel() for p in network.parameters()),
        "step_s_median": round(median, 4),
        "iterations_per_s": round(1 / median, 3),
        "images_per_s": round(args.batch / median, 3),
        "loss_last": trainer.state.output[0]["loss"]["loss"],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    result["train_step_tflop"] = round(flops / 1e12, 6)
    if args.checkpointing:
        result["model_step_tflop"] = round(model_flops / 1e12, 6)
    result["operators_per_step"] = operators  # eager, one step without the optimiser
    if device.type == "cuda":
        result["mfu"] = round(flops / median / (args.peak_tflops * 1e12), 4)
        if args.checkpointing:
            result["mfu_model_flops"] = round(model_flops / median / (args.peak_tflops * 1e12), 4)
    if args.profile:  # one more step, its operators by device time
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_gpu import write_profile

        write_profile(lambda: trainer._process_function(trainer, batch), device, Path(args.profile),  # one step
                      f"training step, batch {args.batch}, checkpointing {args.checkpointing}")
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_rss_increase_mb"] = round(result["peak_rss_mb"] - rss_before_mb, 1)
    print(json.dumps(result, indent=1))
    return result


def step_flops(network: torch.nn.Module, batch: dict, device: torch.device, bf16: bool) -> int:
    """Model FLOPs of one training step on ``batch`` (forward, set-prediction loss, backward), counted by
    ``torch.utils.flop_counter`` (on any device; the MFU is reported on CUDA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with trainer_autocast(device, bf16):
            images, targets, _, kwargs = PrepareFindBatch()(batch, device)
            terms = SetCriterion()(network(images, **kwargs), targets)
        terms["loss"].backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class OperatorCount(TorchDispatchMode):
    """``with OperatorCount() as count: ...``: ``count.calls``, the operators dispatched inside (on a GPU, about the
    kernel launches)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def step_operators(network: torch.nn.Module, batch: dict, device: torch.device, bf16: bool) -> dict[str, int]:
    """The operators one eager training step on ``batch`` dispatches -- on a GPU, roughly its kernel launches, which
    bound a step whose kernels are small (``bench_gpu.sh``'s profiles) -- in the forward, the set-prediction
    criterion and the backward (the optimiser's step aside)."""
    images, targets, _, kwargs = PrepareFindBatch()(batch, device)
    with OperatorCount() as forward:
        with trainer_autocast(device, bf16):
            outputs = network(images, **kwargs)
    with OperatorCount() as criterion:
        terms = SetCriterion()(outputs, targets)
    with OperatorCount() as backward:
        terms["loss"].backward()
    network.zero_grad(set_to_none=True)
    counts = {"forward": forward.calls, "criterion": criterion.calls, "backward": backward.calls}
    return counts | {"total": sum(counts.values())}


if __name__ == "__main__":
    main()
