"""MONAI dictionary transforms of the unified input formulation (image, mask, text) -> SAM3 slice space.

Every class takes keyword arguments only and is importable as ``medsam3_monai.transforms.<Name>`` so that
bundle JSON can build it (``{"_target_": "medsam3_monai.transforms.LoadMedicalImaged", ...}``).

Chain: :class:`LoadMedicalImaged` -> :class:`DecodeLabeld` -> :class:`ScaleIntensityByModalityd` ->
(:class:`RandAxialSliced` | :class:`AxialSlicesd` for volumes) -> :class:`LabelToInstancesd` ->
:class:`TiledResizeToSliced` (or :class:`ResizeToSliced`) -> :class:`Sam3Normalized` -> :class:`GreyToRGBd` ->
:class:`BuildTargetsd` -> :class:`RandNegativePromptsd`; predictions go back with MONAI ``Invertd`` and
:class:`RestackSlicesd`. Both bundles keep 2D pictures ``uint8`` at their own size and resize them tile by tile
(``LoadMedicalImaged(keep_uint8=True)``, ``ScaleIntensityByModalityd(defer_2d=True)``,
:class:`TiledResizeToSliced`; memory independent of the picture's size), with SAM3's own resize (its image
processor's: torchvision's anti-aliased bilinear resize of the 8-bit picture; ``kernel="monai"``: MONAI's ``Resize``).
"""

from .each_item import EachItem, transforms_of
from .errors import DataError
from .instances import LabelToInstancesd, instance_masks, instance_regions
from .intensity import (
    CT_WINDOWS,
    MODALITY_HANDLERS,
    GreyToRGBd,
    Sam3Normalized,
    ScaleIntensityByModalityd,
    ct_window,
    is_volume_slice,
    min_max,
    percentile_min_max,
    rgb_scale,
    sam3_levels,
    sam3_normalize,
    to_grey,
    unit_pixels,
)
from .io import Image2DReader, LoadMedicalImaged, load_medical_image
from .labels import INSTANCE_RULES, MASK_ENCODINGS, DecodeLabeld, OutlineFillWarning, parse_prompts, rule_for_label
from .pipelines import slice_space_transforms
from .slices import (
    AxialSlicesd,
    RandAxialSliced,
    RestackSlicesd,
    TiledResizeToSliced,
    axial_axis,
    extract_slice,
    foreground_slices,
    restack_slices,
    sample_slice_indices,
)
from .spatial import ResizeToSliced
from .targets import (
    BuildTargetsd,
    PromptTarget,
    RandBoxPromptsd,
    RandNegativePromptsd,
    empty_target,
    masks_to_boxes_cxcywh,
    resize_instances,
    resize_masks,
)

__all__ = [
    "CT_WINDOWS",
    "INSTANCE_RULES",
    "MASK_ENCODINGS",
    "MODALITY_HANDLERS",
    "AxialSlicesd",
    "BuildTargetsd",
    "DataError",
    "EachItem",
    "DecodeLabeld",
    "OutlineFillWarning",
    "GreyToRGBd",
    "Image2DReader",
    "LabelToInstancesd",
    "LoadMedicalImaged",
    "PromptTarget",
    "RandAxialSliced",
    "RandBoxPromptsd",
    "RandNegativePromptsd",
    "ResizeToSliced",
    "RestackSlicesd",
    "Sam3Normalized",
    "ScaleIntensityByModalityd",
    "TiledResizeToSliced",
    "axial_axis",
    "ct_window",
    "empty_target",
    "extract_slice",
    "foreground_slices",
    "instance_masks",
    "instance_regions",
    "is_volume_slice",
    "load_medical_image",
    "masks_to_boxes_cxcywh",
    "min_max",
    "parse_prompts",
    "percentile_min_max",
    "resize_instances",
    "resize_masks",
    "restack_slices",
    "rgb_scale",
    "rule_for_label",
    "sam3_levels",
    "sam3_normalize",
    "sample_slice_indices",
    "slice_space_transforms",
    "to_grey",
    "transforms_of",
    "unit_pixels",
]
