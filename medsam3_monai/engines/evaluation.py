"""Evaluation over a datalist: per case and prompt metrics in the input's own geometry, as an Ignite engine.

Pipeline: the bundle's ``evaluate.json``, an overlay of ``inference.json``; :func:`run_evaluation` (and so
``medsam3 evaluate`` and the demo) parses and runs those two configs with overrides. Its pieces:

1. :func:`~medsam3_monai.data.selection.evaluation_items`: the cases of each datalist's evaluation split (default ``auto``: ``test`` when
   the datalist has test cases, else ``validation``; several shared folders have no test split), each tagged
   with its ``group`` (``internal`` / ``external``, from the catalogue).
2. :func:`evaluation_transforms`, the ``preprocessing`` of ``configs/inference.json``: load -> decode label ->
   intensity by modality -> axial slices (the image only: the label stays the whole native mask) -> grey to
   RGB -> resize to S x S -> SAM3 normalisation.
3. :class:`CaseInferer` (a MONAI ``Inferer``): the case pipeline of ``medsam3 segment`` and
   ``configs/inference.json`` -- :class:`~medsam3_monai.inferers.predict.PromptInferer` (2D:
   ``segment_image``, one ViT pass for all its class prompts; volumes: ``segment_volume``, detector on every
   slice and tracker propagation) then that bundle's post-processing (``Invertd`` back to the input's geometry,
   merge by pixel-wise maximum confidence) -- with the ground truth's boxes added for the T+I protocol.
4. :class:`~.inference.MedSAM3CaseEvaluator` (a ``SupervisedEvaluator``, the inference bundle's engine too):
   one iteration per case; :class:`CaseMetrics` turns each into the :class:`CasePrediction` and one metric
   record per prompt (Dice, IoU; NSD and HD95 when the spacing is
   known: volumes, and 2D items that carry ``"spacing"`` in mm as ``[rows, cols]``).
5. Handlers (:mod:`.reports`): overlays for a sample of cases, then ``cases.csv``, ``table.md``/``.csv``,
   ``radar.png`` and an MLflow run.

Two other case inferers replace :class:`CaseInferer` in the same bundle (``run_evaluation(inferer=...)``):
:class:`EnsembleCaseInferer` (every phrasing of each class in one batch, fused by confidence as the offline agent
planner fuses them: ``medsam3 evaluate --prompt-variants synonyms``) and :class:`AgentCaseInferer` (the MedSAM3
agent answers a request per class: ``medsam3 evaluate --agent``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from ..boxes import cxcywh_to_xyxy
from ..data.selection import SPLIT_CHOICES, evaluation_items, is_volume_item
from ..inferers.image import ground_truth_boxes
from ..inferers.inputs import item_prompts
from ..inferers.predict import PromptInferer
from ..inferers.tracking import TRACKER_BATCH
from ..metrics.segmentation import DEFAULT_NSD_TOLERANCE_MM, label_map_metrics
from ..protocol_registry import get_protocol
from ..tensors import voxel_spacing
from ..transforms.intensity import is_volume_slice
from .inference import MedSAM3CaseEvaluator, collate_cases

__all__ = [
    "SPLIT_CHOICES",
    "AgentCaseInferer",
    "AgentRecorder",
    "CaseInferer",
    "EnsembleCaseInferer",
    "CasePrediction",
    "CaseMetrics",
    "MedSAM3CaseEvaluator",
    "case_records",
    "collate_cases",
    "evaluation_items",
    "evaluation_transforms",
    "is_volume_item",
    "agent_evaluation",
    "agent_request",
    "protocol_label",
    "report_notes",
    "run_evaluation",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data
def evaluation_transforms(image_size: int = 1008, ct_window: str | Sequence[float] = "abdomen"):
    """The evaluation preprocessing, the ``preprocessing`` of ``configs/inference.json`` (``evaluate.json`` is an
    overlay of it; the label, when the item has one, is loaded and decoded): a datalist item -> the list of its
    slice-space items.

    Each output item: ``image`` (3, S, S) uint8 8-bit levels (``Sam3Normalized(levels=True)``; (1, S, S) for a
    grey volume's slices) with the resize recorded for ``Invertd``; ``label``
    the whole native class map ((1, H, W), or (1, X, Y, Z) shared by every slice item of a volume).
    """
    from ..transforms.pipelines import slice_space_transforms

    return slice_space_transforms(image_size, ct_window=ct_window, with_label=False)


#: the detector protocol of the volume path (top query on each slice, then the tracker), whatever the 2D one
VOLUME_PROTOCOL = "top_query"


def volume_threshold(score_threshold: float, volume_score_threshold: float | None = None) -> float:
    """The volumes' detection threshold of an evaluation: ``volume_score_threshold``, else ``score_threshold``."""
    return float(score_threshold if volume_score_threshold is None else volume_score_threshold)


def volume_threshold_param(score_threshold: float, volume_score_threshold: float | None,
                           items: Sequence[Mapping[str, Any]], option: str = "--volume_score_threshold"
                           ) -> float | None:
    """The volumes' detection threshold as an evaluation's parameter: None (not logged) when ``items`` hold no
    volume, where a ``volume_score_threshold`` given (the setting ``option``) is refused: it would change nothing."""
    check_volume_score_threshold(volume_score_threshold, items, option)
    return volume_threshold(score_threshold, volume_score_threshold) if any(map(is_volume_item, items)) else None


def check_volume_score_threshold(volume_score_threshold: float | None, items: Sequence[Mapping[str, Any]],
                                 option: str = "--volume_score_threshold") -> None:
    """Refuse a ``volume_score_threshold`` (the setting ``option``) given to a run whose ``items`` hold no volume:
    it would change nothing."""
    if volume_score_threshold is not None and not any(map(is_volume_item, items)):
        raise ValueError(f"{option} is the volumes' detection threshold, and this run has no volume: leave it out")


def protocol_label(protocol: str, box_prompts: bool = False) -> str:
    """The name a number is reported under: the protocol, ``+box`` for the T+I (text + box) variant."""
    return get_protocol(protocol).name + ("+box" if box_prompts else "")


def report_notes(checkpoint: str, protocol: str, score_threshold: float, box_prompts: bool,
                 items: Sequence[dict[str, Any]], tracker: str = "none", split: str = "auto",
                 volume_score_threshold: float | None = None) -> list[str]:
    """How the numbers were produced: the lines under the report's Markdown table (``volume_score_threshold``: the
    volumes' detection threshold, None: ``score_threshold``)."""
    splits = sorted({f"{Path(str(i.get('datalist', '?'))).name}: {i.get('split', '?')}" for i in items})
    described = get_protocol(protocol).describe(score_threshold)
    volumes = sum(is_volume_item(i) for i in items)
    pictures = " of the 2D cases" if 0 < volumes < len(items) else ""
    notes = [
        f"Checkpoint `{checkpoint}`; protocol{pictures} `{protocol_label(protocol, box_prompts)}`: {described}"
        + ("; text + box prompt (largest ground-truth component)." if box_prompts else "; text prompts."),
        f"Cases: {len(items)} ({'; '.join(splits)}); split `{split}`"
        + (" = test if present, else validation" if split == "auto" else "")
        + "; the table's n counts (case, prompt) rows: each class of a case is one.",
        "Each class is prompted separately; overlaps go to the class with the higher confidence "
        "score × sigmoid(mask logit) at the pixel. Metrics in each input's own geometry; Dice = IoU = NSD = 100 "
        "when prediction and truth are both empty. NSD (2 mm) and HD95 (MONAI's: bundles/medsam3/docs/conventions.md) "
        "only where the spacing is known; HD95 is "
        "undefined (–, left out of means) where the prediction or the truth is empty, and a group's NSD and HD95 "
        "average only its datasets that have them.",
    ]
    if volumes:
        notes.append(f"Volumes ({volumes}, protocol `{protocol_label(VOLUME_PROTOCOL)}`): detector on every slice "
                     f"(top query, score >= {volume_threshold(score_threshold, volume_score_threshold)}) merged "
                     f"with tracker propagation from the most confident slice (tracker: {tracker})"
                     + ("; box prompts are not used for volumes." if box_prompts else "."))
    channels: dict[str, set[int]] = {}
    for i in items:  # 4D images (MSD BrainTumour, Prostate): the channel each item segmented
        if i.get("channel") is not None:
            channels.setdefault(str(i.get("dataset") or "?"), set()).add(int(i["channel"]))
    if channels:
        notes.append("4D images: channel " + "; ".join(
            f"{name}: {', '.join(map(str, sorted(values)))}" for name, values in sorted(channels.items()))
            + " (the datalist items' 'channel', 0-based).")
    return notes


# ------------------------------------------------------------------------------------------------ inference
def label_map_of(masks: Sequence[torch.Tensor], values: Sequence[int], order: Sequence[int] | None = None
                 ) -> torch.Tensor:
    """Per-prompt bool masks (each ``(*spatial)``) -> one int32 label map: mask ``c`` written as ``values[c]``, in
    ``order`` (default: prompt order); where masks overlap, the one written last wins."""
    label_map = torch.zeros(masks[0].shape, dtype=torch.int32)
    for c in range(len(masks)) if order is None else order:
        label_map[torch.as_tensor(masks[c]).bool()] = int(values[c])
    return label_map


def highest_score_last(scores: Sequence[float]) -> list[int]:
    """The order to write P overlapping masks in (:func:`label_map_of`) so that each pixel goes to its highest
    score, the earlier prompt on a tie: ascending score, later prompts first among equals."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], -i))


def _merged_case(case: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A post-processed case -> its label map (on the host, where the metrics are counted), the prompts' scores
    (P,) float32 and the volume path's seed slices (None in 2D)."""
    seeds = case.get("seed_slices")
    return (convert_to_tensor(case["pred"], track_meta=False)[0].cpu(),
            torch.as_tensor(case["prompt_scores"]).float().cpu(), None if seeds is None else torch.as_tensor(seeds))


@dataclass
class CasePrediction:
    """One case's prediction in the input's own geometry.

    Attributes:
        items: the slice-space items of the case (one for a 2D image, D for a volume).
        values, prompts: the class label values and their prompt texts, in prompt order.
        pred: the merged prediction as a label map, (H, W) or (X, Y, Z) of an integer dtype (uint8 when every
            label value fits, else int32; label values, 0 background): one array whatever the number of prompts.
        truth: the native class map (H, W) or (X, Y, Z), or None for an unlabelled item.
        scores: (P,) per prompt: the protocol's score (2D) or the best slice score (volume).
        spacing: per-axis spacing in mm (array axis order) or None when unknown.
        seed_slices: for volumes, the slice each prompt's tracking started from.
        boxes: T+I (2D): per prompt, the box prompt given ``[x1, y1, x2, y2]`` in the input's pixels, or None.
    """

    items: list[dict[str, Any]]
    values: list[int]
    prompts: list[str]
    pred: torch.Tensor
    truth: torch.Tensor | None
    scores: torch.Tensor
    spacing: tuple[float, ...] | None
    is_volume: bool = False
    seed_slices: torch.Tensor | None = None
    boxes: list[list[float] | None] | None = None

    @property
    def masks(self) -> torch.Tensor:
        """(P, *spatial) bool, each prompt's mask (disjoint): P times the label map's size, for small cases and
        tests (the metrics read the label map)."""
        values = torch.tensor(self.values, dtype=self.pred.dtype).reshape(-1, *([1] * self.pred.ndim))
        return self.pred[None] == values

    @property
    def dataset(self) -> str:
        return str(self.items[0].get("dataset", ""))

    @property
    def case(self) -> str:
        item = self.items[0]
        if item.get("case") is not None:
            return str(item["case"])
        return Path(str(item.get("image", "case"))).name


def _spacing(item: dict[str, Any], truth: Any, is_volume: bool) -> tuple[float, ...] | None:
    if not is_volume:
        spacing = item.get("spacing")
        if spacing is None:
            return None
        values = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
        if len(values) != 2 or min(values) <= 0:
            raise ValueError(f"case {item.get('case')}: 'spacing' must be two positive mm values (rows, cols)")
        return values
    affine = getattr(truth, "affine", None)
    if affine is None:
        return None
    return tuple(float(v) for v in voxel_spacing(affine))


class CaseInferer(Inferer):
    """A case's slice items + the network -> :class:`CasePrediction` in the input's geometry.

    The case goes through the same pipeline as ``medsam3 segment`` and ``configs/inference.json``:
    :class:`~medsam3_monai.inferers.predict.PromptInferer` (2D protocol or the volume path), then the bundle's
    post-processing (``Invertd`` per slice, restack, merge by maximum confidence); the merged label map is split
    back into one (disjoint) mask per prompt for the metrics.

    Args:
        transform: the preprocessing that made the items (its ``ResizeToSliced`` record is inverted).
        protocol: 2D protocol (``protocol_registry``).
        score_threshold: the query score threshold of the ``threshold`` and ``top_query_floor`` protocols, and
            the detection threshold of the volume path unless ``volume_score_threshold`` gives that.
        volume_score_threshold: the volume path's detection threshold (None: ``score_threshold``).
        box_prompts: add the ground truth's largest-component box to each prompt (T+I protocol, 2D only).
        tracker: the SAM3 tracker for volumes (``networks.tracker.build_tracker``); None = detector only.
        volume_batch_size: slices per detector call in the volume path.
        tracker_batch: a volume's prompts propagated together by the tracker (``inferers.tracking``).
    """

    #: whether :meth:`infer_cases` puts a batch's 2D images in one forward (False: one case at a time)
    batches_cases = True

    def __init__(
        self,
        transform: Any,
        protocol: str = "top_query",
        score_threshold: float = 0.5,
        box_prompts: bool = False,
        tracker: Any = None,
        volume_batch_size: int = 8,
        image_key: str = "image",
        label_key: str = "label",
        tracker_batch: int = TRACKER_BATCH,
        volume_score_threshold: float | None = None,
        progress: bool = False,
    ) -> None:
        from ..bundle import inference_postprocessing
        from ..protocol_registry import checked_score_threshold

        super().__init__()
        # progress: a volume's detector and tracker bars (a CT case takes minutes; the engine's bar moves per case)
        self.cases = PromptInferer(protocol, score_threshold, tracker=tracker, volume_batch_size=volume_batch_size,
                                   image_key=image_key, tracker_batch=tracker_batch, progress=bool(progress))
        self.postprocessing = inference_postprocessing(transform)
        self.box_prompts = bool(box_prompts)
        self.image_key, self.label_key = image_key, label_key
        self.volume_score_threshold = (None if volume_score_threshold is None else
                                       checked_score_threshold(volume_score_threshold, "volume_score_threshold"))
        self._warned_boxes = False

    @property
    def protocol(self) -> str:
        return self.cases.protocol

    @property
    def label(self) -> str:
        """The name the 2D cases' numbers are reported under (:func:`protocol_label`)."""
        return protocol_label(self.protocol, self.box_prompts)

    @property
    def volume_label(self) -> str:
        """The name the volumes' numbers are reported under: the volume path's (the detector's top query on each
        slice and the tracker), whatever the 2D protocol and box prompts."""
        return protocol_label(VOLUME_PROTOCOL)

    def _case_items(self, inputs: Sequence[dict[str, Any]] | dict[str, Any]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(items, case_items)``: the case's slice items, and copies of them for the inferer (with the ground-truth
        boxes when ``box_prompts``)."""
        items = [inputs] if isinstance(inputs, dict) else list(inputs)
        case_items = [dict(item) for item in items]
        if self.volume_score_threshold is not None and is_volume_slice(items[0][self.image_key]):
            case_items[0]["score_threshold"] = self.volume_score_threshold  # PromptInferer reads the first item's
        if self.box_prompts:
            first = items[0]
            image, truth = first[self.image_key], first.get(self.label_key)
            self._add_ground_truth_boxes(case_items[0], truth, is_volume_slice(image))
        return items, case_items

    def __call__(self, inputs: Sequence[dict[str, Any]], network: torch.nn.Module, *args: Any, **kwargs: Any
                 ) -> CasePrediction:
        items, case_items = self._case_items(inputs)
        return self._case_prediction(items, self.postprocessing(self.cases(case_items, network)),
                                     case_items[0].get("box"))

    def infer_cases(self, cases: Sequence[Any], network: torch.nn.Module) -> list[CasePrediction]:
        """The engine's batched entry, a loader batch of cases: the 2D ones through the network together, several
        images per forward (:meth:`~medsam3_monai.inferers.predict.PromptInferer.infer_cases`, what ``medsam3
        segment`` runs), volumes one at a time; each then post-processed and scored as :meth:`__call__` does."""
        if not self.batches_cases:
            return [self(case, network) for case in cases]
        prepared = [self._case_items(case) for case in cases]
        outputs = self.cases.infer_cases([case_items for _, case_items in prepared], network)
        return [self._case_prediction(items, self.postprocessing(output), case_items[0].get("box"))
                for (items, case_items), output in zip(prepared, outputs)]

    def _case_prediction(self, items: list[dict[str, Any]], case: Mapping[str, Any],
                         boxes: list[list[float] | None] | None = None) -> CasePrediction:
        """A post-processed case (its label map in the input's geometry) -> :class:`CasePrediction` (``boxes``:
        the box prompts it was given)."""
        label_map, scores, seeds = _merged_case(case)
        return self._prediction(items, [int(v) for v in case["prompt_values"]], list(case["prompt_texts"]),
                                label_map, scores, seeds, boxes)

    def _prediction(self, items: list[dict[str, Any]], values: list[int], prompts: list[str],
                    label_map: torch.Tensor, scores: torch.Tensor, seeds: torch.Tensor | None = None,
                    boxes: list[list[float] | None] | None = None) -> CasePrediction:
        """The :class:`CasePrediction` of a case's merged label map (in the input's geometry), the truth checked
        against its shape (``boxes``: the class box prompts it was given)."""
        first = items[0]
        image, truth = first[self.image_key], first.get(self.label_key)
        is_volume = is_volume_slice(image)
        truth_map = None
        if truth is not None:
            truth_map = convert_to_tensor(truth, track_meta=False)[0]
            if tuple(truth_map.shape) != tuple(label_map.shape):
                raise RuntimeError(f"prediction {tuple(label_map.shape)} and label {tuple(truth_map.shape)} differ in "
                                   f"shape for case {first.get('case')}: the inversion did not restore the geometry")
        if label_map.is_floating_point() or label_map.dtype == torch.bool:
            label_map = label_map.to(torch.int32)
        return CasePrediction(items, values, prompts, label_map, truth_map, scores,
                              _spacing(first, truth, is_volume), is_volume, seeds, boxes)

    def _add_ground_truth_boxes(self, item: dict[str, Any], truth: Any, is_volume: bool) -> None:
        """T+I: the pixel box of the largest component of each prompt's class (2D; volumes stay text-only)."""
        if is_volume:
            if not self._warned_boxes:
                logger.warning("box prompts apply to 2D images only; volumes are evaluated with text prompts")
                self._warned_boxes = True
            return
        if truth is None:
            raise ValueError(f"case {item.get('case')}: box prompts need the ground-truth label")
        values, _ = item_prompts(item)
        boxes, labels = ground_truth_boxes(truth, values)
        height, width = truth.shape[-2:]
        xyxy = cxcywh_to_xyxy(boxes[:, 0]) * torch.tensor([width, height, width, height])
        item["box"] = [box.tolist() if label == 1 else None for box, label in zip(xyxy, labels[:, 0])]


class EnsembleCaseInferer(CaseInferer):
    """:class:`CaseInferer` with every phrasing of each class at once, fused by confidence: the offline agent
    planner's fusion (:func:`medsam3_monai.agent.fusion.fuse_by_confidence`) inside the evaluation pipeline.

    An item's ``prompt_variants`` (``{"<label value>": [phrasing, ...]}``; a class without an entry keeps its own
    prompt) lists each class's phrasings. All phrasings of all classes go through the case pipeline together (one
    ``PromptInferer`` call: on a 2D image one ViT pass, the vision encoder running once; on a volume the detector
    sees each slice once for all of them). A class keeps its phrasings scoring at least ``keep_ratio`` x the best
    score of its phrasings (and at least ``min_score``); the others are silenced before the merge (they claim no
    pixel), and the kept ones of every class are merged by confidence, score x sigmoid(mask logit), as several
    prompts always are. A class's mask is then the union of its kept phrasings' pixels (where two classes claim a
    pixel, the more confident phrasing's class has it); its score is its best kept phrasing's. The records keep
    the class's own prompt (the canonical phrasing).

    Args:
        keep_ratio, min_score: the fusion's (``medsam3 agent --keep-ratio / --min-score``; 0.5 and 0).
        variants_key: the item key holding the phrasings.
        The other arguments are :class:`CaseInferer`'s.
    """

    batches_cases = False  # a case's phrasings already share one network call

    def __init__(self, transform: Any, protocol: str = "top_query", score_threshold: float = 0.5,
                 box_prompts: bool = False, tracker: Any = None, keep_ratio: float = 0.5, min_score: float = 0.0,
                 variants_key: str = "prompt_variants", **kwargs: Any) -> None:
        super().__init__(transform, protocol, score_threshold, box_prompts, tracker, **kwargs)
        for name, value in (("keep_ratio", keep_ratio), ("min_score", min_score)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.keep_ratio, self.min_score = float(keep_ratio), float(min_score)
        self.variants_key = variants_key

    def __call__(self, inputs: Sequence[dict[str, Any]], network: torch.nn.Module, *args: Any, **kwargs: Any
                 ) -> CasePrediction:
        from types import SimpleNamespace

        from ..agent.fusion import fuse_by_confidence, silence_phrasings

        items, case_items = self._case_items(inputs)
        values, texts = item_prompts(items[0])
        variants = items[0].get(self.variants_key) or {}
        phrasings = [[str(p) for p in (variants.get(str(v)) or [t])] for v, t in zip(values, texts)]
        owners = [c for c, group in enumerate(phrasings) for _ in group]
        flat = [text for group in phrasings for text in group]
        boxes = case_items[0].get("box")  # one per class (T+I)
        if self.box_prompts and boxes is not None:  # a class's box for each of its phrasings
            case_items[0]["box"] = [boxes[c] for c in owners]
        for item in case_items:
            item["prompts"] = {str(k + 1): text for k, text in enumerate(flat)}
            item.pop(self.variants_key, None)
        outputs = self.cases(case_items, network)
        # the phrasings a class does not keep claim no pixel in the merge: neither their own nor a kept one's
        silence_phrasings(outputs, owners, self.keep_ratio, self.min_score)
        label_map, scores, seeds = _merged_case(self.postprocessing(outputs))
        scores = scores.tolist()
        masks, class_scores, class_seeds = [], [], []
        for c in range(len(values)):
            ks = [k for k, owner in enumerate(owners) if owner == c]
            fusion = fuse_by_confidence(SimpleNamespace(label_map=label_map, scores=[scores[k] for k in ks],
                                                        prompts=[flat[k] for k in ks],
                                                        label_values=[k + 1 for k in ks]),
                                        self.keep_ratio, self.min_score)
            masks.append(torch.as_tensor(fusion.mask))
            class_scores.append(fusion.score)
            if seeds is not None:
                lead = flat.index(fusion.kept[0], ks[0]) if fusion.kept else ks[0]
                class_seeds.append(int(seeds[lead]))
        return self._prediction(items, [int(v) for v in values], list(texts), label_map_of(masks, values),
                                torch.tensor(class_scores, dtype=torch.float32),
                                torch.tensor(class_seeds) if seeds is not None else None, boxes)


#: the clinical sentence an agent evaluation asks for each class ({concept}, {image}, {modality}, {dataset})
DEFAULT_AGENT_REQUEST = "Segment the {concept} in this {image}."
#: how a request names the picture of each modality (``{image}``)
MODALITY_IMAGES = {"ct": "CT scan", "mri": "MRI scan", "x-ray": "X-ray", "ultrasound": "ultrasound image",
                   "endoscopy": "endoscopy image", "fundus": "fundus photograph", "oct": "OCT scan",
                   "dermoscopy": "dermoscopy image", "pathology": "histopathology image",
                   "microscopy": "microscopy image", "em": "electron microscopy image"}


def agent_request(concept: str, modality: str | None = None, dataset: str | None = None,
                  template: str = DEFAULT_AGENT_REQUEST) -> str:
    """The request an agent evaluation sends for a class: ``template`` with ``{concept}`` (the class prompt),
    ``{image}`` (e.g. "ultrasound image", from the modality), ``{modality}`` and ``{dataset}`` filled in."""
    if "{concept}" not in template:
        raise ValueError(f"--agent-request {template!r} must contain {{concept}} (and may use {{image}}, {{modality}}, "
                         "{dataset})")
    image = MODALITY_IMAGES.get(str(modality or "").strip().lower(), "image")
    try:
        text = template.format(concept=concept, image=image, modality=modality or "", dataset=dataset or "")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"--agent-request {template!r}: {err!r}; the placeholders are {{concept}}, {{image}}, "
                         "{modality} and {dataset}") from None
    return " ".join(text.split())


def agent_evaluation(items: Sequence[dict[str, Any]], agent: Any, recorder: AgentRecorder,
                     request_template: str = DEFAULT_AGENT_REQUEST) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What ``run_evaluation`` needs to evaluate the agent: the ``items`` with their file kept as ``source_image``
    (the agent reads the file; ``image`` becomes the loaded picture) and the ``inferer`` override that puts
    :class:`AgentCaseInferer` in the bundle (the evaluation's checkpoint, CT window and resize kernel)."""
    inferer = {"_target_": "medsam3_monai.engines.evaluation.AgentCaseInferer", "agent": agent, "recorder": recorder,
               "checkpoint": "@checkpoint", "ct_window": "@ct_window", "resize_kernel": "@resize_kernel",
               "request_template": request_template}
    return [dict(item, source_image=item["image"]) for item in items], inferer


class AgentRecorder:
    """What :class:`AgentCaseInferer` keeps of each agent run: its trace (``<trace_dir>/NNN_<dataset>_<case>_<label>
    .trace.json``) and one row per (case, class) for ``agent_cases.csv``; planner notes are printed once.

    Args:
        trace_dir: the traces' folder (created on the first trace).
        on_error: ``fail`` (a failed agent run stops the evaluation, its trace kept) or ``empty`` (the class is
            scored with an empty mask, status ``failed``).
        log: where planner notes go (default stderr).
    """

    ROW_FIELDS = ("dataset", "case", "label", "concept", "request", "planner", "status", "phrases", "score",
                  "pixels", "reason", "tokens", "seconds", "dice", "trace")

    def __init__(self, trace_dir: str | Path, on_error: str = "fail", log: Any = None) -> None:
        if on_error not in ("fail", "empty"):
            raise ValueError(f"on_error must be 'fail' or 'empty', got {on_error!r}")
        self.trace_dir = Path(trace_dir)
        self.on_error = on_error
        self.rows: list[dict[str, Any]] = []
        self._log = log
        self._seen: set[str] = set()

    def log(self, line: str) -> None:
        if line in self._seen:
            return
        self._seen.add(line)
        if self._log is not None:
            self._log(line)
        else:
            import sys

            print(line, file=sys.stderr, flush=True)

    def save_trace(self, trace: Any, dataset: str, case: str, label: int, context: dict[str, Any]) -> Path:
        import json
        import re

        def safe(text: str) -> str:
            return re.sub(r"[^0-9A-Za-z._-]+", "_", str(text)).strip("_") or "case"

        trace.data["evaluation"] = context
        path = self.trace_dir / f"{len(self.rows) + 1:03d}_{safe(dataset)}_{safe(case)}_{int(label)}.trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(trace.as_json(), indent=2) + "\n", encoding="utf-8")
        return path

    def write_csv(self, path: str | Path, records: Sequence[dict[str, Any]] = ()) -> Path:
        """``agent_cases.csv``: the rows, with each (case, class)'s Dice from the evaluation's ``records``."""
        from ..metrics.aggregate import write_csv

        dice = {(str(r["dataset"]), str(r["case"]), int(r["label"])): r["metrics"].get("dice") for r in records}
        rows = [dict(row, dice=dice.get((row["dataset"], row["case"], int(row["label"])), "")) for row in self.rows]
        return write_csv(path, list(self.ROW_FIELDS), rows)


class AgentCaseInferer(CaseInferer):
    """The MedSAM3 agent (``medsam3 agent``) as the evaluation's case inferer: each class of a case becomes a request
    (:func:`agent_request`, e.g. "Segment the breast tumor in this ultrasound image."), the agent answers it on the
    case's file with the evaluated network (the predictor of ``medsam3 segment``, so each mark is what ``medsam3
    segment --prompt PHRASE`` gives), and the selected marks' union is the class's mask; ``report_no_mask`` gives an
    empty mask. Classes are requested one at a time; where two answers overlap the pixel goes to the class whose
    answer scored higher (ties: the earlier class). Every run's trace is kept by the :class:`AgentRecorder`.

    Args:
        agent: the planner settings (:class:`~medsam3_monai.agent.runner.AgentSettings`; default the offline planner).
            Its segmenter settings are replaced by the evaluation's (checkpoint, protocol, threshold, CT window and
            each item's modality).
        recorder: keeps traces and rows (default: traces under ``./agent-traces``).
        checkpoint, ct_window, resize_kernel: as the evaluation's.
        request_template: see :func:`agent_request`.
        The other arguments are :class:`CaseInferer`'s (box prompts are refused: the agent answers text requests).
    """

    batches_cases = False  # the agent plans each request on its own

    def __init__(self, transform: Any, protocol: str = "top_query", score_threshold: float = 0.5,
                 box_prompts: bool = False, tracker: Any = None, *, agent: Any = None,
                 recorder: AgentRecorder | None = None, checkpoint: str = "tiny",
                 ct_window: str | Sequence[float] = "abdomen", request_template: str = DEFAULT_AGENT_REQUEST,
                 resize_kernel: str = "sam3", **kwargs: Any) -> None:
        if box_prompts:
            raise ValueError("the agent answers text requests: evaluate it without --box-prompts")
        super().__init__(transform, protocol, score_threshold, False, tracker, **kwargs)
        if agent is None:
            from ..agent.runner import AgentSettings

            agent = AgentSettings(llm="none")
        agent_request("x", template=request_template)  # a bad template fails here, before any case
        self.agent = agent
        self.recorder = recorder or AgentRecorder("agent-traces")
        self.checkpoint = str(checkpoint)
        self.ct_window = ct_window
        self.resize_kernel = resize_kernel
        self.request_template = request_template
        self.tracker = tracker
        self._predictor: Any = None

    @property
    def label(self) -> str:
        return f"agent/{super().label}"

    @property
    def volume_label(self) -> str:
        return f"agent/{super().volume_label}"

    def predictor(self, network: torch.nn.Module) -> Any:
        """``medsam3 segment``'s predictor around the evaluated network (built once)."""
        if self._predictor is None or self._predictor.network is not network:
            from ..inferers.predict import Predictor

            self._predictor = Predictor(network, tracker=self.tracker if self.tracker is not None else "none",
                                        checkpoint=self.checkpoint, protocol=self.protocol,
                                        score_threshold=self.cases.score_threshold, ct_window=self.ct_window,
                                        resize_kernel=self.resize_kernel, tracker_batch=self.cases.tracker_batch)
        return self._predictor

    def __call__(self, inputs: Sequence[dict[str, Any]], network: torch.nn.Module, *args: Any, **kwargs: Any
                 ) -> CasePrediction:
        import dataclasses
        import time

        from ..agent.marks import union_of
        from ..agent.runner import decide
        from ..agent.segmenter import PhraseSegmenter
        from ..agent.trace import Trace
        from ..transforms.errors import source_name

        items = [inputs] if isinstance(inputs, dict) else list(inputs)
        first = items[0]
        image, truth = first[self.image_key], first.get(self.label_key)
        if truth is None:
            raise ValueError(f"case {first.get('case')}: the agent evaluation needs the ground-truth label")
        is_volume = is_volume_slice(image)
        path = str(first.get("source_image") or source_name(image, first, self.image_key))
        shape = tuple(convert_to_tensor(truth, track_meta=False)[0].shape)
        values, texts = item_prompts(first, path)
        dataset, case = str(first.get("dataset", "")), str(first.get("case") or Path(path).name)
        segmenter_settings = dataclasses.replace(
            self.agent.segmenter, checkpoint=self.checkpoint, protocol="top_query" if is_volume else self.protocol,
            score_threshold=volume_threshold(self.cases.score_threshold, self.volume_score_threshold) if is_volume
            else self.cases.score_threshold, ct_window=self.ct_window, resize_kernel=self.resize_kernel,
            modality=first.get("modality"),
            channel=first.get("channel"), progress=False)
        settings = dataclasses.replace(self.agent, segmenter=segmenter_settings)
        segmenter = PhraseSegmenter(self.predictor(network), path, segmenter_settings)
        masks, scores = [], []
        for value, text in zip(values, texts):
            request = agent_request(text, first.get("modality"), dataset, self.request_template)
            trace = Trace()
            start = time.perf_counter()
            context = {"dataset": dataset, "case": case, "label": int(value), "concept": text}
            row = {"dataset": dataset, "case": case, "label": int(value), "concept": text, "request": request}
            try:
                decision = decide(path, request, settings, segmenter, log=self.recorder.log, trace=trace)
            except Exception as err:  # noqa: BLE001 - kept in the trace; re-raised unless on_error="empty"
                saved = self.recorder.save_trace(trace, dataset, case, value, context)
                if self.recorder.on_error != "empty" or not isinstance(err, (ValueError, RuntimeError, OSError)):
                    if isinstance(err, ValueError):
                        # (no trace path: the failed run's output folder, traces included, is removed)
                        raise ValueError(f"the agent failed on {dataset} case {case} ({request!r}): {err} "
                                         "(--agent-on-error empty scores such a case with an empty mask instead, "
                                         "and keeps its trace under agent/traces/)") from err
                    raise
                mask, score = torch.zeros(shape, dtype=torch.bool), 0.0
                row.update(planner=trace.data.get("planner", {}).get("kind"), status="failed", phrases="",
                           reason=f"{type(err).__name__}: {err}")
            else:
                selected = decision.status == "selected"
                mask = torch.as_tensor(union_of(decision.marks)) if selected else torch.zeros(shape, dtype=torch.bool)
                score = max(m.score for m in decision.marks) if selected else 0.0
                saved = self.recorder.save_trace(trace, dataset, case, value, context)
                row.update(planner=trace.data["planner"].get("kind"), status=decision.status,
                           phrases=" | ".join(decision.phrases), reason=decision.reason or "")
            if tuple(mask.shape) != shape:
                raise RuntimeError(f"the agent's mask {tuple(mask.shape)} and the label {shape} of case {case} differ "
                                   "in shape")
            row.update(score=round(float(score), 6), pixels=int(mask.sum()),
                       tokens=trace.data.get("tokens", {}).get("total", 0),
                       seconds=round(time.perf_counter() - start, 3),
                       trace=str(saved.relative_to(self.recorder.trace_dir.parent)))
            self.recorder.rows.append(row)
            masks.append(mask.bool())
            scores.append(float(score))
        return self._prediction(items, [int(v) for v in values], list(texts),
                                label_map_of(masks, values, highest_score_last(scores)),
                                torch.tensor(scores, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ metrics
def case_records(prediction: CasePrediction, protocol: str, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                 volume_protocol: str | None = None) -> list[dict[str, Any]]:
    """One metric record per prompt of the case (the format of ``metrics.aggregate``), scored on the merged
    label map in the input's geometry; empty truth and empty prediction count as Dice 1. The records carry
    ``protocol``, or for a volume ``volume_protocol`` when given."""
    if prediction.truth is None:
        return []
    if prediction.is_volume and volume_protocol is not None:
        protocol = volume_protocol
    item = prediction.items[0]
    per_value = label_map_metrics(prediction.pred, prediction.truth, prediction.values, prediction.spacing,
                                  nsd_tolerance_mm=nsd_tolerance_mm)
    records = []
    for value, text, score, (metrics, predicted, in_truth) in zip(prediction.values, prediction.prompts,
                                                        prediction.scores.tolist(), per_value):
        records.append({
            "dataset": prediction.dataset, "group": str(item.get("group", "other")), "case": prediction.case,
            "prompt": text, "protocol": protocol, "label": int(value), "score": float(score), "metrics": metrics,
            "empty_prediction": predicted == 0, "empty_truth": in_truth == 0, "volume": prediction.is_volume,
        })
    return records


class CaseMetrics:
    """The evaluation's post-processing of a case: :class:`CasePrediction` -> ``{"prediction", "records"}`` (one
    metric record per prompt, :func:`case_records`), what the report handlers read.

    Args:
        protocol: the name the 2D cases' numbers are reported under (``CaseInferer.label``, e.g. ``top_query+box``).
        nsd_tolerance_mm: NSD tolerance (2 mm, MedSAM's).
        volume_protocol: the name the volumes' are reported under (``CaseInferer.volume_label``); None = ``protocol``.
    """

    def __init__(self, protocol: str, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                 volume_protocol: str | None = None) -> None:
        self.protocol = str(protocol)
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.volume_protocol = None if volume_protocol is None else str(volume_protocol)

    def __call__(self, prediction: CasePrediction) -> dict[str, Any]:
        return {"prediction": prediction,
                "records": case_records(prediction, self.protocol, self.nsd_tolerance_mm, self.volume_protocol)}


# ------------------------------------------------------------------------------------------------ assembly
def run_evaluation(
    network: torch.nn.Module,
    items: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    checkpoint: str = "tiny",
    datalists: Sequence[str | Path] = (),
    split: str = "auto",
    max_cases: int | None = None,
    protocol: str = "top_query",
    score_threshold: float = 0.5,
    box_prompts: bool = False,
    tracker: Any = None,
    tracker_name: str = "none",
    device: torch.device | str | None = None,
    max_overlays: int = 8,
    progress: bool = True,
    num_workers: int = 0,
    batch_size: int = 1,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    ct_window: str | Sequence[float] | None = None,
    resize_kernel: str | None = None,
    skip_unreadable: bool = False,
    tracker_batch: int = TRACKER_BATCH,
    inferer: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    artifact_dirs: Sequence[str] = ("overlays",),
    skip_empty_truth: bool = False,
    volume_score_threshold: float | None = None,
    save_predictions: bool = False,
):
    """Run the evaluation bundle (``configs/inference.json`` + ``configs/evaluate.json``) on ``items`` (from
    :func:`evaluation_items`) with an already built ``network`` (and ``tracker``) and write the report into
    ``out_dir``.

    Every argument is an override of a config id (``checkpoint``, ``datalists``, ``split`` and ``max_cases``
    only describe the run in the report and MLflow parameters; ``tracker_name`` is the tracker's description),
    so ``medsam3 evaluate`` runs exactly what ``python -m monai.bundle run --config_file
    "['configs/inference.json','configs/evaluate.json']"`` runs. ``ct_window`` and ``resize_kernel`` None: the ones
    the network's model file records (its training's), else abdomen and sam3; a given one that differs from the
    recorded one is noted under the table.
    ``inferer`` overrides entries of the ``inferer`` config (``{"_target_": "...EnsembleCaseInferer",
    "keep_ratio": 0.5}`` swaps the case inferer); ``notes`` are added under the report's table, ``params`` to its
    MLflow parameters, and ``artifact_dirs`` (report sub-folders) are logged with the report files.
    Returns the :class:`~medsam3_monai.engines.reports.EvaluationReport` (``table``, ``records``, ``files``,
    ``run_id``).
    """
    from ..bundle import config_parser
    from ..inferers.trained_settings import inference_preprocessing

    resize_kernel, ct_window, differing = inference_preprocessing(network, resize_kernel, ct_window)
    notes = [*notes, *(f"Note: {line}." for line in differing)]
    device = torch.device(device) if device is not None else next(network.parameters()).device
    network = network.to(device).eval()
    if tracker is not None:
        tracker = tracker.to(device)
    overrides: dict[str, Any] = {
        "network": network, "tracker": tracker, "tracker_source": tracker_name, "device": device,
        "checkpoint": checkpoint, "image_size": int(network.image_size), "data": list(items),
        "datalists": [str(path) for path in datalists], "split": split, "max_cases": max_cases,
        "output_dir": str(out_dir), "protocol": protocol, "score_threshold": score_threshold,
        "box_prompts": box_prompts, "max_overlays": max_overlays, "progress": progress,
        "num_workers": num_workers, "batch_size": int(batch_size), "mlflow": mlflow,
        "report_tracking_uri": tracking_uri, "ct_window": ct_window, "resize_kernel": resize_kernel,
        "parent_run_id": parent_run_id,
        "skip_unreadable": skip_unreadable, "tracker_batch": int(tracker_batch),
        "skip_empty_truth": bool(skip_empty_truth), "volume_score_threshold": volume_score_threshold,
        "save_predictions": bool(save_predictions),
    }
    if experiment is not None:
        overrides["experiment"] = experiment
    if run_name is not None:
        overrides["run_name"] = run_name
    for key, value in (inferer or {}).items():
        overrides[f"inferer#{key}"] = value
    for key, value in (params or {}).items():
        overrides[f"handlers#2#params#{key}"] = value
    if notes:
        overrides["handlers#2#notes"] = [*report_notes(checkpoint, protocol, score_threshold, box_prompts, items,
                                                       tracker_name, split, volume_score_threshold), *notes]
    if tuple(artifact_dirs) != ("overlays",):
        overrides["handlers#2#artifact_dirs"] = list(artifact_dirs)
    parser = config_parser(["inference.json", "evaluate.json"], **overrides)
    parser.get_parsed_content("evaluator").run()
    return parser.get_parsed_content("handlers#2")
