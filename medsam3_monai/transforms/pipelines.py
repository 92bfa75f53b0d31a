"""The bundle's transform chains from Python, for scripts and tests: ``configs/train.json`` (training and
validation) and ``configs/inference.json`` (no label) are the one place each chain is written.

load -> decode mask -> intensity by modality -> (3D: slices) -> instances -> resize to S x S -> SAM3 8-bit levels
-> grey to RGB -> targets per prompt (-> sampled negative prompts when training).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose

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
    pictures_only: bool = False,
    resize_kernel: str = "sam3",
) -> Compose:
    """A Compose from a datalist item to slice-space items (a list: one per 2D image or volume slice).

    ``train#preprocessing`` (``train=True``) or ``validate#preprocessing`` of ``configs/train.json`` with these
    settings; ``with_label=False`` gives the ``preprocessing`` of ``configs/inference.json`` (items without a
    mask: no label, instances or targets). ``resize_kernel``: the bundles' ``resize_kernel`` (``"sam3"``: SAM3's
    image processor's resize of the 8-bit picture; ``"monai"``: MONAI's ``Resize`` of the float intensities).

    Each output item: ``image`` ``(3, S, S)`` uint8, the 8-bit levels SAM3 sees (``Sam3Normalized(levels=True)``;
    the network makes its normalised input from them on its device, ``networks.network_pixels``; invertible with
    ``Invertd(orig_keys="image")``), ``label`` the native-resolution class map of the slice, ``targets`` one
    :class:`~medsam3_monai.transforms.targets.PromptTarget` per prompt. With ``with_label=False`` a grey volume's
    slices stay one channel, ``(1, S, S)`` (``GreyToRGBd(repeat_volume_slices=False)``), repeated to RGB a detector
    batch at a time on the device.
    """
    from ..bundle import config_parser

    if not with_label:
        parser = config_parser("inference.json", image_size=spatial_size, ct_window=ct_window,
                               resize_kernel=resize_kernel)
        return parser.get_parsed_content("preprocessing")
    parser = config_parser(
        "train.json", image_size=spatial_size, max_instances=max_instances, num_negatives=num_negatives,
        slices_per_volume=slices_per_volume, pos_fraction=pos_fraction, ct_window=ct_window, seed=seed,
        resize_kernel=resize_kernel,
    )
    parser["train#concepts"] = list(negative_concepts)
    if train and pictures_only:  # 2D pictures: deterministic up to the sampled negatives (what the cache holds)
        chain = parser.get_parsed_content("train#picture_preprocessing")
    else:
        chain = parser.get_parsed_content("train#preprocessing" if train else "validate#preprocessing")
    # MONAI's Compose reseeds its random transforms from the global seed (set_determinism) when it is built, which
    # replaces the transforms' own seed: a given seed is applied again to the chain itself
    return chain.set_random_state(seed=seed) if seed is not None else chain
