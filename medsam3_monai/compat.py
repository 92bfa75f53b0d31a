"""The one module that touches private or unversioned APIs of Ignite and transformers.

Everything else in the project uses public APIs. What is here, and why:

* Ignite has no public way to list an engine's handlers (we find MONAI's ``MLFlowHandler`` to log into its run)
  nor to skip batches of the running epoch (exact mid-epoch resume): ``Engine._event_handlers`` and
  ``Engine._dataloader_iter``.
* transformers' SAM3 tracker is public only through its processor, which would pre-process every slice again;
  we drive ``Sam3TrackerVideoInferenceSession`` directly (features given per slice, mask prompts, the memory bank),
  and run a batch of prompts as one object through three of the tracker's private steps made batch-safe
  (:func:`batched_objects`).
  That class changes between releases, so the supported transformers versions are pinned
  (``SUPPORTED_TRANSFORMERS``, also in ``pyproject.toml``) and ``tests/test_compat.py`` fails on a version whose
  session differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any, Callable, Iterator

import torch

#: transformers releases whose SAM3 tracker session this module is tested against (pyproject.toml pins the same)
SUPPORTED_TRANSFORMERS = (">=5.24", "<5.25")


# ---------------------------------------------------------------------------------------- Ignite
def attached_handlers(engine: Any) -> Iterator[Callable]:
    """Every handler attached to an Ignite ``engine``, whatever the event."""
    for handlers in engine._event_handlers.values():
        for handler, _args, _kwargs in handlers:
            yield handler


def skip_batches(engine: Any, count: int) -> None:
    """Draw and drop the next ``count`` batches of the running epoch of an Ignite ``engine``."""
    for _ in range(count):
        next(engine._dataloader_iter)


# ---------------------------------------------------------------------------------------- transformers
def transformers_version_problem() -> str | None:
    """Why the installed transformers is outside ``SUPPORTED_TRANSFORMERS``, or None when it is supported."""
    import transformers
    from packaging.specifiers import SpecifierSet

    wanted = SpecifierSet(",".join(SUPPORTED_TRANSFORMERS))
    if transformers.__version__ in wanted:
        return None
    return (f"transformers {transformers.__version__} is installed; the SAM3 tracker session is tested with "
            f"transformers{','.join(SUPPORTED_TRANSFORMERS)}: `pip install 'transformers{','.join(SUPPORTED_TRANSFORMERS)}'`")


@lru_cache(maxsize=None)
def warn_unsupported_transformers() -> None:
    """Warn once per process when the installed transformers is outside the tested range (what would fail then
    fails deep inside transformers, e.g. an ``AttributeError`` of ``Sam3Model``)."""
    problem = transformers_version_problem()
    if problem is not None:
        warnings.warn(problem, stacklevel=3)


class _FramesOnDemand(Mapping):
    """A session's ``processed_frames`` of ``count`` slices that holds none: every slice's vision features come from
    the session's feature cache (:class:`_FeaturesOnDemand`), so the tracker never asks for pixels (a 300-slice
    volume at 1008 px would be 3.7 GB in float32); if it did, that is a bug, said as such."""

    def __init__(self, count: int) -> None:
        self.count = int(count)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= int(index) < self.count:
            raise KeyError(index)
        raise RuntimeError(f"the tracker asked for the pixels of slice {index}, whose vision features it was given")

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))


class _FeaturesOnDemand:
    """A session's vision-feature cache whose frame ``i`` is ``features(i)`` (levels of (HW, B, C)): nothing is
    stored per frame (in a batch of prompts each prompt reads its own slice), and the frame last asked for is kept,
    since a step asks for it twice (the segmentation and the memory encoding)."""

    def __init__(self, features: Callable[[int], list[torch.Tensor]], positions: list[torch.Tensor]) -> None:
        self.features, self.positions = features, positions
        self._last: tuple[int, list[torch.Tensor]] | None = None

    def get_vision_features(self, frame_idx: int) -> dict[str, list[torch.Tensor]]:
        if self._last is None or self._last[0] != frame_idx:
            self._last = (frame_idx, self.features(frame_idx))
        return {"vision_feats": self._last[1], "vision_pos_embeds": self.positions}

    def cache_vision_features(self, frame_idx: int, features: Any) -> None:
        raise RuntimeError(f"the tracker computed the vision features of slice {frame_idx}, which it was given")

    def clear_all(self) -> None:
        self._last = None


def tracker_session(num_frames: int, size: int, device: torch.device, dtype: torch.dtype,
                    features: Callable[[int], list[torch.Tensor]], positions: list[torch.Tensor]) -> Any:
    """A ``Sam3TrackerVideoInferenceSession`` over ``num_frames`` slices of ``size`` x ``size`` whose vision features
    of slice ``i`` are ``features(i)`` (FPN levels 0-2, each (HW, B, C): B prompts' slices, see
    :func:`batched_objects`) with the shared position encodings ``positions``: the tracker never runs its ViT."""
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
        Sam3TrackerVideoInferenceSession,
    )

    session = Sam3TrackerVideoInferenceSession(
        video=None, video_height=size, video_width=size, inference_device=device,
        inference_state_device=device, video_storage_device=device, dtype=dtype,
    )
    session.processed_frames = _FramesOnDemand(num_frames)
    session.cache = _FeaturesOnDemand(features, positions)
    return session


def add_mask_prompt(session: Any, obj_id: int, frame_idx: int, mask: torch.Tensor) -> None:
    """A binary (S, S) mask, or (B, S, S) for a batch of prompts, as object ``obj_id``'s prompt on ``frame_idx``
    (the processor's ``add_inputs_to_inference_session(input_masks=...)`` without its image pre-processing)."""
    obj_idx = session.obj_id_to_idx(obj_id)
    masks = mask.float()[None] if mask.ndim == 2 else mask.float()
    session.add_mask_inputs(obj_idx, frame_idx, masks[:, None])
    session.remove_point_inputs(obj_idx, frame_idx)
    session.obj_with_new_inputs = [obj_id]


# ------------------------------------------------------------- transformers: a batch of prompts as one object
# transformers' tracker runs the objects of a session one after the other, each with batch size 1, and three of its
# steps assume that size: the mask selection after the mask decoder and the mask-prompt path index and scale with
# shapes that broadcast across a larger batch, and the memory-conditioned features are reshaped from the memory
# attention's (1, B, HW, C) output as if B were 1. Inside ``batched_objects`` those steps take any batch size; with
# B = 1 the mask decoder step gives transformers' own numbers (the same operations; ``tests/test_tracker_batching.py``).
# Two steps also follow Meta's tracker where transformers' port differs from it: the prompted slice's output and
# object pointer (:func:`_mask_as_output`) and the memory encoding (:func:`_official_memory`); with them the
# propagation is sam3 0.1.4's within float rounding (``tests/test_official_tracker.py``).

def _frame_forward(tracker: Any, input_points: Any = None, input_labels: Any = None, input_boxes: Any = None,
                   input_masks: torch.Tensor | None = None, image_embeddings: list[torch.Tensor] | None = None,
                   multimask_output: bool = True, pixel_values: Any = None, **kwargs: Any) -> Any:
    """``Sam3TrackerVideoModel._single_frame_forward`` for B prompts at once, no point or box prompts: the mask
    decoder on the (B, C, h, w) memory-conditioned features, then per prompt its best mask (multimask: highest
    predicted IoU), high-resolution logits and object pointer."""
    import torch.nn.functional as F
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
        NO_OBJ_SCORE,
        Sam3TrackerVideoImageSegmentationOutput,
    )

    if input_points is not None or input_boxes is not None or pixel_values is not None or kwargs:
        raise ValueError("a batch of prompts takes mask prompts and image embeddings only")
    top = image_embeddings[-1]
    batch = top.shape[0]
    positions = tracker.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
    no_points = torch.zeros(batch, 1, 1, 2, dtype=top.dtype, device=top.device)
    no_labels = -torch.ones(batch, 1, 1, dtype=torch.int32, device=top.device)
    if input_masks is not None and input_masks.shape[-2:] != tracker.prompt_encoder.mask_input_size:
        input_masks = F.interpolate(input_masks.float(), size=tracker.prompt_encoder.mask_input_size,
                                    align_corners=False, mode="bilinear", antialias=True).to(input_masks.dtype)
    sparse, dense = tracker.prompt_encoder(input_points=no_points, input_labels=no_labels, input_boxes=None,
                                           input_masks=input_masks)
    low_res, iou_scores, tokens, object_scores = tracker.mask_decoder(
        image_embeddings=top, image_positional_embeddings=positions, sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask_output,
        high_resolution_features=image_embeddings[:-1],
    )  # (B, 1, K, h, w), (B, 1, K), (B, 1, K, C), (B, 1, 1)
    appearing = object_scores > 0
    low_res = torch.where(appearing[:, None, None], low_res, NO_OBJ_SCORE)
    high_res = F.interpolate(low_res.squeeze(1).float(), size=(tracker.image_size, tracker.image_size),
                             mode="bilinear", align_corners=False).unsqueeze(1).to(low_res.dtype)
    token = tokens[:, :, 0]
    if multimask_output:
        best = torch.argmax(iou_scores, dim=-1)  # (B, 1)
        rows = torch.arange(batch, device=best.device)[:, None]
        first_object = torch.zeros(1, 1, dtype=torch.long, device=best.device)
        low_masks, high_masks = low_res[rows, first_object, best], high_res[rows, first_object, best]
        if tokens.size(2) > 1:
            token = tokens[rows, first_object, best]
    else:
        low_masks, high_masks = low_res[:, :, 0], high_res[:, :, 0]
    pointer = tracker.object_pointer_proj(token)  # (B, 1, C)
    present = appearing.to(pointer.dtype)
    pointer = present * pointer
    pointer = pointer + (1 - present) * tracker.no_object_pointer
    return Sam3TrackerVideoImageSegmentationOutput(
        iou_scores=iou_scores, pred_masks=low_masks, high_res_masks=high_masks, object_pointer=pointer,
        object_score_logits=object_scores, image_embeddings=image_embeddings,
    )


def _mask_as_output(tracker: Any, backbone_features: torch.Tensor, high_res_features: list[torch.Tensor],
                    mask_inputs: torch.Tensor) -> Any:
    """A prompted slice's output for B mask prompts at once, as Meta's tracker makes it (sam3 0.1.4 ``add_new_mask``,
    ``_use_mask_as_output`` and the consolidation before propagation), not as transformers'
    ``_use_mask_as_output``, which differs in two places:

    * the object pointer: the mask decoder reads the mask prompt at the tracker's mask input size (16 x the feature
      side: 1152 px at 1008, an antialiased resize, then ``mask_downsample`` to the 288 px mask input) and gives a
      single mask, whose output token 0 is projected; transformers downsamples the 1008 px mask and picks the best
      of three tokens;
    * the slice's logits: the binary mask (> 0.5) as +-1024 logits, antialiased to the low-resolution mask size
      (``pred_masks``) and read back at S x S (``high_res_masks``, what the memory of the prompted slice encodes);
      transformers' are the mask x 20 - 10 at S.

    ``mask_inputs`` (B, 1, S, S): the prompts (:func:`add_mask_prompt`)."""
    import torch.nn.functional as F
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
        NO_OBJ_SCORE,
        Sam3TrackerVideoImageSegmentationOutput,
    )

    dtype = backbone_features.dtype
    masks = mask_inputs.float()
    low_size = tuple(tracker.prompt_encoder.mask_input_size)
    prompt_size = (4 * low_size[0], 4 * low_size[1])  # official input_mask_size
    prompt = masks if masks.shape[-2:] == prompt_size else F.interpolate(
        masks, size=prompt_size, mode="bilinear", align_corners=False, antialias=True)
    embeddings = high_res_features + [backbone_features]
    pointer = _frame_forward(tracker, input_masks=tracker.mask_downsample(prompt.to(dtype)),
                             image_embeddings=embeddings, multimask_output=False).object_pointer  # (B, 1, C)
    present = torch.any(prompt.flatten(1) > 0.0, dim=1)[..., None].to(dtype)  # (B, 1)
    object_scores = 20.0 * present - 10.0
    present = present[..., None]  # (B, 1, 1): per prompt, not across the batch
    pointer = present * pointer + (1 - present) * tracker.no_object_pointer
    logits = torch.where(masks > 0.5, -NO_OBJ_SCORE, NO_OBJ_SCORE)
    low_res = F.interpolate(logits, size=low_size, mode="bilinear", align_corners=False, antialias=True)
    high_res = F.interpolate(low_res, size=(tracker.image_size, tracker.image_size), mode="bilinear",
                             align_corners=False)
    return Sam3TrackerVideoImageSegmentationOutput(
        iou_scores=mask_inputs.new_ones(mask_inputs.size(0), 1).to(dtype), pred_masks=low_res.to(dtype),
        high_res_masks=high_res.to(dtype), object_pointer=pointer, object_score_logits=object_scores.unsqueeze(-1),
        image_embeddings=embeddings,
    )


class _BatchFirstMemoryAttention(torch.nn.Module):
    """The tracker's memory attention with its (1, B, HW, C) output as (B, 1, HW, C), which the memory-conditioned
    features' reshape reads right for any B (for B = 1 both are the same tensor)."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.attention(*args, **kwargs).transpose(0, 1)


@contextmanager
def batched_objects(tracker: Any) -> Iterator[Any]:
    """For the duration, ``tracker`` (a ``Sam3TrackerVideoModel``) segments an object whose tensors hold a batch of
    B prompts (features (HW, B, C), a (B, S, S) mask prompt; :func:`tracker_session`, :func:`add_mask_prompt`) as B
    objects of batch size 1 would be, each with its own memory bank, in one pass of its modules. The tracker's
    modules are untouched (compiled ones stay compiled); three of its steps are swapped on the instance and
    restored after (the prompted slice's output is Meta's, :func:`_mask_as_output`). Run the memory encoding with
    :func:`encode_frame_memory` (``forward(run_mem_encoder=False)``: transformers' own batched encoding assumes
    batch size 1, and its order of resize and sigmoid is not Meta's)."""
    attention = tracker._modules["memory_attention"]
    tracker._single_frame_forward = partial(_frame_forward, tracker)
    tracker._use_mask_as_output = partial(_mask_as_output, tracker)
    tracker._modules["memory_attention"] = _BatchFirstMemoryAttention(attention)
    try:
        yield tracker
    finally:
        tracker._modules["memory_attention"] = attention
        del tracker._single_frame_forward, tracker._use_mask_as_output


def _official_memory(tracker: Any, current_vision_feats: torch.Tensor, pred_masks_high_res: torch.Tensor,
                     object_score_logits: torch.Tensor, is_mask_from_pts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``Sam3TrackerVideoModel._encode_new_memory`` (same arguments and outputs) as Meta's tracker computes it
    (sam3 0.1.4 ``_encode_new_memory``): the (B, 1, S, S) logits become the mask (binary for a prompted slice, else
    their sigmoid) x ``sigmoid_scale_for_mem_enc`` + ``sigmoid_bias_for_mem_enc`` first, and that map is then resized
    (antialiased bilinear) to the memory encoder's input (1152 px at 1008). transformers resizes the logits and takes
    the sigmoid after, which changes every slice's memory. Returns the memory (hw, B, C) in bfloat16, as both codes
    keep it, and its position encoding (hw, B, C)."""
    import torch.nn.functional as F

    masks = (pred_masks_high_res > 0).float() if is_mask_from_pts else torch.sigmoid(pred_masks_high_res.float())
    masks = masks * tracker.config.sigmoid_scale_for_mem_enc + tracker.config.sigmoid_bias_for_mem_enc
    size = tuple(4 * side for side in tracker.prompt_encoder.mask_input_size)
    if masks.shape[-2:] != size:
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=True)
    height, width = tracker.backbone_feature_sizes[-1]
    batch = current_vision_feats.size(1)
    pixels = current_vision_feats.permute(1, 2, 0).reshape(batch, tracker.hidden_dim, height, width)
    memory, positions = tracker.memory_encoder(pixels, masks.to(pixels.dtype))
    occlusion = tracker.occlusion_spatial_embedding_parameter
    if occlusion is not None:  # a slice where the object is absent: the no-object embedding
        absent = 1 - (object_score_logits > 0).to(memory.dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        memory = memory + absent * occlusion[..., None, None].expand(*memory.shape)
    return (memory.to(torch.bfloat16).flatten(2).permute(2, 0, 1),
            positions.to(pred_masks_high_res.dtype).flatten(2).permute(2, 0, 1))


def encode_frame_memory(tracker: Any, session: Any, frame_idx: int) -> None:
    """The memory of slice ``frame_idx`` just segmented (what the tracker's forward does with ``run_mem_encoder``,
    computed as Meta's tracker does: :func:`_official_memory`) for a batched object; a slice whose memory exists
    (the seed, seen again) is left as it is. The high-resolution logits it reads are dropped from the session
    after."""
    outputs = session.output_dict_per_obj[0]
    is_prompt = frame_idx in outputs["cond_frame_outputs"]  # the seed slice: its mask prompt
    out = outputs["cond_frame_outputs" if is_prompt else "non_cond_frame_outputs"][frame_idx]
    if "maskmem_features" in out:
        return
    features = session.cache.get_vision_features(frame_idx)["vision_feats"][-1]
    out["maskmem_features"], out["maskmem_pos_enc"] = _official_memory(
        tracker, features, out.pop("high_res_masks"), out["object_score_logits"], is_mask_from_pts=is_prompt)


def forget_frame(session: Any, frame_idx: int) -> None:
    """Drop the stored outputs of tracked (not prompted) slice ``frame_idx`` from the session's memory bank."""
    session.output_dict_per_obj[0]["non_cond_frame_outputs"].pop(frame_idx, None)


def frame_masks(session: Any, frame_idx: int) -> torch.Tensor:
    """(B, 1, h, w) low-resolution mask logits of slice ``frame_idx``; a tracked slice's are dropped from the
    session (only the prompted slice's are read again, when the backward pass starts there)."""
    outputs = session.output_dict_per_obj[0]
    if frame_idx in outputs["cond_frame_outputs"]:
        return outputs["cond_frame_outputs"][frame_idx]["pred_masks"]
    return outputs["non_cond_frame_outputs"][frame_idx].pop("pred_masks")
