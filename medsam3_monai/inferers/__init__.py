"""Inference: slice-space segmentation of images and volumes and the way back to each input's geometry.

- :func:`predict_file` / :class:`Predictor`: a file (2D picture, NIfTI, DICOM series) with text prompts (and boxes)
  -> :class:`Prediction`, a label map in the input's own geometry (what ``medsam3 segment`` writes).
- :func:`segment_image` / :func:`segment_image_batch`: slice-space images -> per-prompt logits and scores under a
  protocol (``top_query``, ``threshold``, ``semantic``); :func:`invert_to_input` takes them back to the input.
- :func:`segment_volume`: a volume's slices through the detector, propagated by the tracker (:func:`track_prompts`).
- :class:`PromptInferer`, :class:`MergePromptsd`: the bundles' inferer and post-processing.
"""

from .bitmasks import BitMasks
from .volume import (
    VolumeSegmentation,
    detect_slices,
    merge_masks,
    segment_volume,
    select_seeds,
)
from .tracking import track_prompts
from .postprocess import ImageOrVolumed, MergePromptsd, RowsFirstPILWriter
from .inputs import inference_items
from .predict import Prediction, Predictor, PromptInferer, predict_file
from .image import ImageSegmentation, invert_to_input, segment_image
from .batch import compile_network, segment_image_batch

__all__ = [
    "BitMasks", "ImageOrVolumed", "ImageSegmentation", "MergePromptsd", "Prediction", "Predictor", "PromptInferer",
    "RowsFirstPILWriter", "VolumeSegmentation", "compile_network", "detect_slices", "inference_items",
    "invert_to_input", "merge_masks", "predict_file", "segment_image", "segment_image_batch", "segment_volume",
    "select_seeds", "track_prompts",
]
