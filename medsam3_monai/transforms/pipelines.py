"""The standard chain, for scripts and tests; bundles spell the same list out in JSON.

load -> decode mask -> intensity by modality -> (3D: slices) -> instances -> grey to RGB -> resize to S x S
-> SAM3 normalisation -> targets per prompt (-> sampled negative prompts when training).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose

from .instances import LabelToInstancesd
from .intensity import GreyToRGBd, Sam3Normalized, ScaleIntensityByModalityd
from .io import LoadMedicalImaged
from .labels import DecodeLabeld
from .slices import AxialSlicesd, RandAxialSliced
from .spatial import ResizeToSliced
from .targets import BuildTargetsd, RandNegativePromptsd

__all__ = ["slice_space_transforms"]


def slice_space_transforms(
    spatial_size: int = 1008,
    train: bool = False,
    max_instances: int | None = 100,
    negative_concepts: Sequence[str] = (),
    num_negatives: int = 1,
    slices_per_volume: int = 1,
    pos_fraction: float = 0.8,
    ct_window: str | Sequence[float] = "abdomen",
    with_label: bool = True,
    seed: int | None = None,
) -> Compose:
    """A Compose from a datalist item to slice-space items (a list: one per 2D image or volume slice).

    Each output item: ``image`` ``(3, S, S)`` float32 normalised for SAM3 (invertible with
    ``Invertd(orig_keys="image")``), ``label`` the native-resolution class map of the slice, ``targets`` one
    :class:`~medsam3_monai.transforms.targets.PromptTarget` per prompt. ``with_label=False`` builds the
    inference chain for items without a mask (no label, instances or targets).
    """
    keys = ("image", "label") if with_label else ("image",)
    chain = [LoadMedicalImaged(keys=keys, label_keys=("label",), allow_missing_keys=not with_label)]
    if with_label:
        chain.append(DecodeLabeld(keys="label"))
    chain.append(ScaleIntensityByModalityd(keys="image", ct_window=ct_window))
    slice_keys = ("image", "label", "instance_ids")
    if train:
        chain.append(RandAxialSliced(keys=slice_keys, num_samples=slices_per_volume, pos_fraction=pos_fraction,
                                     seed=seed))
    else:
        chain.append(AxialSlicesd(keys=slice_keys))
    if with_label:
        chain.append(LabelToInstancesd(keys="label", max_instances=max_instances))
    chain += [GreyToRGBd(keys="image"), ResizeToSliced(keys="image", spatial_size=spatial_size),
              Sam3Normalized(keys="image")]
    if with_label:
        chain.append(BuildTargetsd())
        if train and negative_concepts:
            chain.append(RandNegativePromptsd(concepts=negative_concepts, num_negatives=num_negatives, seed=seed))
    return Compose(chain)
