"""MedSAM3Net: transformers' SAM3 detector with every decoder layer exposed for set-prediction training."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers import Sam3Config, Sam3Model
from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

from ..boxes import BOX_PADDING_LABEL
from ..tensors import plain_tensor
from ..compat import warn_unsupported_transformers
from .checkpoints import load_sam3, save_hf_folder
from .dac import dac_decoder
from .outputs import MedSAM3Output, OneToManyOutput
from .presets import check_image_size
from .regularization import TrainingDropout, apply_training_dropout, register_weight_dropout
from .text_cache import TextFeatureCache
from .tokenizer import tokenize_prompts

#: the box prompt labels SAM3 knows: positive, negative, padding
BOX_LABELS = (1, 0, BOX_PADDING_LABEL)

#: find-queries (image, prompt pairs) per detector pass in :meth:`MedSAM3Net.forward_chunks`
DETECTOR_CHUNK = 16
BOX_ONLY_PROMPT = "visual"  # SAM3's text for a prompt made of boxes alone (Sam3Processor.add_geometric_prompt)


def _autocast_off(device: torch.device | str) -> contextlib.AbstractContextManager:
    """No autocast on ``device``'s type for the duration (nothing to do when none is on)."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """SAM3 pixel normalisation (mean = std = 0.5) of (B, 3, S, S) images.

    uint8 input is scaled exactly as SAM3 does, ``uint8 * (1/255)``; float input must lie in [0, 1].
    """
    if images.dtype == torch.uint8:
        images = images.float() * (1.0 / 255.0)
    return (images - 0.5) / 0.5


def network_pixels(images: torch.Tensor, device: torch.device | str, non_blocking: bool = True, *,
                   pixels_normalized: bool = True) -> torch.Tensor:
    """Slice-space images as the networks read them: (B, 3, S, S) SAM3-normalised float on ``device``.

    ``images``: (B, 3, S, S) float, SAM3-normalised (``Sam3Normalized``; ``pixels_normalized=True``), returned as
    they are once on ``device``, or in [0, 1] (``pixels_normalized=False``), normalised there; or (B, 1 or 3, S, S)
    uint8 8-bit levels (``Sam3Normalized(levels=True)``, a grey volume slice one channel): they cross to the device as
    bytes (a quarter of float32, a twelfth for grey), are repeated to RGB there (a view) and normalised by
    :func:`normalize_pixels`, the arithmetic of ``transforms.sam3_normalize``: the same values.
    """
    pixels = plain_tensor(images).to(device, non_blocking=non_blocking)
    if pixels.dtype != torch.uint8:
        return pixels if pixels_normalized else normalize_pixels(pixels)
    return normalize_pixels(pixels.expand(-1, 3, -1, -1))


def check_pixel_range(images: torch.Tensor, pixels_normalized: bool) -> None:
    """Float ``images`` on the CPU (elsewhere the check would cost a device synchronisation) must lie in [0, 1], or
    in [-1, 1] when ``pixels_normalized`` (SAM3-normalised), give or take 0.1 of resampling overshoot; uint8 levels
    always pass. A ValueError says what to change."""
    if not images.is_floating_point() or images.device.type != "cpu" or not images.numel():
        return
    low, high = (float(v) for v in torch.aminmax(images.float()))
    expected = (-1.0, 1.0) if pixels_normalized else (0.0, 1.0)
    slack = 0.1  # resampling overshoot
    if not (expected[0] - slack <= low and high <= expected[1] + slack):  # NaN fails too
        hint = ("replace the NaN / Inf pixels" if not math.isfinite(low + high) else
                "SAM3-normalised images (mean = std = 0.5) lie in [-1, 1]" if pixels_normalized else
                "divide 0..255 floats by 255, or pass pixels_normalized=True for SAM3-normalised images")
        raise ValueError(f"float images hold values in [{low:.4g}, {high:.4g}], expected "
                         f"[{expected[0]:g}, {expected[1]:g}]: {hint}")


class MedSAM3Net(nn.Module):
    """Text(+box)-prompted SAM3 detector for medical images.

    Args:
        source: ``"tiny"`` (random-init preset), an HF folder (facebook/sam3 layout or one we saved),
            an original ``sam3.pt``, a Medical-SAM3 release file, or a checkpoint we trained. The format
            is detected; loading is strict and a mismatch raises ``CheckpointError`` with a key report.
        config: architecture to build when the checkpoint carries none (original layouts); default full SAM3 at
            ``image_size`` (1008 when None).
        image_size: slice-space side S for the ``tiny`` preset (default 112); for a checkpoint without a
            configuration (``sam3.pt``, a Medical-SAM3 release file: their weights fit SAM3 at any multiple of 14),
            the size to build it at (1008 when None; the release's 3D checkpoint works at 504); for one with a
            configuration, the size it must work at (a ValueError says so when it does not; None takes its own).
        seed: initialisation seed of the ``tiny`` preset.
        gradient_checkpointing: recompute ViT and CLIP layers in backward to save memory.
        text_cache_size: prompts kept in the text-feature cache (0 disables it).
        training_dropout: SAM3's training regularisation (:class:`TrainingDropout`: dropout 0.1, ViT stochastic
            depth 0.1); ``{"dropout": 0, "drop_path": 0}`` turns it off. Eval mode never drops.
        dac: in training mode, also run SAM3's one-to-many query set (``outputs.one_to_many``) as the official
            model does; eval forwards are the same either way.
        detector_chunk: the most find-queries (image, prompt pairs) the inferers put through the detector at once
            (:meth:`forward_chunks`); an attribute, so it can be changed on a loaded network.

    Attribute ``vision_batch`` (default None): when an int N, :meth:`encode_images` pads a batch of fewer images to
    N with zero images and drops their features, so a compiled vision encoder sees one batch shape and compiles
    once; ``"first"`` (what ``inferers.batch.compile_network(..., pad_batches=True)`` sets) becomes the size of the
    first batch encoded: a folder's or a volume's last, partial batch is padded to the batches before it, and a
    single picture is never padded. The images' own features are the same (the encoder treats each image alone).

    The network computes what Meta's official SAM3 computes (see :mod:`.official_numerics`): a text-only prompt
    goes through the geometry encoder too (its CLS token joins the prompt), the ViT LayerNorm eps is 1e-5 and
    presence logits are not clamped.
    """

    def __init__(
        self,
        source: str | Path = "tiny",
        *,
        config: Sam3Config | None = None,
        image_size: int | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        text_cache_size: int = 1024,
        training_dropout: TrainingDropout | dict | None = None,
        dac: bool = True,
        detector_chunk: int = DETECTOR_CHUNK,
    ) -> None:
        super().__init__()
        warn_unsupported_transformers()
        loaded = load_sam3(source, config=config, image_size=image_size, seed=seed)
        built = int(loaded.model.config.vision_config.backbone_config.image_size)
        if image_size is not None and built != image_size:  # a checkpoint keeps its own architecture
            raise ValueError(f"checkpoint {source} works at {built} px, not {image_size}: give its size ({built}) as "
                             f"the image size (the commands' --image-size {built}, the bundles' --image_size {built}), "
                             "or leave the commands' --image-size out")
        self.sam3: Sam3Model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = str(source)
        self.source_format = loaded.source_format
        #: how the network saw the pictures in training, as its model file records it (``{"resize_kernel": ...,
        #: "ct_window": ...}``; ``{}`` when it records none): what inference repeats unless told otherwise
        #: (:func:`~medsam3_monai.networks.checkpoints.inference_preprocessing`)
        self.trained_preprocessing: dict[str, Any] = dict(loaded.preprocessing)
        self.training_dropout = TrainingDropout.of(training_dropout)
        self._regularization_hooks = apply_training_dropout(self.sam3, self.training_dropout)
        self.dac = bool(dac)
        self.detector_chunk = int(detector_chunk)
        self.vision_batch: int | str | None = None
        self.text_cache = TextFeatureCache([self.sam3.text_encoder, self.sam3.text_projection], text_cache_size)
        self.set_gradient_checkpointing(gradient_checkpointing)

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``torch.load`` of a whole network) in a new process: its attention implementation with
        SAM3's weight dropout is registered again (the registry does not travel with the network)."""
        super().__setstate__(state)
        register_weight_dropout(self.sam3)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> Sam3Config:
        return self.sam3.config

    @property
    def image_size(self) -> int:
        """Side S of the square slice space the network takes."""
        return int(self.sam3.config.vision_config.backbone_config.image_size)

    @property
    def num_queries(self) -> int:
        return int(self.sam3.config.detr_decoder_config.num_queries)

    @property
    def num_decoder_layers(self) -> int:
        return int(self.sam3.config.detr_decoder_config.num_layers)

    @property
    def mask_size(self) -> int:
        """Side of the mask logits: 4x the ViT grid (288 at 1008 px)."""
        return int(self.sam3.config.vision_config.backbone_feature_sizes[0][0])

    # ------------------------------------------------------------------ switches
    def train(self, mode: bool = True) -> "MedSAM3Net":
        """Set training mode; an encoder whose parameters are all frozen (MedSAM3 mode) stays in eval mode, so
        it extracts features without stochastic depth."""
        super().train(mode)
        for encoder in (self.sam3.vision_encoder, self.sam3.text_encoder):
            parameters = list(encoder.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                encoder.eval()
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute ViT and CLIP text layers in backward (upstream marks SAM3 unsupported; it works for both)."""
        if enabled:
            self.sam3.supports_gradient_checkpointing = True
            self.sam3.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif self.sam3.is_activation_checkpointing:
            self.sam3.activation_checkpointing_disable()

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.sam3.is_activation_checkpointing)

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 32) token ids and attention mask, padded with ``<|endoftext|>``."""
        return tokenize_prompts(self.tokenizer, prompts)

    def _encode_text_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.sam3.text_projection.weight.device
        input_ids, attention_mask = (t.to(device) for t in self.tokenize(prompts))
        features = self.sam3.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).pooler_output
        # SAM3's text mask is ``ids != 0`` (its text encoder pads with 0): besides the padding (ours: <|endoftext|>,
        # outside the attention mask) it hides a prompt token of id 0, the byte '!' as a word piece ("polyp !/ lesion"),
        # from the fusion encoder and the decoder; the CLIP encoder itself reads it (SAM3 runs it with the causal mask)
        return features, attention_mask.bool() & (input_ids != 0)

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text features (P, 32, C) and validity mask (P, 32) bool; cached when no grad is needed.

        Cached features are computed outside any autocast (in the weights' dtype), so a cache entry is the same
        whichever precision the call that made it ran in (text is encoded once per prompt: no speed lost)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.text_cache.usable():
            return self.text_cache.lookup(prompts, self._encode_text_full_precision)
        return self._encode_text_uncached(prompts)

    def _encode_text_full_precision(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast_off(self.sam3.text_projection.weight.device):
            return self._encode_text_uncached(prompts)

    # ------------------------------------------------------------------ forward
    def _check_images(self, images: torch.Tensor, pixels_normalized: bool = False) -> None:
        """Shape, dtype and (on the CPU, where it costs no device synchronisation) the value range of ``images``."""
        size = self.image_size
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, {size}, {size}), not {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, {size}, {size}); got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but this model takes {size}x{size}: "
                f"resize slices to the model's image_size first (medsam3_monai.transforms)."
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images are {str(images.dtype).replace('torch.', '')}: give uint8 8-bit levels or "
                             "floats in [0, 1] (e.g. images.to(torch.uint8) for 0..255 integers)")
        check_pixel_range(images, pixels_normalized)

    @staticmethod
    def _check_boxes(boxes: torch.Tensor | None, box_labels: torch.Tensor | None,
                     num_prompts: int | None) -> torch.Tensor | None:
        """Box prompts as a (B, K, 4) tensor of normalised cx, cy, w, h (range checked on the CPU)."""
        if boxes is None:
            if box_labels is not None:
                raise ValueError("box_labels given without boxes: pass boxes (B, K, 4) too, or leave box_labels out")
            return None
        boxes = torch.as_tensor(boxes)
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or (num_prompts is not None and boxes.shape[0] != num_prompts):
            count = "" if num_prompts is None else f" ({num_prompts} prompts)"
            raise ValueError(f"boxes must be (B, K, 4), one row of K boxes per prompt{count}; got shape "
                             f"{tuple(boxes.shape)}")
        if box_labels is not None and tuple(torch.as_tensor(box_labels).shape) != tuple(boxes.shape[:2]):
            raise ValueError(f"box_labels must be (B, K) = {tuple(boxes.shape[:2])}, one label per box; got shape "
                             f"{tuple(torch.as_tensor(box_labels).shape)}")
        if boxes.device.type == "cpu" and boxes.numel():  # value checks where they cost no device synchronisation
            low, high = (float(v) for v in torch.aminmax(boxes.float()))
            if not (-1e-3 <= low and high <= 1 + 1e-3):
                raise ValueError(f"box prompts hold values in [{low:.4g}, {high:.4g}]: they are normalised cx, cy, "
                                 "w, h in [0, 1] (pixel boxes [x1, y1, x2, y2]: "
                                 "medsam3_monai.inferers.inputs.box_prompts(boxes, num_prompts, (H, W)))")
            labels = None if box_labels is None else torch.as_tensor(box_labels)
            if labels is not None and labels.dtype == torch.bool:  # SAM3's own API: True positive, False negative
                raise ValueError("box_labels are bool (SAM3's convention); give integers: 1 positive, 0 negative, "
                                 "-10 padding, e.g. box_labels.long()")
            if labels is not None and labels.device.type == "cpu" and not bool(torch.isin(
                    labels, torch.tensor(BOX_LABELS, dtype=labels.dtype)).all()):
                raise ValueError(f"box_labels hold {sorted(set(labels.unique().tolist()) - set(BOX_LABELS))}: each "
                                 "is 1 (positive box), 0 (negative) or -10 (padding)")
        return boxes

    def _query_image_ids(self, num_images: int, num_queries: int, image_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Index (B,) of the image each find-query looks at, or None when it is the identity."""
        if image_ids is None:
            if num_queries == num_images:
                return None
            if num_images == 1:
                return torch.zeros(num_queries, dtype=torch.long)
            raise ValueError(
                f"{num_queries} prompts for {num_images} images: pass image_ids (one image index per prompt)"
            )
        image_ids = torch.as_tensor(image_ids, dtype=torch.long).flatten()
        if image_ids.numel() != num_queries:
            raise ValueError(f"image_ids has {image_ids.numel()} entries for {num_queries} prompts")
        if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= num_images):
            raise ValueError(f"image_ids must index the {num_images} images; got {image_ids.tolist()}")
        return image_ids

    @staticmethod
    def _prompt_texts(prompts: Sequence[str] | str | None, boxes: torch.Tensor | None) -> list[str]:
        """The B prompt texts of :meth:`forward`'s ``prompts``: one text, a sequence, or None with B box prompts
        (SAM3's ``"visual"`` text for each)."""
        if prompts is None:
            if boxes is None:
                raise ValueError("give text prompts, boxes, or both (prompts=None needs boxes)")
            boxes = torch.as_tensor(boxes)
            return [BOX_ONLY_PROMPT] * (len(boxes) if boxes.ndim else 1)  # a 0-d tensor: the box check says so
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def _find_queries(self, images: torch.Tensor, prompts: Sequence[str] | str | None,
                      image_ids: torch.Tensor | Sequence[int] | None, boxes: torch.Tensor | None,
                      box_labels: torch.Tensor | None, pixels_normalized: bool,
                      ) -> tuple[torch.Tensor, list[str], torch.Tensor | None, torch.Tensor | None]:
        """:meth:`forward`'s inputs checked: SAM3-normalised pixels, the B prompt texts, the image index and the
        (B, K, 4) box prompts (or None)."""
        self._check_images(images, pixels_normalized)
        images = plain_tensor(images)
        prompts = self._prompt_texts(prompts, boxes)
        if not prompts:
            raise ValueError("no prompts: give at least one text prompt (or prompts=None with box prompts)")
        boxes = self._check_boxes(boxes, box_labels, len(prompts))
        index = self._query_image_ids(images.shape[0], len(prompts), image_ids)
        normalized = pixels_normalized and images.dtype != torch.uint8  # uint8 images are 8-bit levels, always
        return (images if normalized else normalize_pixels(images)), prompts, index, boxes

    def forward(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None,
        *,
        image_ids: torch.Tensor | Sequence[int] | None = None,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        pixels_normalized: bool = False,
    ) -> MedSAM3Output:
        """Run the detector for B find-queries.

        Args:
            images: (N, 3, S, S) slices, float in [0, 1] or uint8 (normalised here with mean = std = 0.5);
                pass ``pixels_normalized=True`` when float ones are already SAM3-normalised (uint8 images are
                8-bit levels, normalised here either way).
            prompts: B text prompts, one per find-query; ``None`` with ``boxes`` for box-only prompts (SAM3's
                text for those, ``"visual"``).
            image_ids: (B,) image index of each prompt; optional when B == N (pairwise) or N == 1.
                The vision encoder runs once per image, however many prompts share it.
            boxes: optional (B, K, 4) box prompts, normalised cx, cy, w, h in [0, 1].
            box_labels: (B, K) 1 positive, 0 negative, -10 padding (default: all positive).

        Returns:
            MedSAM3Output with per-layer logits/boxes/presence and last-layer masks and semantic seg; in training
            mode (with ``dac``) also the one-to-many query set.
        """
        pixel_values, prompts, index, boxes = self._find_queries(images, prompts, image_ids, boxes, box_labels,
                                                                 pixels_normalized)
        text_features, text_mask = self.encode_text(prompts)
        return self.forward_features(pixel_values, text_features, text_mask, boxes, box_labels, index)

    def forward_chunks(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None,
        *,
        image_ids: torch.Tensor | Sequence[int] | None = None,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        pixels_normalized: bool = False,
        chunk: int | None = None,
    ) -> Iterator[tuple[int, int, MedSAM3Output]]:
        """:meth:`forward` for inference with many find-queries: ``(start, stop, outputs)`` for queries
        ``start:stop``, at most ``chunk`` (default :attr:`detector_chunk`) at a time.

        The vision encoder runs once for all N images; the detector (DETR encoder and decoder, mask head) then
        takes the queries chunk by chunk. Its memory grows with the queries it holds (at 1008 px each carries
        its image's FPN levels and Q mask logits at 288 x 288, a few hundred MB in float32), so a caller that
        keeps only what it needs of each chunk (a protocol's mask per query) holds at most ``chunk`` of them:
        a 117-class CT is segmented in the memory of 16 classes. The arguments are :meth:`forward`'s; each
        chunk's outputs are those of :meth:`forward` on its queries alone.
        """
        chunk = int(self.detector_chunk if chunk is None else chunk)
        if chunk < 1:
            raise ValueError(f"detector chunk must be >= 1, got {chunk}")
        count = len(self._prompt_texts(prompts, boxes))
        if count <= chunk:  # one forward, through __call__ as before (its hooks run; it checks the inputs)
            yield 0, count, self(images, prompts, image_ids=image_ids, boxes=boxes, box_labels=box_labels,
                                 pixels_normalized=pixels_normalized)
            return
        pixel_values, prompts, index, boxes = self._find_queries(images, prompts, image_ids, boxes, box_labels,
                                                                 pixels_normalized)
        if index is None:  # pairwise: query b looks at image b
            index = torch.arange(count)
        text_features, text_mask = self.encode_text(prompts)
        features, positions = self.encode_images(pixel_values)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            part = slice(start, stop)
            yield start, stop, self.detect(
                features, positions, text_features[part], text_mask[part],
                None if boxes is None else boxes[part], None if box_labels is None else box_labels[part],
                index[part])

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The vision encoder (ViT + FPN neck) on (N, 3, S, S) SAM3-normalised slices: the FPN levels the detector
        reads and their position encodings, each (N, C, h, w), finest first."""
        patch_weight = self.sam3.vision_encoder.backbone.embeddings.patch_embeddings.projection.weight
        pixel_values = pixel_values.to(device=patch_weight.device, dtype=patch_weight.dtype)
        count = pixel_values.shape[0]
        if self.vision_batch == "first":
            self.vision_batch = count
        if self.vision_batch is not None and count < self.vision_batch:  # one batch shape (class docstring)
            padding = pixel_values.new_zeros(self.vision_batch - count, *pixel_values.shape[1:])
            pixel_values = torch.cat([pixel_values, padding])
        vision = self.sam3.vision_encoder(pixel_values)
        return ([level[:count] for level in vision.fpn_hidden_states[:-1]],
                [position[:count] for position in vision.fpn_position_encoding[:-1]])

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> MedSAM3Output:
        """The detector on encoded prompts: the part of :meth:`forward` after tokenising and encoding text
        (what :mod:`.export` exports; text features come from :meth:`encode_text`).

        Args:
            pixel_values: (N, 3, S, S) SAM3-normalised slices.
            text_features, text_mask: (B, 32, C) and (B, 32) from :meth:`encode_text`.
            boxes, box_labels: optional (B, K, 4) cxcywh box prompts and (B, K) labels.
            image_index: (B,) image of each prompt, or None when B == N.
        """
        return self.detect(*self.encode_images(pixel_values), text_features, text_mask, boxes, box_labels,
                           image_index)

    def detect(
        self,
        features: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> MedSAM3Output:
        """The detector for B find-queries on images already encoded (:meth:`encode_images`): the geometry encoder,
        DETR encoder and decoder, scoring and mask head. Arguments as :meth:`forward_features`."""
        fpn_features, fpn_positions = list(features), list(positions)
        if image_index is not None:
            image_index = image_index.to(fpn_features[0].device, non_blocking=True)  # no host sync
            fpn_features = [f.index_select(0, image_index) for f in fpn_features]
            fpn_positions = [p.index_select(0, image_index) for p in fpn_positions]
        if boxes is None:  # text only: the geometry encoder still runs on an empty box set (its CLS token)
            boxes = text_features.new_zeros((text_features.shape[0], 0, 4))
        prompt_features, prompt_mask = self._add_geometry_prompt(
            text_features, text_mask, boxes, box_labels, fpn_features, fpn_positions
        )
        return self._detect(fpn_features, fpn_positions, prompt_features, prompt_mask)

    def _add_geometry_prompt(
        self,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: torch.Tensor,
        box_labels: torch.Tensor | None,
        fpn_features: list[torch.Tensor],
        fpn_positions: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the geometry encoder's tokens (K boxes + its CLS token) to the text tokens.

        Returns (B, T + K + 1, C) features and the (B, T + K + 1) validity mask; K may be 0, as for text-only
        prompts in SAM3 (``Sam3Image._encode_prompt`` always encodes the geometric prompt).
        """
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != text_features.shape[0]:
            raise ValueError(f"boxes must be (B={text_features.shape[0]}, K, 4) cxcywh; got {tuple(boxes.shape)}")
        if torch.is_autocast_enabled(text_features.device.type):
            # the small geometry encoder runs in the weights' dtype: under bf16 autocast transformers would hand
            # torchvision's roi_align float16 boxes, which autocast's concatenation of several images rejects
            dtype = self.sam3.geometry_encoder.boxes_direct_project.weight.dtype
            fpn_features = [f.to(dtype) for f in fpn_features]
            fpn_positions = [p.to(dtype) for p in fpn_positions]
            autocast = _autocast_off(text_features.device)
        else:
            autocast = contextlib.nullcontext()
        boxes = boxes.to(device=text_features.device, dtype=fpn_features[0].dtype)
        if box_labels is None:
            box_labels = torch.ones(boxes.shape[:2], dtype=torch.long, device=boxes.device)
        box_labels = box_labels.to(device=boxes.device, dtype=torch.long)
        box_mask = box_labels != BOX_PADDING_LABEL
        box_labels = torch.where(box_labels == BOX_PADDING_LABEL, 0, box_labels)
        with autocast:
            geometry = self.sam3.geometry_encoder(
                box_embeddings=boxes,
                box_mask=box_mask,
                box_labels=box_labels,
                img_feats=fpn_features,
                img_pos_embeds=fpn_positions,
            )
        features = torch.cat([text_features, geometry.last_hidden_state], dim=1)
        mask = torch.cat([text_mask, geometry.attention_mask], dim=1)
        return features, mask

    def _detect(
        self,
        fpn_features: list[torch.Tensor],
        fpn_positions: list[torch.Tensor],
        prompt_features: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> MedSAM3Output:
        """DETR encoder + decoder + scoring + mask head over prompt tokens, keeping every decoder layer.

        In training mode with ``dac`` the decoder runs SAM3's 2Q queries (:func:`.dac.dac_decoder`); the first Q
        are the outputs, the last Q go to ``one_to_many``.
        """
        sam3 = self.sam3
        encoder = sam3.detr_encoder(
            vision_features=[fpn_features[-1]],
            text_features=prompt_features,
            vision_pos_embeds=[fpn_positions[-1]],
            text_mask=prompt_mask,
        )
        decoder_inputs = dict(
            vision_features=encoder.last_hidden_state,
            text_features=encoder.text_features,
            vision_pos_encoding=encoder.pos_embeds_flattened,
            text_mask=prompt_mask,
            # the decoder reads the grid's height and width as numbers (its box position bias): read from a host
            # tensor they cost no device synchronisation (the encoder's copy lives on the device)
            spatial_shapes=torch.tensor([tuple(fpn_features[-1].shape[-2:])], dtype=torch.long),
        )
        if self.training and self.dac:
            with dac_decoder(sam3.detr_decoder) as num_queries:
                decoder = sam3.detr_decoder(**decoder_inputs)
        else:
            num_queries = self.num_queries
            decoder = sam3.detr_decoder(**decoder_inputs)
        hidden = decoder.intermediate_hidden_states  # (L, B, Q or 2Q, C)
        offsets = sam3.detr_decoder.box_head(hidden)
        boxes_cxcywh = (inverse_sigmoid(decoder.reference_boxes) + offsets).sigmoid()
        boxes_xyxy = box_cxcywh_to_xyxy(boxes_cxcywh)
        logits = sam3.dot_product_scoring(
            decoder_hidden_states=hidden, text_features=encoder.text_features, text_mask=prompt_mask
        ).squeeze(-1)
        masks = sam3.mask_decoder(
            decoder_queries=hidden[-1],
            backbone_features=list(fpn_features),
            encoder_hidden_states=encoder.last_hidden_state,
            prompt_features=prompt_features,
            prompt_mask=prompt_mask,
        )
        one_to_one, one_to_many = slice(0, num_queries), slice(num_queries, None)
        o2m = None
        if hidden.shape[2] > num_queries:
            o2m = OneToManyOutput(
                all_pred_logits=logits[:, :, one_to_many],
                all_pred_boxes=boxes_xyxy[:, :, one_to_many],
                all_pred_boxes_cxcywh=boxes_cxcywh[:, :, one_to_many],
                pred_masks=masks.pred_masks[:, one_to_many],
            )
        return MedSAM3Output(
            all_pred_logits=logits[:, :, one_to_one],
            all_pred_boxes=boxes_xyxy[:, :, one_to_one],
            all_pred_boxes_cxcywh=boxes_cxcywh[:, :, one_to_one],
            all_presence_logits=decoder.presence_logits,
            pred_masks=masks.pred_masks[:, one_to_one],
            semantic_seg=masks.semantic_seg,
            query_hidden_states=hidden[-1, :, one_to_one],
            one_to_many=o2m,
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write an HF folder (config.json, model.safetensors, tokenizer) that ``Sam3Model.from_pretrained`` reads, with
        :attr:`trained_preprocessing` (``medsam3_preprocessing.json``), which ``MedSAM3Net(folder)`` reads back."""
        return save_hf_folder(self.sam3, self.tokenizer, directory, getattr(self, "trained_preprocessing", None))


def load_network(source: str = "tiny", image_size: int | None = None,
                 device: str | torch.device | None = None, detector_chunk: int | None = None) -> MedSAM3Net:
    """``MedSAM3Net`` in eval mode: ``tiny`` at ``image_size`` (default 112), or a checkpoint (whose own size
    must equal ``image_size`` when given); ``detector_chunk``: find-queries per detector pass (None: the default,
    ``DETECTOR_CHUNK``). Raises CheckpointError / ValueError with what to do."""
    if image_size is not None:
        check_image_size(image_size)
    if detector_chunk is not None and int(detector_chunk) < 1:
        raise ValueError(f"detector chunk must be >= 1, got {detector_chunk}")
    network = MedSAM3Net(str(source), image_size=(image_size or 112) if str(source) == "tiny" else image_size)
    if detector_chunk is not None:
        network.detector_chunk = int(detector_chunk)
    network.eval()
    return network.to(device) if device is not None else network
