"""Batched inference: many inputs through one loaded network, several 2D images per forward.

``medsam3 segment INPUT... --out-dir DIR`` (a folder, a glob, a datalist) and :meth:`.predict.Predictor.predict_many`
run this path; every step is the one-file path's (``configs/inference.json``'s preprocessing and
``to_input_space``, :class:`~.predict.PromptInferer`, the same writers), only grouped:

* a torch ``DataLoader`` runs the preprocessing in ``num_workers`` processes (``CaseDataset``: an unreadable input
  becomes an ``UnreadableCase`` marker instead of an exception), and its ``collate_fn``
  (:func:`collate_case_batch`) stacks the batch's 2D slice-space images into one tensor, pinned by the loader's
  pin-memory thread when the network is on CUDA and copied with ``non_blocking``;
* :func:`segment_image_batch` puts up to ``batch_size`` 2D images, each with its own prompts, through **one**
  ViT pass (``MedSAM3Net.forward_chunks`` with ``image_ids``: the ViT runs once per image, the detector on the
  find-queries ``detector_chunk`` at a time; the text encoder runs once per distinct prompt, its features cached
  by the network); text-only and box-prompted images go in separate passes, so each image's masks are those of a
  one-by-one call (same forward, batched: logits agree to float rounding);
* volumes go one at a time through :func:`~.volume.segment_volume` (detector in slice batches + the tracker).

The evaluation engine (``engines.inference.MedSAM3CaseEvaluator``) can take the same path by calling
:meth:`.predict.PromptInferer.infer_cases` on the cases of a loader batch instead of the inferer on each case.

GPU-ready knobs (:func:`inference_context`, :func:`compile_network`, :func:`compile_tracker`): bf16 autocast,
``torch.compile`` of the vision encoder and of the tracker's per-slice modules, channels-last weights;
transformers' SDPA attention is SAM3's default already.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..protocol_registry import get_protocol
from .image import ImageSegmentation
from .protocols import prompt_logits

__all__ = [
    "AUTOCAST_DTYPES",
    "CaseBatch",
    "collate_case_batch",
    "CUDA_GRAPH_MODES",
    "TRACKER_FRAME_MODULES",
    "check_compile_toolchain",
    "compile_network",
    "compile_tracker",
    "inference_context",
    "predict_items",
    "segment_image_batch",
]

#: ``--autocast`` choices -> autocast dtype (None: full precision)
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ forward
@torch.no_grad()
def segment_image_batch(
    network: torch.nn.Module,
    images: torch.Tensor,
    prompts: Sequence[Sequence[str]],
    *,
    protocols: str | Sequence[str] = "top_query",
    score_threshold: float = 0.5,
    boxes: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    pixels_normalized: bool = False,
    logits_on_device: bool = False,
    at_mask_size: bool = False,
) -> list[ImageSegmentation]:
    """N slice-space images, each with its own prompts, through the network together: one
    :class:`~.image.ImageSegmentation` per image, as :func:`~.image.segment_image` gives for each alone.

    Args:
        network: a ``MedSAM3Net`` (or anything with its forward signature: ``images, prompts, image_ids=``).
        images: (N, 3, S, S) slice-space images: uint8 levels or [0, 1] floats (SAM3-normalised floats with
            ``pixels_normalized=True``), as :func:`~.image.segment_image` takes them.
        prompts: N lists of prompt texts (P_i each, at least one).
        protocols: one 2D protocol for all images or one per image.
        score_threshold: for the ``threshold`` protocol.
        boxes: None, or per image None / ``(boxes (P_i, K, 4) cxcywh, labels (P_i, K))`` (``inputs.box_prompts``).

    Images with box prompts go through a forward of their own (grouped by K); all text-only images share one.
    Logits and scores come back on the CPU, one device-to-host copy per forward (``logits_on_device``: the logits
    stay on the network's device; ``at_mask_size``: at the masks' own resolution; see :func:`~.image.segment_image`).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, S, S); got {tuple(images.shape)}")
    count = images.shape[0]
    prompts = [[p] if isinstance(p, str) else list(p) for p in prompts]
    if len(prompts) != count or not all(prompts):
        raise ValueError(f"give a non-empty prompt list for each of the {count} images")
    protocols = [protocols] * count if isinstance(protocols, str) else list(protocols)
    boxes = [None] * count if boxes is None else list(boxes)
    if len(protocols) != count or len(boxes) != count:
        raise ValueError(f"give one protocol and one box entry per image ({count})")
    for name in set(protocols):
        get_protocol(name)
    groups: dict[int, list[int]] = {}  # K boxes per prompt (0: text only) -> images
    for index, box in enumerate(boxes):
        groups.setdefault(0 if box is None else int(box[0].shape[1]), []).append(index)
    size = tuple(images.shape[-2:])
    results: list[ImageSegmentation | None] = [None] * count
    for members in groups.values():
        group_images = images if len(members) == count else images[members]
        queries = [text for index in members for text in prompts[index]]
        image_ids = torch.repeat_interleave(torch.arange(len(members)),
                                            torch.tensor([len(prompts[index]) for index in members]))
        kwargs: dict[str, Any] = {"image_ids": image_ids, "pixels_normalized": pixels_normalized}
        if boxes[members[0]] is not None:
            kwargs["boxes"] = torch.cat([boxes[index][0] for index in members])
            kwargs["box_labels"] = torch.cat([boxes[index][1] for index in members])
        names = [protocols[index] for index in members]
        per_protocol = prompt_logits(network, group_images, queries, names, size, score_threshold,
                                     at_mask_size=at_mask_size, **kwargs)
        starts = torch.cumsum(torch.tensor([0] + [len(prompts[index]) for index in members]), 0).tolist()
        for name, (logits, scores, owners) in per_protocol.items():
            logits, scores = logits if logits_on_device else logits.cpu(), scores.float().cpu()  # one copy per forward
            owners = None if owners is None else owners.cpu()
            # the maps of find-queries start:stop (with owners, in find-query order: a range of maps)
            bounds = starts if owners is None else torch.searchsorted(owners, torch.tensor(starts)).tolist()
            for position, index in enumerate(members):
                if protocols[index] == name:
                    rows = slice(bounds[position], bounds[position + 1])
                    results[index] = ImageSegmentation(prompts[index], logits[rows],
                                                       scores[starts[position]:starts[position + 1]], name,
                                                       None if owners is None else owners[rows] - starts[position])
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class CaseBatch:
    """A loader batch: the preprocessed cases (lists of slice items, or ``UnreadableCase`` markers) and the
    2D cases' slice-space images stacked (N2D, 3, S, S) in case order (None when there is no 2D case)."""

    cases: list[Any]
    images: torch.Tensor | None = None
    indices: list[int] = field(default_factory=list)  # positions of the 2D cases in ``cases``

    def pin_memory(self) -> CaseBatch:
        """What the DataLoader's pin-memory thread calls: the stacked images in page-locked memory."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_case_batch(batch: Sequence[Any]) -> CaseBatch:
    """DataLoader ``collate_fn``: the cases as ``engines.inference.collate_cases`` gives them, plus the 2D
    cases' images stacked (in the worker, off the main process)."""
    from ..engines.inference import collate_cases
    from ..tensors import plain_tensor
    from .predict import is_volume_case

    cases = collate_cases(batch)
    indices = [i for i, case in enumerate(cases) if isinstance(case, list) and not is_volume_case(case)]
    images = torch.stack([plain_tensor(cases[i][0]["image"]) for i in indices]) if indices else None
    return CaseBatch(cases, images, indices)


def predict_items(predictor: Any, items: Sequence[Mapping[str, Any]], *, batch_size: int = 8,
                  num_workers: int = 0, channel: int | None = None,
                  pin_memory: bool | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
    """:meth:`.predict.Predictor.predict_many`: ``(item, Prediction | UnreadableCase)`` per item, in order."""
    from torch.utils.data import DataLoader

    from ..engines.inference import CaseDataset, UnreadableCase

    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if int(num_workers) < 0:
        raise ValueError(f"number of workers must be >= 0, got {num_workers}")
    originals = list(items)  # yielded as given; the loader reads copies that record the channel
    # ``channel`` (--channel) for every item, else each item's own (a datalist written with --channel N)
    items = [dict(item, channel=item.get("channel") if channel is None else channel) for item in originals]
    preprocessing, _ = predictor.pipeline()
    device = next(predictor.network.parameters()).device
    loader = DataLoader(
        CaseDataset(items, transform=preprocessing, skip_unreadable=True), batch_size=int(batch_size),
        # a worker per batch at most: torch starts every worker asked for, whether or not there is work for it
        shuffle=False, num_workers=min(int(num_workers), -(-len(items) // int(batch_size))),
        collate_fn=collate_case_batch,
        pin_memory=device.type == "cuda" if pin_memory is None else bool(pin_memory),
        persistent_workers=False,
    )
    position = 0
    for batch in loader:
        start, position = position, position + len(batch.cases)
        batch_items = items[start:position]
        pictures = batch.indices  # the readable 2D cases (unreadable ones are markers, not slice lists)
        results: dict[int, Any] = {}
        for i, item in enumerate(batch_items):
            case = batch.cases[i]
            if isinstance(case, UnreadableCase):
                yield originals[start + i], case
                continue
            if i not in results and i in pictures:  # the batch's 2D images: one forward, at the first of them
                done = predictor.infer_cases([batch.cases[k] for k in pictures], [batch_items[k] for k in pictures],
                                             batch.images)
                results.update(zip(pictures, done))
            elif i not in results:  # a volume: on its own, written before the next one starts
                results[i] = predictor.infer_cases([case], [item])[0]
            yield originals[start + i], predictor.prediction(results.pop(i), item)


# ------------------------------------------------------------------------------------------------ GPU knobs
def inference_context(device: torch.device | str, autocast: str | None = "none") -> contextlib.AbstractContextManager:
    """``torch.no_grad`` plus, for ``autocast="bf16"``, bf16 autocast on ``device`` (CPU or CUDA): matrix products
    and convolutions in bf16, mask logits upsampled and compared in float32 as always."""
    if autocast not in (None, *AUTOCAST_DTYPES):
        raise ValueError(f"unknown autocast {autocast!r}; choose from {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES.get(autocast or "none")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if dtype is not None:
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=dtype))
    return stack


#: the SAM3 tracker's modules that run once for every slice it propagates to (and every object): the memory
#: attention (4 layers of RoPE attention from the slice to its memory bank), the SAM mask decoder, the memory
#: encoder and the prompt encoder
TRACKER_FRAME_MODULES = ("memory_attention", "mask_decoder", "memory_encoder", "prompt_encoder")


#: ``torch.compile`` modes that replay CUDA graphs: a graph's outputs live in its memory pool until its next replay
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@torch.compiler.disable
def _own_outputs(_module: torch.nn.Module, _inputs: Any, outputs: Any) -> Any:
    """Forward hook: the module's tensor outputs copied, eagerly after its compiled graph, so that they outlive the
    graph's next replay (the tracker keeps a slice's memory features and object pointer for the slices after it)."""
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, torch.clone, outputs)


def compile_tracker(tracker: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` of a ``Sam3TrackerVideoModel``'s per-slice modules (:data:`TRACKER_FRAME_MODULES`,
    ``nn.Module.compile``: modules, weights and hooks stay as they are), in place. Eager, one slice's step is
    several hundred small operators, each launched from Python; compiled, their element-wise work fuses.
    transformers' session bookkeeping between the modules (gathering the memory bank, object pointers) stays eager.
    The memory bank grows over the first slices of a propagation, the seed slice's step differs from the others
    (a mask prompt) and prompts propagate alone or in batches (:mod:`.tracking`), so the modules compile a few
    graphs (the shapes first seen, then dynamic ones; a batch size of 1 is specialised apart); those then serve
    every slice, prompt and volume of the process. In a mode of :data:`CUDA_GRAPH_MODES`
    each module's outputs are copied out of its graph's memory pool (:func:`_own_outputs`). Returns the tracker."""
    missing = [name for name in TRACKER_FRAME_MODULES if not isinstance(getattr(tracker, name, None), torch.nn.Module)]
    if missing:
        raise TypeError(f"{type(tracker).__name__} has no {', '.join(missing)}: compile_tracker takes a SAM3 tracker "
                        "(transformers' Sam3TrackerVideoModel, networks.tracker.build_tracker)")
    for name in TRACKER_FRAME_MODULES:
        module = getattr(tracker, name)
        if mode in CUDA_GRAPH_MODES:
            module.register_forward_hook(_own_outputs)
        module.compile(mode=mode)
    return tracker


def check_compile_toolchain(device: torch.device | str) -> None:
    """Raise a ValueError (one line, what to do) when ``torch.compile`` (inductor) cannot build kernels for
    ``device``: on the CPU it needs a working C++ compiler, on CUDA Triton and a C compiler (for Triton's launcher).
    Without this check the first forward fails deep inside inductor, with a long traceback."""
    import os
    import shutil

    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("--compile (torch.compile) needs Triton on a CUDA device and this Python has none: "
                             "install triton (pip install triton) or leave --compile out")
        cc = os.environ.get("CC")
        if not (shutil.which(cc) if cc else (shutil.which("gcc") or shutil.which("clang"))):
            raise ValueError("--compile (torch.compile) builds Triton kernels with a C compiler and none was found"
                             f"{f' (CC={cc})' if cc else ' (gcc, clang)'}: install gcc, or set CC to one, or leave "
                             "--compile out")
    elif device.type == "cpu":
        from torch._inductor import exc
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            cxx = os.environ.get("CXX")
            found = f" (CXX={cxx})" if cxx else " (g++, clang++)"
            raise ValueError("--compile (torch.compile) on the CPU builds C++ kernels and no working C++ compiler was "
                             f"found{found}: install g++, or set CXX to one, or leave --compile out") from None


def compile_network(network: torch.nn.Module, *, compile: bool = False, channels_last: bool = False,
                    mode: str | None = None, pad_batches: bool = False,
                    tracker: torch.nn.Module | None = None, device: torch.device | str | None = None
                    ) -> torch.nn.Module:
    """GPU-ready options, in place: ``compile`` compiles the vision encoder's forward (``nn.Module.compile``: the
    ViT + FPN neck, the bulk of the FLOPs, whose only input is (N, 3, S, S); the module, its weights and hooks stay
    as they are; a second batch size recompiles, as dynamic, which can take longer than the first compilation).
    With ``pad_batches`` as well, a ``MedSAM3Net`` pads a smaller batch of images to the size of its first batch
    (its ``vision_batch``: a folder's or a volume's last, partial batch), so the encoder compiles once.
    ``channels_last`` stores the 4D conv weights channels-last (patch embedding, FPN neck, pixel decoder; cuDNN's
    bf16 kernels prefer NHWC). With ``compile``, a ``tracker`` given is compiled too (:func:`compile_tracker`).
    ``device``: where the network will run, for :func:`check_compile_toolchain` (default: its parameters' device).
    Returns the network."""
    sam3 = getattr(network, "sam3", network)
    if compile:
        parameter = next(network.parameters(), None)
        check_compile_toolchain(device if device is not None else parameter.device if parameter is not None
                                else "cpu")
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        sam3.vision_encoder.compile(mode=mode)
        if pad_batches:
            network.vision_batch = "first"
        if tracker is not None:
            compile_tracker(tracker, mode)
    return network
