"""2D inference: one image (or slice), many text prompts -> one mask per prompt, a merged label map, and the
way back to the input's own geometry.

Protocols (``medsam3_monai.protocol_registry``, ``bundles/medsam3/docs/conventions.md``; the name is recorded with every number
it produces):

* ``top_query`` -- the papers' protocol: the mask of each prompt's highest-scoring query (score =
  sigmoid(class logit) x sigmoid(presence logit)), whatever its score.
* ``threshold`` -- the union of every query whose score is >= ``score_threshold`` (multi-instance targets:
  nuclei, vessels); no query above the threshold gives an empty mask.
* ``semantic`` -- the semantic segmentation head (mask = its logit > 0).

Each protocol gives, per prompt, a map of mask logits ``L`` (mask = ``L > 0``) and one score ``s``; the pixel
confidence used to resolve multi-class overlaps is ``s * sigmoid(L)``:

============  ===============================================  ==============================================
protocol      logits ``L`` (slice space)                       score ``s``
============  ===============================================  ==============================================
top_query     the top query's mask logits                      that query's score
threshold     pixel-wise max of the kept queries' logits       the highest kept score; with no query kept,
              (so ``L > 0`` is exactly their union)            ``L = EMPTY_LOGIT`` and the best query's score
semantic      the semantic head's logits                       sigmoid(presence logit)
============  ===============================================  ==============================================

Volumes (``inferers.volume``) keep the detector's top query per slice, so their confidence is the slice's score
times the (inverted) mask.

Multi-class images: every class is queried with its own prompt (one ViT pass; the detector takes the prompts
``detector_chunk`` at a time) and overlaps go to the class with the highest confidence at that pixel (``metrics.merge_classes``).

:func:`segment_image` gives logit maps upsampled bilinearly from the mask head's resolution (S / 14 * 4) to the
slice space S x S; MONAI ``Invertd`` maps such maps back to the input geometry on the ``ResizeToSliced`` record of
the image (bilinear, then thresholded: logits stay logits, so the mask is ``> 0`` at every resolution). The 2D way
back of ``PromptInferer`` resizes them once instead, from the mask head's resolution straight to the picture's size
as SAM3's ``Sam3Processor`` does (``at_mask_size``; for ``threshold`` each kept query's map on its own, united at
the picture's size), and only where it decides something, near the masks' boundaries
(``inferers.postprocess.InvertToInputd``, ``MergePromptsd`` and ``inferers.boundary_merge``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..boxes import largest_component_box_prompts
from ..metrics.merge import merge_classes
from ..networks.outputs import MedSAM3Output
from ..protocol_registry import get_protocol
from .protocols import EMPTY_LOGIT, prompt_logits

__all__ = [
    "EMPTY_LOGIT",
    "ImageSegmentation",
    "ground_truth_boxes",
    "invert_slice",
    "invert_to_input",
    "protocol_logits",
    "segment_image",
]

def protocol_logits(
    outputs: MedSAM3Output,
    size: int | tuple[int, int],
    protocol: str = "top_query",
    score_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per find-query mask logits ``(B, H, W)`` (float32, ``size``) and score ``(B,)`` under ``protocol``
    (see the module docstring for the definition of each)."""
    return get_protocol(protocol).logits(outputs, size, score_threshold)


@dataclass
class ImageSegmentation:
    """Result of :func:`segment_image` for P prompts on one image, in slice space (S x S).

    Attributes:
        prompts: the P prompt texts, in order (class ``c`` of :meth:`label_map` is ``prompts[c - 1]``).
        logits: (P, S, S) float32 mask logits of the protocol (mask = logits > 0); with ``owners``, (K, h, w): the
            kept queries' own maps, each belonging to the prompt ``owners`` names.
        scores: (P,) the protocol's score per prompt (detector confidence that the concept is there).
        protocol: which protocol produced them.
        owners: None (one map per prompt), or (K,) the prompt index of each map of ``logits``, in prompt order (a
            protocol uniting queries at the masks' resolution, ``segment_image(at_mask_size=True)``): a prompt's mask
            is the union of its maps' masks, made where they are resized to.
    """

    prompts: list[str]
    logits: torch.Tensor
    scores: torch.Tensor
    protocol: str
    owners: torch.Tensor | None = None

    @property
    def prompt_logits(self) -> torch.Tensor:
        """(P, ...) one map per prompt: ``logits``, or with ``owners`` the pixel-wise max of each prompt's maps (its
        masks' union at their resolution, ``> 0``)."""
        if self.owners is None:
            return self.logits
        from .boundary_merge import group_max  # (it imports this module)

        return group_max(self.logits, torch.bincount(self.owners.cpu(), minlength=len(self.prompts)).tolist())

    @property
    def masks(self) -> torch.Tensor:
        """(P, S, S) bool masks, one per prompt, overlaps not resolved."""
        return self.prompt_logits > 0

    @property
    def confidence(self) -> torch.Tensor:
        """(P, S, S) pixel confidence score * sigmoid(logit), the quantity overlaps are resolved by."""
        return confidence_of(self.prompt_logits, self.scores)

    def label_map(self) -> torch.Tensor:
        """(S, S) uint8 label map: 0 background, c + 1 = prompt c; overlaps go to the most confident prompt."""
        return merge_classes(self.confidence, self.masks)


def confidence_of(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """score * sigmoid(logit) with ``scores`` (P,) broadcast over the trailing dimensions of ``logits``."""
    shape = (-1,) + (1,) * (logits.ndim - 1)
    return scores.to(logits.device, torch.float32).reshape(shape) * logits.float().sigmoid()


@torch.no_grad()
def segment_image(
    network: torch.nn.Module,
    image: torch.Tensor,
    prompts: Sequence[str],
    *,
    protocol: str = "top_query",
    score_threshold: float = 0.5,
    boxes: torch.Tensor | None = None,
    box_labels: torch.Tensor | None = None,
    pixels_normalized: bool = False,
    logits_on_device: bool = False,
    at_mask_size: bool = False,
) -> ImageSegmentation:
    """Segment one slice-space image with P text prompts (the vision encoder runs once; the detector takes the
    prompts ``network.detector_chunk`` at a time, :func:`~.protocols.prompt_logits`).

    Args:
        network: a :class:`~medsam3_monai.networks.MedSAM3Net` (or anything with its forward signature).
        image: (3, S, S) or (1, 3, S, S) slice-space image as :meth:`MedSAM3Net.forward` takes it: uint8 8-bit
            levels (what ``Sam3Normalized(levels=True)`` and the bundles give) or floats in [0, 1]; floats already
            SAM3-normalised (``Sam3Normalized()``, in [-1, 1]) with ``pixels_normalized=True``.
        prompts: P concept texts.
        protocol: ``top_query`` (default, the papers'), ``threshold`` or ``semantic``.
        score_threshold: for ``threshold``.
        boxes: optional box prompts (the T+I protocol): (P, 4) or (P, K, 4) cx, cy, w, h in [0, 1], e.g. from
            :func:`ground_truth_boxes`; ``box_labels`` (P, K): 1 positive, 0 negative, -10 padding.
        logits_on_device: leave the logits on the network's device (what ``PromptInferer`` does, so that the
            way back to the picture's size runs there); default: copied to the host. Scores are on the host.
        at_mask_size: keep the logits at the masks' own resolution (S / 3.5, 288 px at 1008) instead of resizing
            them to S: what ``PromptInferer`` does, whose way back resizes them once, straight to the picture's
            size, as SAM3's ``Sam3Processor`` does. A protocol uniting several queries' masks (``threshold``) then
            gives each kept query's own map and its prompt (``owners``), united where they are resized to.

    Returns:
        :class:`ImageSegmentation` with (P, S, S) logits (``at_mask_size``: (P, S / 3.5, S / 3.5), for ``threshold``
        (K, S / 3.5, S / 3.5) with ``owners``) and (P,) scores in slice space.
    """
    get_protocol(protocol)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("segment_image needs at least one prompt")
    if image.ndim not in (3, 4):
        hint = ": repeat a grey picture to 3 channels (image.expand(3, -1, -1))" if image.ndim == 2 else ""
        raise ValueError(f"segment_image takes one image (3, S, S) or (1, 3, S, S), got shape {tuple(image.shape)}"
                         + hint)
    images = image[None] if image.ndim == 3 else image
    if images.shape[0] != 1:
        raise ValueError(f"segment_image takes one image, got a batch of {images.shape[0]}")
    kwargs: dict[str, Any] = {"pixels_normalized": pixels_normalized}
    if boxes is not None:
        boxes = boxes[:, None] if boxes.ndim == 2 else boxes
        kwargs["boxes"] = boxes
        kwargs["box_labels"] = box_labels if box_labels is not None else torch.ones(boxes.shape[:2], dtype=torch.long)
    size = tuple(images.shape[-2:])
    logits, scores, owners = prompt_logits(network, images, prompts, [protocol], size, score_threshold,
                                           at_mask_size=at_mask_size, **kwargs)[protocol]
    return ImageSegmentation(prompts, logits if logits_on_device else logits.cpu(), scores.float().cpu(), protocol,
                             None if owners is None else owners.cpu())


def ground_truth_boxes(label: torch.Tensor, values: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The T+I box prompt of each class: the box of the largest connected component of ``label == value``.

    Args:
        label: (H, W) or (1, H, W) class map (any resolution: boxes are normalised, so the native label
            gives the box of the resized image too).
        values: the P label values, in prompt order.

    Returns:
        boxes (P, 1, 4) cx, cy, w, h in [0, 1] and box_labels (P, 1): 1, or -10 (padding) for a class absent
        from the image (that prompt stays text-only).
    """
    label = label[0] if label.ndim == 3 else label
    label = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
    return largest_component_box_prompts([label == int(value) for value in values])


def invert_slice(maps: torch.Tensor, item: Mapping[str, Any], transform: Any, key: str = "image"):
    """(C, S, S) slice-space maps of one 2D item or one volume slice item -> MetaTensor (C, H, W) in that
    image's (or slice's) own size, with MONAI ``Invertd`` (bilinear)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    inverter = Invertd(keys="pred", transform=transform, orig_keys=key, nearest_interp=False)
    return inverter({"pred": MetaTensor(maps.float()), key: item[key]})["pred"]


def invert_to_input(
    maps: torch.Tensor,
    items: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    transform: Any,
    key: str = "image",
    chunk: int = 64,
):
    """Slice-space maps -> the input's own geometry, with MONAI ``Invertd`` on the ``ResizeToSliced`` record.

    Args:
        maps: float maps (logits, probabilities or {0, 1} masks): (P, h, w) for a 2D item (S x S, or the mask
            head's resolution: MONAI's inverse resize takes any size), (P, D, h, w) for the D slice items of a
            volume (in slice order).
        items: the preprocessed item (2D) or its list of slice items (volume, from ``AxialSlicesd``); their
            ``key`` MetaTensor carries the resize record.
        transform: the preprocessing (``Compose``) or the ``ResizeToSliced`` instance that made the items.
        chunk: slices inverted per ``Invertd`` call (they share one resize record; bounds memory).

    Returns:
        MetaTensor (P, H, W) in the image's size, or (P, X, Y, Z) with the volume's affine (slices restacked
        by :func:`~medsam3_monai.transforms.restack_slices`). Bilinear: threshold logits at 0, masks at 0.5.
    """
    from ..transforms.intensity import is_volume_slice
    from ..transforms.slices import restack_slices

    slice_items = [items] if isinstance(items, Mapping) else list(items)
    if maps.ndim == 3 and len(slice_items) == 1 and not is_volume_slice(slice_items[0][key]):
        return invert_slice(maps, slice_items[0], transform, key)
    if maps.ndim == 3:
        maps = maps[:, None]
    num_prompts, depth = maps.shape[:2]
    if depth != len(slice_items):
        raise ValueError(f"maps have {depth} slices but {len(slice_items)} slice items were given")
    planes: list[torch.Tensor] = []
    for start in range(0, depth, chunk):
        part = maps[:, start:start + chunk]
        n = part.shape[1]
        flat = part.transpose(0, 1).reshape(n * num_prompts, *part.shape[-2:])
        inverted = invert_slice(flat, slice_items[start], transform, key).as_tensor()
        planes += list(inverted.reshape(n, num_prompts, *inverted.shape[-2:]).unbind(0))
    return restack_slices(planes, [item[key].meta for item in slice_items])
