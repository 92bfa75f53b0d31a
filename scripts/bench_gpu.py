#!/usr/bin/env python
"""GPU parts of ``scripts/bench_gpu.sh`` (which runs them and ``scripts/bench_train.py``, and prints one JSON):

* ``forward``: the full SAM3 detector (random init, 1008 px) in inference as ``medsam3 segment`` runs it
  (``inferers.batch.segment_image_batch``: one text prompt per image, the top-query protocol, masks copied to the
  host) at each ``--batch``: images/s, the network forward alone, FLOPs per image (``torch.utils.flop_counter``),
  achieved TFLOP/s and MFU against ``--peak-tflops``, peak memory, and the host synchronisations of one forward
  (``torch.cuda.set_sync_debug_mode``). Options: ``--autocast none|bf16`` (default bf16), ``--compile``
  (``torch.compile`` of the vision encoder; ``--compile-mode``), ``--channels-last``, ``--detector-chunk N``
  (find-queries per detector pass: at 16, a batch of 32 single-prompt images takes two).
* ``evaluate``: ``scripts/bench_eval.py``'s 2D entries with the full detector at 1008 px on this device: a whole
  evaluation case (``CaseInferer``: inference, the way back to each picture's size -- on the device, see
  ``inferers.boundary_merge`` -- merge and metrics) against the bare forward, ``case_over_forward`` (goal <= 1.10),
  on the shared 2D samples when ``../shared/data`` is beside the checkout, else synthetic pictures of their sizes.
* ``volume``: a synthetic 512 x 512 x 300 CT-like volume (``--size``, ``--depth``), a NIfTI file, as ``medsam3
  segment`` runs it: the inference bundle's preprocessing (``way_in_s``), ``inferers.volume.segment_volume`` with
  the full detector and the full SAM3 tracker (transformers' ``Sam3TrackerVideoModel`` default configuration,
  random init, ViT shared with the detector; ``detector_s``, ``tracker_s``) and the way back to the volume's
  geometry (``way_back_s``): seconds, ``case_s`` for all of it (goal <= 15 s), slices/s, peak GPU memory. With
  random weights no slice would reach a real score threshold, so ``--score-threshold 0`` (default) lets the most
  confident slice seed the tracker as real weights would. With ``--compile`` the tracker's per-slice modules are
  compiled too (``inferers.batch.compile_tracker``), and ``compile_s`` is a warm-up on the volume's first slices
  before the clock starts.

``--tiny`` runs the same code with the tiny network and tracker (a CPU check of the script itself:
``python scripts/bench_gpu.py forward --tiny --device cpu --batch 1 2``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _network(args: argparse.Namespace, device: torch.device):
    from medsam3_monai.inferers.batch import compile_network
    from medsam3_monai.networks import MedSAM3Net, full_sam3_config

    torch.manual_seed(0)
    config = None if args.tiny else full_sam3_config()
    network = MedSAM3Net("tiny", config=config).eval().to(device)
    if args.detector_chunk is not None:
        network.detector_chunk = args.detector_chunk
    return compile_network(network, compile=args.compile, channels_last=args.channels_last, mode=args.compile_mode)


def _count_syncs(fn, device: torch.device) -> int | None:
    """Host synchronisations ``fn`` makes (CUDA only): warnings of ``torch.cuda.set_sync_debug_mode``."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def write_profile(fn, device: torch.device, path: Path, title: str) -> None:
    """The operators of one ``fn()`` call by their own device time (``torch.profiler``), a table into ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        _sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=40, max_name_column_width=60,
                                                               max_shapes_column_width=60)
    path.write_text(f"{title}\n{table}\n")


def forward(args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from medsam3_monai.inferers.batch import inference_context, segment_image_batch

    device = torch.device(args.device)
    network = _network(args, device)
    size = network.image_size
    results = {}
    for batch in args.batch:
        images = torch.rand(batch, 3, size, size, device=device) * 2 - 1  # SAM3-normalised range
        prompts = [["polyp"]] * batch
        ids = torch.arange(batch)
        queries = ["polyp"] * batch

        def bare() -> None:
            network(images, queries, image_ids=ids, pixels_normalized=True)

        def segment() -> None:
            segment_image_batch(network, images, prompts, pixels_normalized=True)

        entry: dict[str, object] = {}
        try:
            _reset_peak(device)
            with inference_context(device, args.autocast):
                for _ in range(args.warmup):
                    segment()
                _sync(device)
                times, bare_times = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    segment()  # ends with the masks on the host: synchronised
                    times.append(time.perf_counter() - start)
                    _sync(device)
                    start = time.perf_counter()
                    bare()
                    _sync(device)
                    bare_times.append(time.perf_counter() - start)
                with FlopCounterMode(display=False) as counter:
                    bare()
                flops = counter.get_total_flops()
                syncs_forward = _count_syncs(bare, device)
                syncs_segment = _count_syncs(segment, device)
                if args.profile and batch == args.batch[-1]:
                    write_profile(bare, device, Path(args.profile), f"forward, batch {batch}")
            seconds, bare_seconds = statistics.median(times), statistics.median(bare_times)
            entry = {
                "images_per_s": round(batch / seconds, 3),
                "forward_images_per_s": round(batch / bare_seconds, 3),
                "segment_ms": round(seconds * 1e3, 2),
                "forward_ms": round(bare_seconds * 1e3, 2),
                "gflop_per_image": round(flops / batch / 1e9, 1),
                "achieved_tflops": round(flops / bare_seconds / 1e12, 2),
                "peak_memory_gib": _peak_gib(device),
                "host_syncs_per_forward": syncs_forward,
                "host_syncs_per_segment_call": syncs_segment,
            }
            if device.type == "cuda":
                entry["mfu"] = round(flops / bare_seconds / (args.peak_tflops * 1e12), 4)
        except torch.cuda.OutOfMemoryError as err:  # type: ignore[attr-defined]
            entry = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        results[f"batch_{batch}"] = entry
        images = None  # free this batch before the next size
    return {
        "part": "forward",
        "config": "tiny" if args.tiny else "full",
        "image_size": size,
        "parameters": sum(p.numel() for p in network.parameters()),
        "autocast": args.autocast,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "detector_chunk": network.detector_chunk,
        "attention": network.config._attn_implementation,
        "results": results,
    }


def _full_tracker(network, device: torch.device):
    from transformers import Sam3TrackerVideoConfig, Sam3TrackerVideoModel

    from medsam3_monai.networks.tracker import build_tracker, tie_backbone

    if network.image_size != 1008 or network.config.vision_config.backbone_config.hidden_size != 1024:
        return build_tracker("tiny", detector=network).to(device), "tiny"
    vision = network.config.vision_config.to_dict()
    vision["fpn_hidden_size"] = Sam3TrackerVideoConfig().vision_config.fpn_hidden_size
    torch.manual_seed(0)
    tracker = Sam3TrackerVideoModel(Sam3TrackerVideoConfig(vision_config=vision))
    tie_backbone(tracker, network)  # one trunk, two necks (SAM3's video model)
    return tracker.eval().to(device), "full (Sam3TrackerVideoConfig defaults, random init)"


def write_synthetic_ct(path: Path, size: int, depth: int) -> None:
    """A CT-like volume of ``size`` x ``size`` x ``depth`` voxels (1 x 1 x 1.5 mm) as NIfTI, int16 HU: soft-tissue
    noise and a brighter ellipsoid organ."""
    import nibabel as nib
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    x, y, z = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), torch.linspace(-1, 1, depth),
                             indexing="ij")
    organ = (x / 0.5) ** 2 + (y / 0.35) ** 2 + (z / 0.6) ** 2 < 1
    hu = 40 + 20 * torch.randn(size, size, depth, generator=generator)
    hu = torch.where(organ, hu + 80, hu).round().to(torch.int16)
    nib.save(nib.Nifti1Image(hu.numpy(), np.diag([1.0, 1.0, 1.5, 1.0])), str(path))


#: with ``--compile``, the warm-up before the clock: the volume's first slices (at least one slice batch), enough for
#: the tracker's memory bank to grow through its shapes (7 memories, 16 object pointers)
WARM_UP_SLICES = 24


def _compile_warm_up(inferer, items: list, network, args: argparse.Namespace, device: torch.device) -> float:
    """With ``--compile``: the volume's first ``WARM_UP_SLICES`` slices (or one slice batch, if more) through the
    whole path before the clock starts, so that the vision encoder compiles for the slice batches, padded as
    ``medsam3 segment --compile`` pads them (``Predictor.compile``: a smaller last batch is padded to the first
    one's size), and the tracker's per-slice modules for the growing memory bank; returns the seconds that took (a
    one-off per process)."""
    from medsam3_monai.inferers.batch import inference_context

    network.vision_batch = "first"
    begin = time.perf_counter()
    with inference_context(device, args.autocast):
        inferer([dict(item) for item in items[: max(WARM_UP_SLICES, args.slice_batch)]], network)
    _sync(device)
    return round(time.perf_counter() - begin, 1)


def volume(args: argparse.Namespace) -> dict:
    """The whole case as ``medsam3 segment`` runs it: the inference bundle's preprocessing of the NIfTI file (the
    way in: grey slices as uint8 levels), ``PromptInferer`` (``segment_volume``: detector batches + tracker) and
    ``to_input_space`` (the way back to the volume's geometry: masks merged per slice, restacked)."""
    from medsam3_monai.bundle import inference_postprocessing
    from medsam3_monai.engines.evaluation import evaluation_transforms
    from medsam3_monai.inferers import volume as volume_module
    from medsam3_monai.inferers.batch import inference_context
    from medsam3_monai.inferers.predict import PromptInferer

    device = torch.device(args.device)
    network = _network(args, device)
    tracker, tracker_name = _full_tracker(network, device)
    if args.compile:
        from medsam3_monai.inferers.batch import compile_tracker

        compile_tracker(tracker, args.compile_mode)
    preprocessing = evaluation_transforms(network.image_size)
    inferer = PromptInferer(score_threshold=args.score_threshold, tracker=tracker, tracker_name=tracker_name,
                            volume_batch_size=args.slice_batch, tracker_batch=args.tracker_batch)
    to_input_space = inference_postprocessing(preprocessing)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_volume_") as work:
        path = Path(work) / "ct.nii.gz"
        write_synthetic_ct(path, args.size, args.depth)
        start = time.perf_counter()
        items = preprocessing({"image": str(path), "modality": "CT",
                               "prompts": {str(i + 1): p for i, p in enumerate(args.prompts)}})
        way_in = time.perf_counter() - start

    spans: dict[str, float] = {}
    detect = volume_module.detect_slices

    def timed_detect(*a, **k):
        _sync(device)
        begin = time.perf_counter()
        out = detect(*a, **k)
        _sync(device)
        spans["detector_s"] = time.perf_counter() - begin
        return out

    compile_s = _compile_warm_up(inferer, items, network, args, device) if args.compile else None
    volume_module.detect_slices = timed_detect
    _reset_peak(device)
    try:
        with inference_context(device, args.autocast):
            if args.profile:  # the whole segmentation's operators (use a short --depth)
                write_profile(lambda: inferer([dict(item) for item in items], network), device, Path(args.profile),
                              f"volume {args.size} x {args.size} x {args.depth}, slice batch {args.slice_batch}")
            _sync(device)
            begin = time.perf_counter()
            items = inferer(items, network)
            _sync(device)
            total = time.perf_counter() - begin
    finally:
        volume_module.detect_slices = detect
    begin = time.perf_counter()
    labels = to_input_space(items)["pred"]
    way_back = time.perf_counter() - begin
    first = items[0]
    return {
        "part": "volume",
        "config": "tiny" if args.tiny else "full",
        "tracker": tracker_name,
        "volume_shape": [args.size, args.size, args.depth],
        "slice_space": network.image_size,
        "prompts": args.prompts,
        "autocast": args.autocast,
        "slice_batch": args.slice_batch,
        "tracker_batch": args.tracker_batch,
        "detector_chunk": network.detector_chunk,
        "compile": args.compile,
        "compile_s": compile_s,
        "score_threshold": args.score_threshold,
        "way_in_s": round(way_in, 2),
        "segment_volume_s": round(total, 2),
        "detector_s": round(spans.get("detector_s", float("nan")), 2),
        "tracker_s": round(total - spans.get("detector_s", 0.0), 2),
        "way_back_s": round(way_back, 2),
        "case_s": round(way_in + total + way_back, 2),
        "slices_per_s": round(args.depth / total, 3),
        "case_slices_per_s": round(args.depth / (way_in + total + way_back), 3),
        "seed_slices": [int(s) for s in first["seed_slices"]],
        "voxels_segmented": int((labels != 0).sum()),
        "label_shape": list(labels.shape),
        "peak_memory_gib": _peak_gib(device),
    }


def evaluate(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_eval import bench_2d

    from medsam3_monai.inferers.batch import inference_context

    device = torch.device(args.device)
    network = _network(args, device)
    _reset_peak(device)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_evaluate_") as folder, inference_context(device, args.autocast):
        two_d = bench_2d(network, args.repeats, Path(folder), report=False)
    return {"part": "evaluate", "config": "tiny" if args.tiny else "full", "image_size": network.image_size,
            "autocast": args.autocast, "2d": two_d, "peak_memory_gib": _peak_gib(device)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from medsam3_monai.deploy.arguments import at_least

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["forward", "evaluate", "volume"])  # PARTS
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny network and tracker (a check of the script)")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="bf16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the vision encoder (volume: and the tracker's per-slice modules)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode with --compile (e.g. max-autotune-no-cudagraphs; default inductor's)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--detector-chunk", type=int, default=None,
                        help="find-queries per detector pass (MedSAM3Net.detector_chunk; default the network's, 16)")
    parser.add_argument("--batch", type=at_least(1), nargs="+", default=[1, 8, 32],
                        help="forward: images per forward")
    parser.add_argument("--profile", default=None,
                        help="forward: write the operators of one forward at the last batch, by device time, here; "
                             "volume: those of one whole segmentation (before the timed one: use a short --depth)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU for MFU (989: H100/H200 SXM)")
    parser.add_argument("--size", type=int, default=512, help="volume: in-plane size")
    parser.add_argument("--depth", type=int, default=300, help="volume: slices")
    parser.add_argument("--prompts", nargs="+", default=["liver"], help="volume: text prompts")
    parser.add_argument("--slice-batch", type=int, default=8, help="volume: slices per detector forward")
    parser.add_argument("--tracker-batch", type=int, default=8,
                        help="volume: prompts propagated together by the tracker (1: one at a time)")
    parser.add_argument("--score-threshold", type=float, default=0.0)
    return parser.parse_args(argv)


#: the parts, by name: each takes the parsed arguments and returns its JSON object
PARTS = {"forward": forward, "evaluate": evaluate, "volume": volume}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
                 "check the script on the CPU with --tiny --device cpu")
    if args.compile:  # before the network is built: a machine that cannot compile says so in one line
        from medsam3_monai.inferers.batch import check_compile_toolchain

        try:
            check_compile_toolchain(device)
        except ValueError as err:
            sys.exit(f"bench_gpu.py: {err}")
    result = PARTS[args.part](args)
    result.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                  or platform.machine(), torch=torch.__version__)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
