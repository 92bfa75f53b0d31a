"""Split a class map into instance masks per prompt, by the dataset's instance rule, at native resolution.

Rules (per label value ``v`` of ``prompts``):

* ``semantic``: the whole mask ``label == v`` is one instance (vessels, lungs, organs);
* ``components``: each connected component of ``label == v`` is one instance (8-connectivity in 2D,
  26 in 3D);
* ``instance_ids``: each distinct nonzero id of the instance-id map inside ``label == v`` is one instance
  (GBM40 ``NN_instances.png``); an id split in pieces stays one instance, as annotated.

Instances are sorted largest first and capped at ``max_instances`` per prompt (the largest are kept). They are
kept as bounding-box crops (:class:`~medsam3_monai.instance_masks.InstanceMasks`), found in one labelling pass
and one bounding-box pass over the class map: no full-size mask is made per instance.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from ..distinct import distinct_values
from ..instance_masks import InstanceMasks
from .errors import DataError, source_name
from .labels import parse_prompts, rule_for_label

__all__ = ["LabelToInstancesd", "instance_masks", "instance_regions"]

#: instance ids up to max(the crop's pixel count, this) number the instances as they are (find_objects keeps one
#: entry per id value up to the largest); larger ids are relabelled 1..K first
DIRECT_ID_SPAN = 1 << 16


def instance_regions(
    classes: np.ndarray,
    label: int,
    rule: str,
    instance_ids: np.ndarray | None = None,
    max_instances: int | None = None,
    min_area: int = 0,
) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """Instance masks of one label value as bounding-box crops, largest first.

    One labelling pass and one bounding-box pass (``ndimage.find_objects``) over the class map; no
    full-size mask is made per instance.

    Args:
        classes: ``(*spatial)`` integer class map.
        label: the label value.
        rule: ``semantic``, ``components`` or ``instance_ids``.
        instance_ids: ``(*spatial)`` ids, required by ``instance_ids``.
        max_instances: keep at most this many (the largest); None keeps all.
        min_area: drop instances with fewer pixels.

    Returns:
        ``[(box, crop), ...]``: ``box`` the instance's bounding box (a tuple of slices of ``classes``), ``crop``
        the bool mask ``classes[box]``-shaped (tight: every border row and column holds the instance).
    """
    if rule not in ("semantic", "components", "instance_ids"):
        raise ValueError(f"unknown instance rule {rule!r}")
    if rule == "instance_ids" and instance_ids is None:
        raise ValueError("rule 'instance_ids' needs an instance-id map (mask_encoding 'instance_map')")
    binary = classes == label
    box = _bounding_box(binary)
    if box is None:
        return []
    # every rule works inside the mask's bounding box: labelling and the id passes skip the empty margins
    binary = binary[box]
    if rule == "semantic":  # the whole mask is the instance
        return _single_instance(box, binary, max_instances, min_area)
    if rule == "components":  # ndimage.label numbers the components 1..K already
        compact, count = ndimage.label(binary, structure=np.ones((3,) * binary.ndim, dtype=bool))
        if count == 1:  # one polyp, one organ: the mask itself
            return _single_instance(box, binary, max_instances, min_area)
    else:
        ids = np.where(binary, instance_ids[box], 0)
        direct = ids.dtype.kind in "iu" and ids.dtype != np.uint64  # (bincount takes no uint64)
        if not direct or int(ids.min()) < 0 or int(ids.max()) > max(ids.size, DIRECT_ID_SPAN):
            # large, sparse or negative ids: relabelled 1..K first
            id_values = distinct_values(ids)
            id_values = id_values[id_values != 0]
            if id_values.size == 0:
                return []
            lookup = np.zeros(int(ids.max()) + 1, dtype=np.int32)
            lookup[id_values] = np.arange(1, id_values.size + 1, dtype=np.int32)
            ids = lookup[ids]
        # the ids themselves number the instances (an id map's ids are small): one count gives ids and areas
        areas = np.bincount(ids.ravel())
        labels = np.flatnonzero(areas[1:]) + 1
        return _largest(box, ids, labels, areas[labels], max_instances, min_area)
    labels = np.arange(1, count + 1)
    return _largest(box, compact, labels, np.bincount(compact.ravel(), minlength=count + 1)[1:], max_instances,
                    min_area)


def _largest(box: tuple[slice, ...], numbered: np.ndarray, labels: np.ndarray, areas: np.ndarray,
             max_instances: int | None, min_area: int) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """The instances ``labels`` (ascending) of ``numbered`` (a map of the crop ``box``), ``areas`` pixels each,
    largest first (ties in label order), without those under ``min_area``, at most ``max_instances``."""
    if labels.size == 0:
        return []
    order = np.argsort(-areas, kind="stable")
    order = order[areas[order] >= max(min_area, 1)]
    if max_instances is not None:
        order = order[:max_instances]
    boxes = ndimage.find_objects(numbered, max_label=int(labels[-1]))
    return [(_shifted(boxes[labels[i] - 1], box), numbered[boxes[labels[i] - 1]] == labels[i]) for i in order]


def _bounding_box(binary: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of a ``(*spatial)`` bool mask from one ``any`` per axis (what ``ndimage.find_objects``
    gives for one label), or None when the mask is empty."""
    box = []
    for axis in range(binary.ndim):
        present = np.flatnonzero(binary.any(axis=tuple(a for a in range(binary.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _shifted(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """A box found inside the crop ``outer`` as a box of the whole map."""
    return tuple(slice(o.start + i.start, o.start + i.stop) for i, o in zip(inner, outer))


def _single_instance(box: tuple[slice, ...], crop: np.ndarray, max_instances: int | None,
                     min_area: int) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """:func:`instance_regions` of a mask that is one instance: its bounding ``box`` and the mask inside it
    (``crop``, ``(*box)`` bool), without labelling."""
    kept = max_instances is None or max_instances > 0
    return [(box, crop.copy())] if kept and np.count_nonzero(crop) >= max(min_area, 1) else []


def instance_masks(classes: np.ndarray, *args: Any, **kwargs: Any) -> list[np.ndarray]:
    """:func:`instance_regions` (same arguments) as full-size ``(*spatial)`` bool arrays, largest first."""
    masks = []
    for box, crop in instance_regions(classes, *args, **kwargs):
        mask = np.zeros(classes.shape, dtype=bool)
        mask[box] = crop
        masks.append(mask)
    return masks


class LabelToInstancesd(MapTransform):
    """Class map (+ instance ids) of a 2D image or slice -> its instance masks and the label value of each.

    Args:
        keys: the class-map key (``(1, H, W)``, from :class:`DecodeLabeld`; volumes are sliced first).
        prompts_key: item key with ``{label value: text}``; only these labels give instances.
        instance_rule: fixed rule or per-label mapping; None reads ``rule_key`` from the item, and a missing
            rule means ``components``.
        rule_key: item key with the rule.
        instance_key: item key with the instance-id map (``instance_map`` datasets).
        output_key: where the masks go: ``(N, H, W)`` bool
            :class:`~medsam3_monai.instance_masks.InstanceMasks` (bounding-box crops; ``.to_dense()`` for the
            tensor).
        labels_key: where the label values go: int64 tensor ``(N,)``.
        max_instances: cap per prompt (largest kept); None or 0 disables the cap.
        min_area: instances with fewer pixels are dropped (e.g. JPEG speckle); 0 keeps every pixel.
    """

    def __init__(
        self,
        keys: str = "label",
        prompts_key: str = "prompts",
        instance_rule: str | Mapping[str, str] | None = None,
        rule_key: str = "instance_rule",
        instance_key: str = "instance_ids",
        output_key: str = "instances",
        labels_key: str = "instance_labels",
        max_instances: int | None = 100,
        min_area: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prompts_key = prompts_key
        self.instance_rule = instance_rule
        self.rule_key = rule_key
        self.instance_key = instance_key
        self.output_key = output_key
        self.labels_key = labels_key
        self.max_instances = max_instances or None
        self.min_area = int(min_area)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            path = source_name(label, d, key)
            prompts = parse_prompts(d.get(self.prompts_key), path)
            rule = self.instance_rule if self.instance_rule is not None else d.get(self.rule_key)
            classes = _numpy(label)[0]
            if classes.ndim != 2:
                raise DataError(path, f"instances are made per 2D slice, got a class map of shape {tuple(label.shape)}",
                                "slice volumes first (AxialSlicesd / RandAxialSliced)")
            ids = d.get(self.instance_key)
            ids = _numpy(ids)[0] if ids is not None else None
            crops: list[torch.Tensor] = []
            offsets: list[tuple[int, int]] = []
            values: list[int] = []
            for value in prompts:
                value_rule = rule_for_label(rule, value)
                if value_rule == "instance_ids" and ids is None:
                    raise DataError(path, f"instance rule 'instance_ids' for label {value} but the mask is not an "
                                          "instance-id map", "set mask_encoding 'instance_map' or use 'components'")
                found = instance_regions(classes, value, value_rule, ids, self.max_instances, self.min_area)
                crops.extend(torch.from_numpy(crop) for _, crop in found)
                offsets.extend((box[0].start, box[1].start) for box, _ in found)
                values.extend([value] * len(found))
            d[self.output_key] = InstanceMasks(classes.shape, crops, torch.tensor(offsets, dtype=torch.long))
            d[self.labels_key] = torch.tensor(values, dtype=torch.long)
        return d


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
