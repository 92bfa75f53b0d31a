#!/usr/bin/env python
"""Benchmark evaluation: the 2D per-image pipeline against the bare network forward, and 3D slices/s.

Prints one JSON object. 2D, on real samples from ../shared/data (Kvasir-SEG JPEG RGB, 529-1348 px a side, chest X-ray
512 px grey; synthetic images of the same sizes when the folder is absent), tiny network, CPU:

* ``forward_ms``: ``MedSAM3Net(image, prompts)`` alone on the preprocessed slice-space tensor (text cached).
* ``segment_image_ms``: the 2D inference (forward + the protocol + upsampling to S x S).
* ``case_ms``: one evaluator iteration on a preprocessed case: inference, ``Invertd`` back to the image's own
  size, class merge and the per-prompt metrics (``post_ms`` = case_ms - segment_image_ms: the part that works
  at the native resolution, so it grows with the image's pixel count, not with the network). **Headline ratio**
  ``case_over_forward`` = case_ms / forward_ms (target <= 1.10): what evaluation adds to the network, loading and
  report writing excluded.
* ``bare_case_ms``: the same work with no pipeline around it -- ``segment_image`` (``at_mask_size``: the logits
  at the masks' resolution, from which the 2D way back resizes them straight to the picture), the native-size label map
  (``inferers.boundary_merge.boundary_label_index``) and the overlap counts (``metrics.label_overlaps``) -- and
  ``bare_case_over_forward``: what the pipeline's algorithms cost without MONAI's transforms and the records.
* ``floor_case_over_forward``: a lower bound, not a pipeline -- the forward, the cheapest native-size label map
  there is (the slice-space masks copied to the picture's size by row and column, no interpolation: wrong near
  boundaries) and the three overlap counts, over the forward: what any evaluation in this process costs at least.
* ``batched_case_over_forward``: the first ``BATCH`` (8) cases as ``medsam3 evaluate --batch-size 8`` runs them
  (``CaseInferer.infer_cases``: one forward for their images, then each case's way back and records) over that
  batch's bare forward, with both per image.
* ``loading_ms`` (read + decode + intensity + resize + normalise) and ``with_loading_over_forward`` for the
  whole per-image cost; ``report_s`` the one-off report writing (cases.csv, tables, radar; no MLflow).

Each number is the median over ``--repeats`` runs after a warm-up, per image, averaged over the images; the forward
and the entries set against it run in turn within each round (``interleaved_ms``), so that a shared machine's
changing load weighs on both sides of a ratio alike.
``multi_class_metrics``: the metrics of a synthetic 20-class label map of 100 x 256 x 256 voxels (no spacing) as
the evaluation computes them (``metrics.label_map_metrics``: one joint histogram for all classes) against class by
class (each class's masks and ``case_metrics``), seconds and their ratio (the counts are checked equal).
``volume_metrics``: a CT-sized evaluation's metrics -- the TotalSegmentator example segmentation (41 classes,
122 x 101 x 30 at 3 mm; synthetic ellipsoids when absent) repeated to 366 x 303 x 300 voxels (1, 1, 0.3 mm), against
itself shifted by 2 voxels along the first two axes: ``label_map_metrics`` with the spacing (Dice, IoU, NSD, HD95
for every class), seconds in all and per class, and ``overlaps_s`` for the Dice/IoU counts alone.
``volume_loading``: that CT as an uncompressed NIfTI of float32 and of int16 HU, loaded and windowed by the
package's transforms and by MONAI's ``LoadImage`` + ``ScaleIntensityRange``: CPU seconds and MONAI's over ours.
``volume_way_back``: that CT at 366 x 303 x 120 voxels (the example repeated 3 x 3 x 4) with the slice-space masks
of every class made from its truth, the way a good network's would be: the way back (invert, merge, restack) with
MONAI's ``Invertd`` on every slice (``invertd_s``: ``MaskLogitsd`` and ``InvertToInputd`` with ``defer=False``,
float maps for the ``classes_per_slice`` present on a slice) and the default (``deferred_s``: the masks stay
packed and each class is resized inside its box, ``inferers.mask_merge``), the same label volume (checked);
``volume_way_back_1008``: the same at SAM3's 1008-px slice space, 30 slices (the example repeated 3 x 3 x 1), where
a slice is smaller than the slice space; ``volume_way_back_full``: that, with one prompt whose mask fills every
slice (a random-weight network's CT in ``scripts/bench_gpu.py volume``); ``volume_way_back_overlapping``: that, with
every class's mask the whole labelled body of its slice (an untrained network's classes, all claiming every pixel).
3D (when ``medsam3_monai.inferers.volume`` exists): slices per second of the volume path (detector on every
slice + tracker propagation + inversion + merge + metrics) for a real hippocampus volume and the same volume
repeated along the slice axis (2x, 4x slices): near-constant slices/s means linear scaling.

    python scripts/bench_eval.py                 # 1 thread (default: stable timings on shared cores)
    python scripts/bench_eval.py --threads 2 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import sys
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, whichever one the environment installed
# ... and the children it starts
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
SHARED = REPO.parent / "shared" / "data"
BATCH = 8  # cases per loader batch in the batched entries


def median_ms(fn, repeats: int, warmup: int = 2, device: torch.device | None = None) -> float:
    """Median milliseconds of ``fn()``; on a CUDA ``device`` each run ends with a synchronisation (the queued
    kernels count)."""
    def run() -> None:
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def interleaved_ms(fns: dict, repeats: int, warmup: int = 2, device: torch.device | None = None) -> dict:
    """Median milliseconds of each of ``fns`` (name -> callable), run in turn within each round, so that the
    machine's load on a shared host weighs on all of them alike (their ratios are what the benchmark reports)."""
    times = {name: [] for name in fns}
    for _ in range(warmup + repeats):
        for name, fn in fns.items():
            times[name].append(median_ms(fn, 1, warmup=0, device=device))
    return {name: statistics.median(values[warmup:]) for name, values in times.items()}


def datalists(folder: Path) -> tuple[list[Path], str]:
    """Datalists of the 2D samples (real when ../shared/data exists, else synthetic PNGs of the same sizes)."""
    from medsam3_monai.data import build_datalist, write_datalist

    if SHARED.is_dir():
        paths = []
        for name in ("Kvasir-SEG_sample", "ChestXray_lung_sample"):
            result = build_datalist(name, SHARED / name)
            paths.append(write_datalist(result.datalist, folder / f"{name}.json"))
        return paths, "shared samples"
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i, (h, w, mode) in enumerate(((529, 622, "RGB"), (512, 512, "L"), (576, 720, "RGB"))):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"img{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 255
        Image.fromarray(mask).save(folder / f"mask{i}.png")
        items.append({"image": str(folder / f"img{i}.png"), "label": str(folder / f"mask{i}.png"),
                      "dataset": "Kvasir-SEG", "modality": "endoscopy", "prompts": {"1": "polyp"},
                      "mask_encoding": "binary", "case": str(i)})
    path = folder / "synthetic.json"
    path.write_text(json.dumps({"training": [], "validation": items, "test": []}))
    return [path], "synthetic"


def bench_2d(network, repeats: int, folder: Path, report: bool = True) -> dict:
    """The 2D entries (module docstring) on the network's device (``scripts/bench_gpu.py evaluate`` runs them on a
    GPU, in its bf16 autocast); ``report``: also time a whole ``run_evaluation`` and its report writing."""
    from medsam3_monai.engines.evaluation import (
        CaseInferer,
        case_records,
        evaluation_items,
        evaluation_transforms,
        run_evaluation,
    )
    from medsam3_monai.inferers.boundary_merge import boundary_label_index
    from medsam3_monai.inferers.image import segment_image
    from medsam3_monai.metrics import label_overlaps
    from medsam3_monai.transforms.labels import parse_prompts
    from medsam3_monai.transforms.slices import bilinear_weights

    paths, source = datalists(folder)
    items = evaluation_items(paths, "all")
    transform = evaluation_transforms(network.image_size)
    inferer = CaseInferer(transform)
    device = next(network.parameters()).device
    per_image = {"forward_ms": [], "segment_image_ms": [], "case_ms": [], "bare_case_ms": [], "floor_case_ms": [],
                 "loading_ms": []}
    sizes = []
    for item in items:
        case = transform(item)
        image = case[0]["image"].as_tensor()[None].to(device)
        values, prompts = (list(x) for x in zip(*parse_prompts(item["prompts"]).items()))
        truth = case[0]["label"].as_tensor()[0]
        sizes.append(list(truth.shape))

        def bare_case():  # the label map and the overlap counts alone, no pipeline around them
            seg = segment_image(network, image[0], prompts, logits_on_device=True, at_mask_size=True)
            labels = boundary_label_index(seg.logits, tuple(truth.shape), scores=seg.scores)
            label_overlaps(torch.from_numpy(labels), truth, [int(v) for v in values])

        rows, columns = (bilinear_weights(network.image_size, n)[0].numpy() for n in truth.shape)
        truth_array = truth.numpy()

        def floor_case():  # the lower bound: nearest-tap label map (no interpolation, no merge), three counts
            seg = segment_image(network, image[0], prompts, logits_on_device=True)
            labels = (seg.logits[0] > 0).cpu().numpy().view(np.uint8)[:, columns].take(rows, axis=0)
            mask, wanted = labels == 1, truth_array == int(values[0])
            return np.count_nonzero(mask & wanted), np.count_nonzero(mask), np.count_nonzero(wanted)

        with torch.no_grad():
            timed = interleaved_ms({
                "forward_ms": lambda: network(image, prompts, pixels_normalized=True),
                "segment_image_ms": lambda: segment_image(network, image[0], prompts),
                "case_ms": lambda: case_records(inferer(case, network), inferer.label),
                "bare_case_ms": bare_case,
                "floor_case_ms": floor_case,
            }, repeats, device=device)
        for name, ms in timed.items():
            per_image[name].append(ms)
        per_image["loading_ms"].append(median_ms(lambda: transform(item), max(3, repeats // 3), warmup=1))
    mean = {k: statistics.fmean(v) for k, v in per_image.items()}
    batched = _bench_batched(network, inferer, [transform(item) for item in items[:BATCH]], repeats, device)
    whole_run = {}
    if report:
        start = time.perf_counter()
        result = run_evaluation(network, items, folder / "report", mlflow=False, progress=False, max_overlays=0)
        whole_run["engine_run_s_per_image"] = round((time.perf_counter() - start) / len(items), 4)
        start = time.perf_counter()
        result.write()
        whole_run["report_s"] = round(time.perf_counter() - start, 4)
    return {
        "source": source,
        "images": len(items),
        "native_sizes": sizes,
        **{k: round(v, 3) for k, v in mean.items()},
        "native_megapixels_mean": round(statistics.fmean(h * w for h, w in sizes) / 1e6, 3),
        "post_ms": round(mean["case_ms"] - mean["segment_image_ms"], 3),
        "segment_image_over_forward": round(mean["segment_image_ms"] / mean["forward_ms"], 4),
        "case_over_forward": round(mean["case_ms"] / mean["forward_ms"], 4),
        "bare_case_over_forward": round(mean["bare_case_ms"] / mean["forward_ms"], 4),
        "floor_case_over_forward": round(mean["floor_case_ms"] / mean["forward_ms"], 4),
        "with_loading_over_forward": round((mean["case_ms"] + mean["loading_ms"]) / mean["forward_ms"], 4),
        **batched,
        **whole_run,
    }


def _bench_batched(network, inferer, cases: list, repeats: int, device: torch.device) -> dict:
    """A loader batch of cases as ``medsam3 evaluate --batch-size`` runs it (``CaseInferer.infer_cases``: one forward
    for the batch's images, then each case's way back, merge and records) against that batch's bare forward."""
    from medsam3_monai.engines.evaluation import case_records
    from medsam3_monai.transforms.labels import parse_prompts

    images = torch.stack([case[0]["image"].as_tensor() for case in cases]).to(device)
    prompts = [list(parse_prompts(case[0]["prompts"]).values()) for case in cases]
    queries = [text for texts in prompts for text in texts]
    ids = torch.repeat_interleave(torch.arange(len(cases)), torch.tensor([len(texts) for texts in prompts]))
    with torch.no_grad():
        timed = interleaved_ms({
            "forward": lambda: network(images, queries, image_ids=ids, pixels_normalized=True),
            "case": lambda: [case_records(p, inferer.label) for p in inferer.infer_cases(cases, network)],
        }, repeats, device=device)
    forward_ms, case_ms = timed["forward"], timed["case"]
    return {"batch": len(cases), "batched_forward_ms_per_image": round(forward_ms / len(cases), 3),
            "batched_case_ms_per_image": round(case_ms / len(cases), 3),
            "batched_case_over_forward": round(case_ms / forward_ms, 4)}


def bench_multi_class_metrics(classes: int = 20, shape: tuple[int, int, int] = (100, 256, 256)) -> dict:
    from medsam3_monai.metrics import case_metrics, label_map_metrics

    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, classes + 1, shape, generator=generator, dtype=torch.int32)
    truth = torch.randint(0, classes + 1, shape, generator=generator).to(torch.uint8)
    values = list(range(1, classes + 1))
    start = time.perf_counter()
    one_by_one = [case_metrics(pred == v, truth == v) for v in values]
    one_by_one_s = time.perf_counter() - start
    start = time.perf_counter()
    together = [metrics for metrics, _, _ in label_map_metrics(pred, truth, values)]
    together_s = time.perf_counter() - start
    if together != one_by_one:
        raise RuntimeError("label_map_metrics and case_metrics disagree")
    return {"classes": classes, "voxels": pred.numel(), "class_by_class_s": round(one_by_one_s, 4),
            "label_map_s": round(together_s, 4), "class_by_class_over_label_map": round(one_by_one_s / together_s, 2)}


def ct_labels(factors: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """The TotalSegmentator example segmentation (122 x 101 x 30 at 3 mm; 20 synthetic ellipsoids when absent),
    each voxel repeated ``factors`` times along its axes: a CT-sized label map, uint8."""
    path = SHARED / "TotalSegmentator_example_CT_MR" / "masks" / "example_seg.nii.gz"
    if path.is_file():
        import nibabel as nib

        labels = torch.from_numpy(np.asarray(nib.load(str(path)).dataobj).astype(np.uint8))
        source = "TotalSegmentator"
    else:
        grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (122, 101, 30)), indexing="ij"))
        labels, source = torch.zeros((122, 101, 30), dtype=torch.uint8), "synthetic"
        for value in range(1, 21):
            centre = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(value)) - 0.5
            labels[((grid - centre) ** 2).sum(0) < 0.04] = value
    for axis, factor in enumerate(factors):
        labels = labels.repeat_interleave(factor, dim=axis)
    return labels.contiguous(), source


def bench_volume_metrics(factors: tuple[int, int, int] = (3, 3, 10)) -> dict:
    from medsam3_monai.metrics import label_map_metrics, label_overlaps

    truth, source = ct_labels(factors)
    pred = torch.roll(truth, shifts=(2, 2), dims=(0, 1)).contiguous()
    values = [int(v) for v in torch.unique(truth) if v > 0]
    spacing = tuple(3.0 / f for f in factors)
    warm = torch.zeros((8, 8, 8), dtype=torch.uint8)
    warm[2:5, 2:5, 2:5] = 1
    label_map_metrics(warm, warm.roll(1, 0), [1], spacing)  # warm-up: the imports of MONAI's surface metrics
    start = time.perf_counter()
    label_overlaps(pred, truth, values)
    overlaps_s = time.perf_counter() - start
    start = time.perf_counter()
    label_map_metrics(pred, truth, values, spacing)
    seconds = time.perf_counter() - start
    return {"source": source, "shape": list(truth.shape), "voxels": truth.numel(), "classes": len(values),
            "spacing_mm": list(spacing), "seconds": round(seconds, 3),
            "seconds_per_class": round(seconds / len(values), 4), "overlaps_s": round(overlaps_s, 4)}


def bench_volume_loading(factors: tuple[int, int, int] = (3, 3, 10)) -> dict:
    """A CT volume's loading: the example CT (:func:`ct_labels`, 366 x 303 x 300 voxels) written as an uncompressed
    NIfTI of float32 and of int16 HU, read and windowed by ``LoadMedicalImaged`` + ``ScaleIntensityByModalityd``
    (abdomen window) and by MONAI's own ``LoadImage`` + ``ScaleIntensityRange`` (the same window, clipped): CPU
    seconds of each (best of two) and MONAI's over ours; the values are checked equal (up to float rounding)."""
    import nibabel as nib
    from monai.transforms import LoadImage, ScaleIntensityRange

    from medsam3_monai.transforms import LoadMedicalImaged, ScaleIntensityByModalityd

    labels, source = ct_labels(factors)
    hu = labels.numpy().astype(np.float32) * 20 - 500
    ours_load, ours_window = LoadMedicalImaged(keys="image"), ScaleIntensityByModalityd(keys="image")
    monai_load = LoadImage(image_only=True, ensure_channel_first=True)
    monai_window = ScaleIntensityRange(a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True)

    def best_cpu_s(fn) -> tuple[float, object]:
        times, out = [], None
        for _ in range(2):
            out = None  # the last result freed first: both sides start from the same heap
            start = time.process_time()
            out = fn()
            times.append(time.process_time() - start)
        return min(times), out

    result = {"source": source, "shape": list(hu.shape)}
    with tempfile.TemporaryDirectory(prefix="bench_eval_loading_") as work:
        for dtype in ("float32", "int16"):
            path = f"{work}/ct_{dtype}.nii"
            nib.save(nib.Nifti1Image(hu.astype(dtype), np.diag([1.0, 1.0, 0.3, 1.0])), path)
            ours_s, ours = best_cpu_s(lambda: ours_window(ours_load({"image": path, "modality": "CT"}))["image"])
            monai_s, reference = best_cpu_s(lambda: monai_window(monai_load(path)))
            if not torch.allclose(ours.as_tensor(), reference.as_tensor(), atol=1e-6):
                raise RuntimeError("LoadMedicalImaged + ScaleIntensityByModalityd and MONAI's LoadImage + "
                                   "ScaleIntensityRange give different values")
            del ours, reference
            result[dtype] = {"ours_s": round(ours_s, 3), "monai_s": round(monai_s, 3),
                             "monai_over_ours": round(monai_s / ours_s, 2)}
    return result


def bench_volume_way_back(image_size: int, factors: tuple[int, int, int] = (3, 3, 4), fill: bool = False,
                          overlap: bool = False) -> dict:
    """The volume way back (``to_input_space`` of ``configs/inference.json``) of a CT with realistic masks: every
    class's slice-space masks made from the truth (nearest resize), as the network's would be, then inverted,
    merged and restacked with MONAI's ``Invertd`` on every slice (``defer=False``: float maps) and the default (the
    masks kept packed, each class resized inside its box); both label volumes are checked equal. ``fill``: one
    prompt instead, its mask the whole of every slice (what a random-weight network gives a CT in
    ``scripts/bench_gpu.py volume``: every output inside the mask). ``overlap``: every class's mask is the whole
    labelled body of the slice (an untrained network's classes, all claiming the same pixels: every pixel inside
    the body is contested by every class)."""
    import nibabel as nib
    import torch.nn.functional as F

    from medsam3_monai.bundle import inference_postprocessing
    from medsam3_monai.engines.evaluation import evaluation_transforms
    from medsam3_monai.inferers import BitMasks
    from medsam3_monai.inferers.postprocess import InvertToInputd, MaskLogitsd, transforms_of

    truth, source = ct_labels(factors)
    values = [int(v) for v in torch.unique(truth) if v > 0]
    transform = evaluation_transforms(image_size)
    with tempfile.TemporaryDirectory(prefix="bench_eval_way_back_") as work:
        affine = np.diag([3.0 / f for f in factors] + [1.0])
        nib.save(nib.Nifti1Image(truth.numpy().astype(np.float32) * 10 - 500, affine), f"{work}/ct.nii")
        nib.save(nib.Nifti1Image(truth.numpy(), affine), f"{work}/labels.nii")
        case = transform({"image": f"{work}/ct.nii", "label": f"{work}/labels.nii", "modality": "CT",
                          "mask_encoding": "label_map", "prompts": {str(v): f"class {v}" for v in values}})
    bits = BitMasks.zeros(len(values), len(case), image_size, image_size)
    wanted = torch.tensor(values, dtype=torch.uint8)[:, None, None]
    for z, item in enumerate(case):
        meta = item["image"].meta
        plane = truth.select(int(meta["slice_axis"]), int(meta["slice_index"]))
        plane = plane.T if bool(meta.get("slice_transposed", False)) else plane
        claimed = (plane[None] > 0).expand(len(values), -1, -1) if overlap else plane[None] == wanted
        masks = F.interpolate(claimed.float()[None], size=(image_size,) * 2, mode="nearest")[0]
        bits[:, z] = masks > 0.5
    if fill:
        values, bits = values[:1], BitMasks.pack(torch.ones(1, len(case), image_size, image_size, dtype=torch.bool))
    scores = 0.5 + 0.4 * torch.rand(len(values), len(case), generator=torch.Generator().manual_seed(0))
    chain = inference_postprocessing(transform)
    deferring = [step for step in transforms_of(chain) if isinstance(step, (MaskLogitsd, InvertToInputd))]
    result = {}
    for defer in (False, True):
        for step in deferring:
            step.defer = defer
        items = [dict(item, pred=bits[:, z], mask_scores=scores[:, z], prompt_values=values)
                 for z, item in enumerate(case)]
        start = time.perf_counter()
        result[defer] = (chain(items)["pred"].as_tensor(), time.perf_counter() - start)
    if not torch.equal(result[False][0], result[True][0]):
        raise RuntimeError("the deferred way back and Invertd's give different label volumes")
    present = bits.any_pixel().float().sum(0)  # prompts with a mask on each slice (the others get no maps)
    return {"source": source, "slices": len(case), "slice_shape": list(plane.shape),
            "classes": len(values), "classes_per_slice": round(float(present.mean()), 1), "image_size": image_size,
            "invertd_s": round(result[False][1], 3), "deferred_s": round(result[True][1], 3),
            "invertd_over_deferred": round(result[False][1] / result[True][1], 2)}


def bench_3d(network, repeats: int) -> dict | None:
    if importlib.util.find_spec("medsam3_monai.inferers.volume") is None:
        return None
    from medsam3_monai.networks.tracker import build_tracker

    tracker = build_tracker("tiny", detector=network)
    folder = SHARED / "MSD_Task04_Hippocampus_cropped"
    with tempfile.TemporaryDirectory(prefix="bench_eval_3d_") as tmp:
        return _bench_3d(network, tracker, folder, Path(tmp), repeats)


def _bench_3d(network, tracker, folder: Path, work: Path, repeats: int) -> dict:
    import nibabel as nib

    from medsam3_monai.engines.evaluation import CaseInferer, case_records, evaluation_transforms

    if folder.is_dir():
        image_nii = nib.load(str(folder / "images" / "hippocampus_001.nii.gz"))
        label_nii = nib.load(str(folder / "masks" / "hippocampus_001.nii.gz"))
        image, label, affine = np.asarray(image_nii.dataobj), np.asarray(label_nii.dataobj), image_nii.affine
    else:
        rng = np.random.default_rng(0)
        image, label, affine = rng.random((35, 50, 35)).astype(np.float32), np.zeros((35, 50, 35), np.uint8), np.eye(4)
        label[10:20, 20:30, 10:25] = 1
    transform = evaluation_transforms(network.image_size)
    inferer = CaseInferer(transform, tracker=tracker, score_threshold=0.2)  # tiny scores ~0.25: the tracker runs
    results = []
    for factor in (1, 2, 4):
        stem = work / f"x{factor}"
        nib.save(nib.Nifti1Image(np.concatenate([image] * factor, axis=2), affine), f"{stem}_img.nii.gz")
        labels = np.concatenate([label] * factor, axis=2).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, affine), f"{stem}_lab.nii.gz")
        item = {"image": f"{stem}_img.nii.gz", "label": f"{stem}_lab.nii.gz", "dataset": "MSD_Task04_Hippocampus",
                "modality": "MRI", "prompts": {"1": "anterior hippocampus", "2": "posterior hippocampus"},
                "mask_encoding": "label_map", "case": f"x{factor}"}
        case = transform(item)
        with torch.no_grad():
            ms = median_ms(lambda: case_records(inferer(case, network), inferer.label), max(3, repeats // 4), 1)
        results.append({"slices": len(case), "prompts": 2, "case_ms": round(ms, 1),
                        "slices_per_s": round(1000.0 * len(case) / ms, 2)})
    base = results[0]["slices_per_s"]
    return {"volumes": results, "slices_per_s_ratio_largest_to_smallest": round(results[-1]["slices_per_s"] / base, 3)}


def main() -> None:
    from medsam3_monai.deploy.arguments import at_least, slice_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least(1), default=15, help="timed runs per part (medians reported)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch threads (default 1)")
    parser.add_argument("--image-size", type=slice_size, default=112, help="the tiny network's slice space (default 112)")
    parser.add_argument("--no-3d", action="store_true",
                        help="skip the '3d' part (the hippocampus volume through detector and tracker); the "
                             "CT-sized volume_* parts of the way back still run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medsam3_monai.networks import MedSAM3Net

    network = MedSAM3Net("tiny", image_size=args.image_size).eval()
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        two_d = bench_2d(network, args.repeats, Path(tmp))
    result = {
        "network": "tiny", "image_size": network.image_size, "device": "cpu", "threads": torch.get_num_threads(),
        "protocol": "top_query", "2d": two_d, "multi_class_metrics": bench_multi_class_metrics(),
        "volume_metrics": bench_volume_metrics(),
        "volume_loading": bench_volume_loading(),
        "volume_way_back": bench_volume_way_back(network.image_size),
        "volume_way_back_1008": bench_volume_way_back(1008, (3, 3, 1)),
        "volume_way_back_full": bench_volume_way_back(1008, (3, 3, 1), fill=True),
        "volume_way_back_overlapping": bench_volume_way_back(1008, (3, 3, 1), overlap=True),
        "3d": None if args.no_3d else bench_3d(network, args.repeats),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
