"""MONAI Label infer task: our text-prompted pipeline (``medsam3_monai.inferers.predict.Predictor``) behind
MONAI Label's ``InferTask`` API, one text prompt per label.

A request (``POST /infer/<model>``, or Slicer's / OHIF's "Run") segments every label of the model; its
``params`` may narrow or change that:

* ``labels``: a subset of the model's label names (list or comma-separated), keeping their label values;
* ``prompts``: ad-hoc text prompts instead of the labels (list or one string), label values 1..P in order;
* ``protocol`` (2D: ``top_query``, ``threshold``, ``semantic``), ``score_threshold``, ``modality`` (CT, MRI, ...;
  ``auto``: by channels), ``box`` ([x1, y1, x2, y2] in pixels, 2D only, one for all prompts or one per prompt),
  ``device``;
* ``result_extension``, ``result_dtype``, ``result_compress``: MONAI Label's own output options (3D Slicer sends
  ``.nrrd`` + ``uint8``, OHIF ``.nrrd`` + ``uint16``).

Without ``result_extension`` the result file is exactly what ``medsam3 segment`` writes for the same input and
prompts (the same writer functions): a 2D image -> PNG of its size (one prompt: a 0/255 mask; several: the label
values); a volume -> NIfTI with the input's affine and the label values. Another extension (``.nrrd``, ``.mha``,
...) is written by MONAI Label's ``write_itk``, as MONAI Label's sample apps write it: the same label values in
the same world geometry. The result JSON is ``medsam3 segment``'s sidecar JSON (label value -> prompt, score,
pixel count; protocol; settings) plus ``label_names`` {label name: value written}, which 3D Slicer uses to name
the segments, and ``prompts`` {label name: text prompt}.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list, name_to_device

from lib.configs import AppConfig

logger = logging.getLogger(__name__)

PROTOCOL_CHOICES = ("top_query", "threshold", "semantic")
MODALITY_CHOICES = ("auto", "CT", "MRI", "X-ray", "ultrasound", "endoscopy", "dermoscopy", "fundus", "OCT", "EM")


def _scalar(value: Any) -> Any:
    """A config entry sent back as is (a choice list: its first item, the default) -> one value."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def bad_request(message: str) -> HTTPException:
    """An input error: HTTP 400 with the message (MONAI Label itself would answer 500 without one)."""
    return HTTPException(status_code=400, detail=message)


class MedSAM3Infer(InferTask):
    """Text-prompted segmentation of a 2D image or a volume, one prompt per label (see the module doc)."""

    def __init__(self, conf: AppConfig) -> None:
        self.conf = conf
        modalities = list(MODALITY_CHOICES)
        if conf.modality is not None:
            modalities = [conf.modality] + [m for m in modalities if m.lower() != conf.modality.lower()]
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(conf.labels),
            dimension=3,
            description=("Medical SAM3: text-prompted segmentation of a 2D image or a 3D volume; one text prompt "
                         f"per label ({', '.join(f'{n!r}: {conf.prompts[n]!r}' for n in conf.labels)}); "
                         f"checkpoint {conf.checkpoint}"),
            config={
                # informational (changing them needs a restart with other --conf values)
                "concepts": dict(conf.prompts),
                "checkpoint": conf.checkpoint,
                # per request (a list is a choice; its first item is the default)
                "protocol": [conf.protocol] + [p for p in PROTOCOL_CHOICES if p != conf.protocol],
                "score_threshold": conf.score_threshold,
                "modality": modalities,
                "device": device_list(),
            },
        )
        self._predictors: dict[str, Any] = {}
        self._lock = threading.Lock()
        if conf.checkpoint != "tiny" and not Path(conf.checkpoint).exists():
            raise ValueError(f"--conf checkpoint {conf.checkpoint}: no such file or folder (give 'tiny', an HF "
                             "folder, sam3.pt, a Medical-SAM3 or medsam3-monai checkpoint)")
        if conf.preload:
            self.predictor(name_to_device(None))

    def is_valid(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------ the model
    def predictor(self, device: str) -> Any:
        """The loaded network for ``device`` (built on first use, then kept)."""
        if device not in self._predictors:
            import torch

            from medsam3_monai.inferers.predict import Predictor

            logger.info(f"loading checkpoint {self.conf.checkpoint} on {device}")
            self._predictors[device] = Predictor.from_checkpoint(
                self.conf.checkpoint, self.conf.image_size, torch.device(device), tracker=self.conf.tracker,
                protocol=self.conf.protocol, score_threshold=self.conf.score_threshold,
                ct_window=self.conf.ct_window, progress=False,
            )
        return self._predictors[device]

    # ------------------------------------------------------------------------------------------ a request
    def concepts(self, request: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
        """(label names, text prompts, label values) the request asks for."""
        if request.get("prompts"):
            texts = request["prompts"]
            if not isinstance(texts, (str, list, tuple)):
                raise bad_request("params.prompts: give a list of text prompts (or one string)")
            texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
            if len(texts) > 255:
                raise bad_request(f"{len(texts)} prompts: at most 255 fit an 8-bit label map")
            return texts, texts, list(range(1, len(texts) + 1))
        names = list(self.conf.labels)
        if request.get("labels"):
            wanted = request["labels"]
            if not isinstance(wanted, (str, list, tuple)):
                raise bad_request("params.labels: give a list of label names (or a comma-separated string)")
            wanted = _names(wanted)
            unknown = [n for n in wanted if n not in self.conf.labels]
            if unknown:
                raise bad_request(f"params.labels: {unknown} are not labels of this model ({names})")
            names = [n for n in names if n in wanted]
        return names, [self.conf.prompts[n] for n in names], [self.conf.labels[n] for n in names]

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        from medsam3_monai.deploy.segment_cli import output_labels

        req = {**self._config, **request}
        image = req.get("image")
        if not isinstance(image, str) or not image:
            raise bad_request("no image: give an image id of the datastore or upload a file")
        names, texts, values = self.concepts(req)
        protocol = _scalar(req.get("protocol")) or None
        modality = _scalar(req.get("modality"))
        modality = None if modality in (None, "", "auto", "none") else str(modality)
        try:
            score_threshold = float(_scalar(req.get("score_threshold", self.conf.score_threshold)))
        except (TypeError, ValueError):
            raise bad_request(f"score_threshold {req.get('score_threshold')!r}: give a number in [0, 1]") from None
        if not 0.0 <= score_threshold <= 1.0:
            raise bad_request(f"score_threshold {score_threshold}: give a number in [0, 1]")
        box = req.get("box")
        device = name_to_device(_scalar(req.get("device")))

        with self._lock:  # one network per device; the score threshold is the predictor's
            try:
                predictor = self.predictor(device)
                predictor.inferer.score_threshold = score_threshold
                prediction = predictor(image, texts, box=box, modality=modality, protocol=protocol)
            except (ValueError, FileNotFoundError) as err:  # input errors (DataError, PromptError, ...)
                raise bad_request(str(err)) from None
            finally:
                if self._predictors.get(device) is not None:
                    self._predictors[device].inferer.score_threshold = self.conf.score_threshold

        if values != list(prediction.label_values):  # the model's own label values instead of 1..P
            prediction = relabel(prediction, values)
        array, summary = output_labels(prediction)
        written = [int(v) for v in summary["labels"]]
        result = write_result(array, prediction, image, req.get("result_extension"), req.get("result_dtype"),
                              req.get("result_compress", False))
        summary["label_names"] = dict(zip(names, written))
        summary["prompts"] = dict(zip(names, texts))
        logger.info(f"{Path(image).name}: {summary['label_names']} -> {result}")
        return result, summary


def _extension(value: Any) -> str | None:
    if not value:
        return None
    value = str(value).strip().lower()
    return value if value.startswith(".") else f".{value}"


def write_result(array: Any, prediction: Any, reference: str, extension: Any = None, dtype: Any = None,
                 compress: Any = False) -> str:
    """The label file: ``medsam3 segment``'s format (PNG for 2D, NIfTI for volumes) unless the client asks for
    another ``result_extension`` (3D Slicer and OHIF ask for ``.nrrd``): that one is written by MONAI Label's own
    writer (``monailabel.transform.writer.write_itk``, with ``result_dtype`` and ``result_compress``), as its
    sample apps do, so the clients read it as they read theirs."""
    from medsam3_monai.deploy.segment_cli import write_label_volume, write_mask_image

    ext = _extension(extension)
    images = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
    own = (ext in (None, ".nii", ".nii.gz")) if prediction.is_volume else (ext is None or ext in images)
    suffix = ext or (".nii.gz" if prediction.is_volume else ".png")
    path = tempfile.NamedTemporaryFile(prefix="medsam3-", suffix=suffix, delete=False).name
    if own and prediction.is_volume:
        write_label_volume(array, prediction.affine.numpy(), path, reference=reference)
    elif own:
        write_mask_image(array, path, images[suffix])
    else:
        from monailabel.transform.writer import write_itk
        from monailabel.utils.others.generic import strtobool

        try:
            if prediction.is_volume:  # (X, Y, Z) + RAS affine, as MONAI Label's Writer gets them
                write_itk(array, path, prediction.affine.numpy(), dtype or None, bool(strtobool(compress)))
            else:  # MONAI reads 2D pictures as (W, H): the transpose of our (H, W) mask
                write_itk(array.T, path, None, dtype or None, bool(strtobool(compress)))
        except (RuntimeError, TypeError, ValueError) as err:
            Path(path).unlink(missing_ok=True)
            raise bad_request(f"cannot write the result as {suffix} (result_dtype {dtype!r}): {err}") from None
    return path


def relabel(prediction: Any, values: Sequence[int]) -> Any:
    """A ``Prediction`` whose label map uses ``values[c]`` for prompt ``c`` (instead of ``c + 1``)."""
    import torch
    from monai.data import MetaTensor

    labels = prediction.label_map
    plain = labels.as_tensor() if isinstance(labels, MetaTensor) else torch.as_tensor(labels)
    table = torch.zeros(max(int(plain.max()), max(prediction.label_values), 0) + 1, dtype=torch.int64)
    for old, new in zip(prediction.label_values, values):
        table[int(old)] = int(new)
    mapped = table[plain.long()].to(torch.uint8 if max(values) <= 255 else torch.int32)
    label_map = MetaTensor(mapped, meta=dict(labels.meta)) if isinstance(labels, MetaTensor) else mapped
    return dataclasses.replace(prediction, label_map=label_map, label_values=list(values))
