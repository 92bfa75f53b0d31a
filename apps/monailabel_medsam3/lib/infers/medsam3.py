"""MONAI Label infer task: our text-prompted pipeline (``medsam3_monai.inferers.predict.Predictor``) behind
MONAI Label's ``InferTask`` API, one text prompt per label.

A request (``POST /infer/<model>``, or Slicer's / OHIF's "Run") segments every label of the model; its
``params`` may narrow or change that:

* ``labels``: a subset of the model's label names (list or comma-separated), keeping their label values;
* ``prompts`` (or ``prompt``): ad-hoc text prompts instead of the labels (list or one string), label values 1..P
  in order;
* ``protocol`` (2D only: ``top_query``, ``threshold``, ``semantic``), ``score_threshold``, ``modality`` (CT, MRI,
  ...; default: ``--conf modality``; ``auto``: by channels), ``box`` ([x1, y1, x2, y2] in pixels, 2D only, one
  for all prompts or one per prompt), ``device``, ``largest_cc`` (true: each label's largest connected component
  only, as for MONAI Label's SAM2 model);
* ``result_extension``, ``result_dtype``, ``result_compress``: MONAI Label's own output options (3D Slicer sends
  ``.nrrd`` + ``uint8``, OHIF ``.nrrd``).

Params are checked as ``medsam3 serve`` checks them (``monailabel_protocol.LabelInferParams``): an unknown key,
a malformed box, a protocol on a volume or a result format that cannot hold the labels (a volume as ``.png``, a
``.jpg``) is answered with HTTP 400 and the reason; what 3D Slicer sends back from the model's config is
accepted. The label file is written by ``medsam3 serve``'s writer (``monailabel_protocol.write_result``): a 2D
image -> PNG of its size, a volume -> NIfTI with the input's affine and qform/sform codes (``.nrrd``: the same
world geometry in LPS), in ``result_dtype``. Every label is written with its label value, as ``/info/`` lists it
(one label on a 2D image too: ``medsam3 segment`` writes 0/255 there). The result JSON is ``medsam3 segment``'s
sidecar JSON (label value -> prompt, score, pixel count; protocol; settings) plus ``label_names`` {label name:
value written}, which 3D Slicer uses to name the segments, and ``prompts`` {label name: text prompt}.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list, name_to_device

from lib.configs import AppConfig
from medsam3_monai.protocol_registry import PROTOCOLS

logger = logging.getLogger(__name__)

PROTOCOL_CHOICES = tuple(PROTOCOLS)
MODALITY_CHOICES = ("auto", "CT", "MRI", "X-ray", "ultrasound", "endoscopy", "dermoscopy", "fundus", "pathology",
                    "microscopy", "OCT", "EM")


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
                "largest_cc": False,
            },
        )
        self._predictors: dict[str, Any] = {}
        self._lock = threading.Lock()
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
                ct_window=self.conf.ct_window, resize_kernel=self.conf.resize_kernel, progress=False,
            )
            for line in self._predictors[device].preprocessing_notes:
                logger.warning(line)
        return self._predictors[device]

    # ------------------------------------------------------------------------------------------ a request
    def concepts(self, params: Any) -> tuple[list[str], list[str], list[int]]:
        """(label names, text prompts, label values) the request's params (``LabelInferParams``) ask for."""
        if params.prompts:
            if len(params.prompts) > 255:
                raise bad_request(f"{len(params.prompts)} prompts: at most 255 fit an 8-bit label map")
            return params.prompts, params.prompts, list(range(1, len(params.prompts) + 1))
        names = list(self.conf.labels)
        if params.labels:
            unknown = [n for n in params.labels if n not in self.conf.labels]
            if unknown:
                raise bad_request(f"params.labels: {unknown} are not labels of this model ({names})")
            names = [n for n in names if n in params.labels]
        return names, [self.conf.prompts[n] for n in names], [self.conf.labels[n] for n in names]

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        from medsam3_monai.deploy.monailabel_protocol import (MONAI_LABEL_REQUEST_KEYS, ParamsError,
                                                              parse_label_params, result_format, write_result)
        from medsam3_monai.deploy.segment_cli import add_notes, output_labels, request_notes
        from medsam3_monai.inferers.inputs import input_kind
        from medsam3_monai.transforms.io import nifti_channels
        from medsam3_monai.networks.checkpoints import CheckpointError
        from torch import device as torch_device

        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise bad_request("no image: give an image id of the datastore, upload a file, or a session id that "
                              "exists (sessions expire: create one again with PUT /session/)")
        shown = shown_name(image)
        label = request.get("label")
        if label is not None and not (isinstance(label, str) and Path(label).is_file()):
            # MONAI Label puts an uploaded label file's path here; anything else came in params: 'labels' misspelt
            raise bad_request(f"params.label {label!r}: this model has no 'label' param; to segment some of its labels "
                              f"give 'labels' (a list or comma-separated names: {', '.join(self.conf.labels)})")
        try:
            params = parse_label_params({k: v for k, v in request.items() if k not in MONAI_LABEL_REQUEST_KEYS})
            names, texts, values = self.concepts(params)
            is_volume = input_kind(image) == "volume"
            channels = nifti_channels(image) if is_volume else None
            if channels is not None and channels[0] > 1:  # the loader's message would name --channel, not an app's
                raise ParamsError(f"{shown} is a 4D volume ({'x'.join(map(str, channels[1]))}): this app segments 3D "
                                  "volumes; send one channel / time point as its own volume")
            if is_volume and params.protocol not in (None, "top_query"):
                raise ParamsError(f"protocol {params.protocol!r} is for 2D images; volumes are segmented with "
                                  "top_query (leave protocol out)")
            extension, _ = result_format(params, is_volume)
        except (ParamsError, ValueError, FileNotFoundError) as err:
            raise bad_request(str(err).replace(image, shown)) from None
        requested = self.conf.modality if params.modality is None else params.modality  # --conf modality: the default
        modality = None if requested in (None, "auto", "none") else requested
        score_threshold = self.conf.score_threshold if params.score_threshold is None else params.score_threshold
        device = name_to_device(params.device)
        try:
            torch_device(device)
        except RuntimeError:
            raise bad_request(f"device {params.device!r}: give cpu, cuda, cuda:N or a device name /info/ lists "
                              f"({', '.join(device_list())})") from None

        with self._lock:  # one network per device; the request's protocol and threshold travel with the call
            try:
                predictor = self.predictor(device)
            except CheckpointError as err:  # the server's fault, said as such (MONAI Label would answer a bare 500)
                raise HTTPException(status_code=500,
                                    detail=f"the server's checkpoint cannot be loaded: {err}") from None
            try:
                prediction = predictor(image, texts, box=params.box, modality=modality, protocol=params.protocol,
                                       score_threshold=score_threshold)
            except (ValueError, FileNotFoundError) as err:  # input errors (DataError, PromptError, ...)
                raise bad_request(str(err).replace(image, shown)) from None

        if values != list(prediction.label_values):  # the model's own label values instead of 1..P
            prediction = relabel(prediction, values)
        if params.largest_cc:
            prediction = prediction.largest_components()
        array, summary = output_labels(prediction, image, binary_mask=False)
        written = [int(v) for v in summary["labels"]]
        result = tempfile.NamedTemporaryFile(prefix="medsam3-", suffix=extension, delete=False).name
        try:
            write_result(array, prediction, params, Path(result), Path(image))
        except (ValueError, RuntimeError, OSError) as err:
            Path(result).unlink(missing_ok=True)
            raise bad_request(f"cannot write the result as {extension} (result_dtype {params.result_dtype!r}): "
                              f"{err}") from None
        add_notes(summary, prediction,  # as medsam3 segment says them
                  request_notes(prediction, params.score_threshold, self.conf.score_threshold, "score_threshold"))
        summary["input"] = shown
        summary["score_threshold"] = score_threshold  # this request's (the predictor keeps its own)
        summary["label_names"] = dict(zip(names, written))
        summary["prompts"] = dict(zip(names, texts))
        logger.info(f"{shown}: {summary['label_names']} -> {result}")
        return result, summary


def is_upload(path: Any) -> bool:
    """Whether ``path`` is a file MONAI Label's endpoint saved from a request's upload (``tempfile``'s
    ``tmpXXXXXXXX`` names, directly in the temporary folder)."""
    if not isinstance(path, str) or not path:
        return False
    name = Path(path).name.split(".")[0]
    return Path(path).parent == Path(tempfile.gettempdir()) and re.fullmatch(r"tmp[a-z0-9_]{8}", name) is not None


def shown_name(path: str) -> str:
    """What answers say for an input: "the uploaded file" for an upload, else the file's name (no server path)."""
    return f"the uploaded file ({''.join(Path(path).suffixes)})" if is_upload(path) else Path(path).name


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
