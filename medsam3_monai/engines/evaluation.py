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
   ``segment_image``, one network call for all its class prompts; volumes: ``segment_volume``, detector on every
   slice and tracker propagation) then that bundle's post-processing (``Invertd`` back to the input's geometry,
   merge by pixel-wise maximum confidence) -- with the ground truth's boxes added for the T+I protocol.
4. :class:`~.inference.MedSAM3CaseEvaluator` (a ``SupervisedEvaluator``, the inference bundle's engine too):
   one iteration per case; :class:`CaseMetrics` turns each into the :class:`CasePrediction` and one metric
   record per prompt (Dice, IoU; NSD and HD95 when the spacing is
   known: volumes, and 2D items that carry ``"spacing"`` in mm as ``[rows, cols]``).
5. Handlers (:mod:`.reports`): overlays for a sample of cases, then ``cases.csv``, ``table.md``/``.csv``,
   ``radar.png`` and an MLflow run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from ..metrics.segmentation import DEFAULT_NSD_TOLERANCE_MM, case_metrics
from ..protocol_registry import get_protocol
from .inference import MedSAM3CaseEvaluator, collate_cases

__all__ = [
    "SPLIT_CHOICES",
    "CaseInferer",
    "CasePrediction",
    "CaseMetrics",
    "MedSAM3CaseEvaluator",
    "case_records",
    "collate_cases",
    "evaluation_items",
    "evaluation_transforms",
    "is_volume_item",
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

    Each output item: ``image`` (3, S, S) SAM3-normalised with the resize recorded for ``Invertd``; ``label``
    the whole native class map ((1, H, W), or (1, X, Y, Z) shared by every slice item of a volume).
    """
    from ..bundle import config_parser

    return config_parser("inference.json", image_size=image_size, ct_window=ct_window).get_parsed_content(
        "preprocessing")


def protocol_label(protocol: str, box_prompts: bool = False) -> str:
    """The name a number is reported under: the protocol, ``+box`` for the T+I (text + box) variant."""
    return get_protocol(protocol).name + ("+box" if box_prompts else "")


def report_notes(checkpoint: str, protocol: str, score_threshold: float, box_prompts: bool,
                 items: Sequence[dict[str, Any]], tracker: str = "none", split: str = "auto") -> list[str]:
    """How the numbers were produced: the lines under the report's Markdown table."""
    splits = sorted({f"{Path(str(i.get('datalist', '?'))).name}: {i.get('split', '?')}" for i in items})
    described = get_protocol(protocol).describe(score_threshold)
    notes = [
        f"Checkpoint `{checkpoint}`; protocol `{protocol_label(protocol, box_prompts)}`: {described}"
        + ("; text + box prompt (largest ground-truth component)." if box_prompts else "; text prompts."),
        f"Cases: {len(items)} ({'; '.join(splits)}); split `{split}`"
        + (" = test if present, else validation." if split == "auto" else "."),
        "Each class is prompted separately; overlaps go to the class with the higher confidence "
        "score × sigmoid(mask logit) at the pixel. Metrics in each input's own geometry; Dice = IoU = 100 "
        "when prediction and truth are both empty. NSD (2 mm) and HD95 only where the spacing is known.",
    ]
    volumes = sum(is_volume_item(i) for i in items)
    if volumes:
        notes.append(f"Volumes ({volumes}): detector on every slice (top query, score >= {score_threshold}) merged "
                     f"with tracker propagation from the most confident slice (tracker: {tracker})"
                     + ("; box prompts are not used for volumes." if box_prompts else "."))
    return notes


# ------------------------------------------------------------------------------------------------ inference
@dataclass
class CasePrediction:
    """One case's prediction in the input's own geometry.

    Attributes:
        items: the slice-space items of the case (one for a 2D image, D for a volume).
        values, prompts: the class label values and their prompt texts, in prompt order.
        masks: (P, H, W) or (P, X, Y, Z) bool, each prompt's mask after the class merge (disjoint).
        truth: the native class map (H, W) or (X, Y, Z), or None for an unlabelled item.
        scores: (P,) per prompt: the protocol's score (2D) or the best slice score (volume).
        spacing: per-axis spacing in mm (array axis order) or None when unknown.
        seed_slices: for volumes, the slice each prompt's tracking started from.
    """

    items: list[dict[str, Any]]
    values: list[int]
    prompts: list[str]
    masks: torch.Tensor
    truth: torch.Tensor | None
    scores: torch.Tensor
    spacing: tuple[float, ...] | None
    is_volume: bool = False
    seed_slices: torch.Tensor | None = None

    @property
    def pred(self) -> torch.Tensor:
        """Label map of the prediction (int32 label values, 0 background), the shape of ``truth``."""
        out = torch.zeros(self.masks.shape[1:], dtype=torch.int32)
        for value, mask in zip(self.values, self.masks):
            out[mask] = int(value)
        return out

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
    linear = torch.as_tensor(affine, dtype=torch.float64)[:3, :3]
    return tuple(float(v) for v in linear.norm(dim=0))


class CaseInferer(Inferer):
    """A case's slice items + the network -> :class:`CasePrediction` in the input's geometry.

    The case goes through the same pipeline as ``medsam3 segment`` and ``configs/inference.json``:
    :class:`~medsam3_monai.inferers.predict.PromptInferer` (2D protocol or the volume path), then the bundle's
    post-processing (``Invertd`` per slice, restack, merge by maximum confidence); the merged label map is split
    back into one (disjoint) mask per prompt for the metrics.

    Args:
        transform: the preprocessing that made the items (its ``ResizeToSliced`` record is inverted).
        protocol: 2D protocol (``protocol_registry``).
        score_threshold: the ``threshold`` protocol's query score threshold, and the detection threshold of
            the volume path.
        box_prompts: add the ground truth's largest-component box to each prompt (T+I protocol, 2D only).
        tracker: the SAM3 tracker for volumes (``networks.tracker.build_tracker``); None = detector only.
        volume_batch_size: slices per detector call in the volume path.
    """

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
    ) -> None:
        from ..bundle import inference_postprocessing

        super().__init__()
        self.cases = PromptInferer(protocol, score_threshold, tracker=tracker, volume_batch_size=volume_batch_size,
                                   image_key=image_key)
        self.postprocessing = inference_postprocessing(transform)
        self.box_prompts = bool(box_prompts)
        self.image_key, self.label_key = image_key, label_key
        self._warned_boxes = False

    @property
    def protocol(self) -> str:
        return self.cases.protocol

    @property
    def label(self) -> str:
        return protocol_label(self.protocol, self.box_prompts)

    def __call__(self, inputs: Sequence[dict[str, Any]], network: torch.nn.Module, *args: Any, **kwargs: Any
                 ) -> CasePrediction:
        items = [inputs] if isinstance(inputs, dict) else list(inputs)
        first = items[0]
        image, truth = first[self.image_key], first.get(self.label_key)
        is_volume = "volume_shape" in getattr(image, "meta", {})
        case_items = [dict(item) for item in items]
        if self.box_prompts:
            self._add_ground_truth_boxes(case_items[0], truth, is_volume)
        case = self.postprocessing(self.cases(case_items, network))
        label_map = convert_to_tensor(case["pred"], track_meta=False)[0]
        values = [int(v) for v in case["prompt_values"]]
        masks = torch.stack([label_map == value for value in values])
        truth_map = None
        if truth is not None:
            truth_map = convert_to_tensor(truth, track_meta=False)[0]
            if tuple(truth_map.shape) != tuple(masks.shape[1:]):
                raise RuntimeError(f"prediction {tuple(masks.shape[1:])} and label {tuple(truth_map.shape)} differ in "
                                   f"shape for case {first.get('case')}: the inversion did not restore the geometry")
        seeds = case.get("seed_slices")
        return CasePrediction(items, values, list(case["prompt_texts"]), masks, truth_map,
                              torch.as_tensor(case["prompt_scores"]).float().cpu(),
                              _spacing(first, truth, is_volume), is_volume,
                              None if seeds is None else torch.as_tensor(seeds))

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


# ------------------------------------------------------------------------------------------------ metrics
def case_records(prediction: CasePrediction, protocol: str, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
                 ) -> list[dict[str, Any]]:
    """One metric record per prompt of the case (the format of ``metrics.aggregate``), scored on the merged
    label map in the input's geometry; empty truth and empty prediction count as Dice 1."""
    if prediction.truth is None:
        return []
    item = prediction.items[0]
    records = []
    for value, text, score, mask in zip(prediction.values, prediction.prompts, prediction.scores.tolist(),
                                        prediction.masks):
        metrics = case_metrics(mask, prediction.truth == value, prediction.spacing, nsd_tolerance_mm=nsd_tolerance_mm)
        records.append({
            "dataset": prediction.dataset, "group": str(item.get("group", "other")), "case": prediction.case,
            "prompt": text, "protocol": protocol, "label": int(value), "score": float(score), "metrics": metrics,
            "empty_prediction": not bool(mask.any()),
        })
    return records


class CaseMetrics:
    """The evaluation's post-processing of a case: :class:`CasePrediction` -> ``{"prediction", "records"}`` (one
    metric record per prompt, :func:`case_records`), what the report handlers read.

    Args:
        protocol: the name the numbers are reported under (``CaseInferer.label``, e.g. ``top_query+box``).
        nsd_tolerance_mm: NSD tolerance (2 mm, MedSAM's).
    """

    def __init__(self, protocol: str, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> None:
        self.protocol = str(protocol)
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)

    def __call__(self, prediction: CasePrediction) -> dict[str, Any]:
        return {"prediction": prediction, "records": case_records(prediction, self.protocol, self.nsd_tolerance_mm)}


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
    mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    ct_window: str | Sequence[float] = "abdomen",
    skip_unreadable: bool = False,
):
    """Run the evaluation bundle (``configs/inference.json`` + ``configs/evaluate.json``) on ``items`` (from
    :func:`evaluation_items`) with an already built ``network`` (and ``tracker``) and write the report into
    ``out_dir``.

    Every argument is an override of a config id (``checkpoint``, ``datalists``, ``split`` and ``max_cases``
    only describe the run in the report and MLflow parameters; ``tracker_name`` is the tracker's description),
    so ``medsam3 evaluate`` runs exactly what ``python -m monai.bundle run --config_file
    "['configs/inference.json','configs/evaluate.json']"`` runs.
    Returns the :class:`~medsam3_monai.engines.reports.EvaluationReport` (``table``, ``records``, ``files``,
    ``run_id``).
    """
    from ..bundle import config_parser

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
        "num_workers": num_workers, "mlflow": mlflow, "report_tracking_uri": tracking_uri,
        "ct_window": ct_window, "parent_run_id": parent_run_id, "skip_unreadable": skip_unreadable,
    }
    if experiment is not None:
        overrides["experiment"] = experiment
    if run_name is not None:
        overrides["run_name"] = run_name
    parser = config_parser(["inference.json", "evaluate.json"], **overrides)
    parser.get_parsed_content("evaluator").run()
    return parser.get_parsed_content("handlers#2")
