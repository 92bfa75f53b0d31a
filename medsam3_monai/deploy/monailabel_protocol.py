"""The MONAI Label wire protocol as ``medsam3 serve`` speaks it: request parameters, result formats and answers.

Written from MONAI Label 0.8.5's client (``monailabel/client/client.py``) and server endpoints; nothing here
imports monailabel. What a MONAI Label client sends and expects:

* ``POST /infer/{model}?image=ID[&session_id=S][&output=image|json|all]``, multipart ``params`` (a JSON object;
  the Python client always adds ``client_id``, OHIF adds ``result_extension``, ``result_dtype``,
  ``result_compress`` and ``restore_label_idx``, 3D Slicer sends back the model's ``config`` values) and
  optionally ``file`` (the image itself, used instead of ``image``).
* The answer for ``output=all`` (and no ``output``): ``multipart/form-data`` with a ``params`` part (the result
  JSON) and an ``image`` part whose *filename* the client keeps (so it carries the extension);
  ``output=image``: the label file alone; ``output=json``: the result JSON alone.

Text prompts travel as params (:class:`InferParams`); the result JSON names each label value by its prompt
(``label_names``, as MONAI Label's infer tasks do), which is how Slicer and OHIF name segments. The agent model
(``POST /infer/medsam3_agent``) takes a free-text request instead (:class:`AgentParams`).
"""

# no `from __future__ import annotations`: pydantic resolves the field annotations at runtime

import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      ValidationInfo, field_validator, model_validator)

__all__ = ["AgentParams", "InferParams", "LabelInferParams", "ParamsError", "ResultType", "label_names",
           "multipart_answer", "parse_agent_params", "parse_infer_params", "parse_label_params", "result_format",
           "write_result"]

#: the params a MONAI Label client adds on its own (accepted; only the result_* ones change the answer)
CLIENT_PARAMS = ("client_id", "result_extension", "result_dtype", "result_compress", "restore_label_idx")
MAX_PARAMS_CHARS = 64 * 1024

#: result extension -> writer, per input kind (the first one is the default, as ``medsam3 segment`` writes it)
IMAGE_RESULTS = {".png": "picture", ".bmp": "picture", ".tif": "picture", ".tiff": "picture", ".nrrd": "itk",
                 ".nii.gz": "itk", ".nii": "itk"}
VOLUME_RESULTS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "itk"}
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "float32")
MEDIA_TYPES = {".png": "image/png", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
               ".nii.gz": "application/gzip", ".nii": "application/octet-stream",
               ".nrrd": "application/octet-stream"}


class ResultType(str, enum.Enum):
    """``?output=``: MONAI Label's result types (``file`` is this server's older name for ``image``)."""

    image = "image"
    json = "json"
    all = "all"
    dicom_seg = "dicom_seg"
    file = "file"


class ParamsError(ValueError):
    """Bad ``params``: the message says what to send instead."""


_Coord = StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)]
_Box = Annotated[list[_Coord], Field(min_length=4, max_length=4)]

#: what to say when a field has the wrong type (pydantic's own words name union members, not the fix)
_FIELD_HINTS = {
    "prompts": "'prompts' must be a non-empty list of texts, e.g. [\"polyp\"] (or one comma-separated text)",
    "labels": "'labels' must be a non-empty list of the model's label names (or one comma-separated text)",
    "score_threshold": "'score_threshold' must be a number in [0, 1]",
    "device": "'device' must be a text such as cpu or cuda",
    "box": "'box' must be [x1, y1, x2, y2] in pixels, or one such box per prompt",
    "modality": "'modality' must be a short text such as CT, MRI, endoscopy",
    "protocol": "'protocol' must be a text",
    "client_id": "'client_id' must be a text",
    "result_extension": "'result_extension' must be a text such as .nii.gz or .nrrd",
    "result_dtype": f"'result_dtype' must be one of {', '.join(RESULT_DTYPES)}",
    "result_compress": "'result_compress' must be true or false",
    "restore_label_idx": "'restore_label_idx' must be true or false",
    "request": "'request' must be a text, e.g. \"segment the polyp\"",
    "trace": "'trace' must be true or false",
    "largest_cc": "'largest_cc' must be true or false",
}


def _renamed(data: dict[str, Any], name: str, aliases: Sequence[str]) -> dict[str, Any]:
    """A copy of the params ``data`` with each alias of ``name`` renamed to it; giving both is an error."""
    data = dict(data)
    for alias in aliases:
        if alias in data:
            if name in data:
                raise ValueError(f"give '{name}' or '{alias}', not both")
            data[name] = data.pop(alias)
    return data


class _ClientParams(BaseModel):
    """What every model's ``params`` share: unknown keys refused, the options MONAI Label clients add on their own
    (``CLIENT_PARAMS``), blank options (3D Slicer sends empty texts for options left blank) meaning "not given",
    the input's ``modality``, the request's ``score_threshold``, and the checks of ``protocol`` (declared by each
    model) and of the result format."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    client_id: StrictStr | None = Field(None, max_length=256, description="the client's id (logged, not used)")
    result_extension: StrictStr | None = Field(None, description="label file format: .nii.gz, .nii, .nrrd; 2D: .png")
    result_dtype: StrictStr | None = Field(None, description="label file data type, e.g. uint8 (default), uint16")
    result_compress: StrictBool = Field(False, description="gzip the NRRD data")
    restore_label_idx: StrictBool = Field(False, description="accepted; label values always follow prompt order")
    modality: Annotated[StrictStr, Field(max_length=64)] | None = Field(
        None, description="intensity rule: CT, MRI, X-ray, ultrasound, endoscopy, ...")
    largest_cc: StrictBool = Field(False, description="keep each label's largest connected component (MONAI "
                                                      "Label's option of its SAM2 model)")
    score_threshold: Annotated[StrictInt | StrictFloat, Field(ge=0, le=1)] | None = Field(
        None, description="this request's score threshold: the query score of the threshold and top_query_floor "
                          "protocols, and the detection score of volumes (default: the server's)")

    @model_validator(mode="before")
    @classmethod
    def _blank_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: None if key in _BLANK_MEANS_NONE and isinstance(value, str) and not value.strip() else value
                for key, value in data.items()}

    @field_validator("largest_cc", mode="before")
    @classmethod
    def _text_is_a_bool(cls, value: Any) -> Any:
        """``"true"`` / ``"false"`` (and MONAI Label's other ``strtobool`` words) as clients send a config flag;
        blank: not given."""
        if isinstance(value, str):
            word = value.strip().lower()
            if not word:
                return False
            if word in ("y", "yes", "t", "true", "on", "1", "n", "no", "f", "false", "off", "0"):
                return word in ("y", "yes", "t", "true", "on", "1")
        return value

    @field_validator("score_threshold", mode="before")
    @classmethod
    def _text_is_a_number(cls, value: Any) -> Any:
        """A number written as text (``"0.1"``, as a viewer may send an option back) as that number."""
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                return value  # refused below, with the field's hint
        return value

    @field_validator("score_threshold")
    @classmethod
    def _no_negative_zero(cls, value: float | None) -> float | None:
        return None if value is None else value + 0.0  # -0.0 -> 0.0

    @field_validator("protocol", check_fields=False)
    @classmethod
    def _check_protocol(cls, protocol: str | None) -> str | None:
        return _valid_protocol(protocol)

    @field_validator("result_extension")
    @classmethod
    def _check_extension(cls, extension: str | None) -> str | None:
        return _valid_extension(extension)

    @field_validator("result_dtype")
    @classmethod
    def _check_dtype(cls, dtype: str | None) -> str | None:
        return _valid_dtype(dtype)


_BLANK_MEANS_NONE = ("protocol", "modality", "result_extension", "result_dtype", "score_threshold")


class InferParams(_ClientParams):
    """The ``params`` of ``POST /infer/{model}`` (unknown keys are refused, so a typo is not silently ignored).

    Prompts and their limits (``context={"max_prompts": P, "max_prompt_chars": C}``) are checked here; a box's
    fit to the image and a protocol's fit to the input kind are checked once the image is known.
    """

    prompts: Annotated[list[StrictStr], Field(min_length=1)] = Field(
        description="text prompts; label value i (1..P) belongs to prompt i (one prompt on a 2D image: 0/255)")
    box: _Box | Annotated[list[_Box | None], Field(min_length=1)] | None = Field(
        None, description="2D only: [x1, y1, x2, y2] in pixels for every prompt, or one per prompt (null: none)")
    protocol: StrictStr | None = Field(None, description="2D: top_query (default), top_query_floor, threshold or "
                                                       "semantic")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """``prompt`` is accepted for ``prompts``; a text is split at its commas."""
        return _one_prompt_is_a_list(data)

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str], info: ValidationInfo) -> list[str]:
        return _checked_prompts(prompts, info)


def _one_prompt_is_a_list(data: Any) -> Any:
    """``prompt`` is accepted for ``prompts``; a text is split at its commas (``"liver, spleen"``: two prompts, as
    3D Slicer's options table sends a text); a list is taken as it is (a prompt holding a comma)."""
    if not isinstance(data, dict):
        return data
    data = _renamed(data, "prompts", ("prompt",))
    if isinstance(data.get("prompts"), str):
        data["prompts"] = [text.strip() for text in data["prompts"].split(",") if text.strip()]
    return data


def _checked_prompts(prompts: list[str], info: ValidationInfo) -> list[str]:
    """Prompts within the limits of ``info.context`` (``max_prompts``, ``max_prompt_chars``), stripped."""
    context = info.context or {}
    max_prompts = int(context.get("max_prompts", 255))
    max_chars = int(context.get("max_prompt_chars", 200))
    if len(prompts) > max_prompts:
        raise ValueError(f"{len(prompts)} prompts: at most {max_prompts} per request")
    for text in prompts:
        if not text.strip():
            raise ValueError("every prompt must be a non-empty text")
        if len(text) > max_chars:
            raise ValueError(f"a prompt of {len(text)} characters: at most {max_chars} (--max-prompt-chars)")
    return [text.strip() for text in prompts]


class LabelInferParams(_ClientParams):
    """The ``params`` of the MONAI Label app's model (``apps/monailabel_medsam3``), whose labels are its text
    prompts: every label by default, a subset (``labels``) or ad-hoc ``prompts`` instead. Unknown keys are refused;
    what 3D Slicer sends back from the model's config is accepted (``concepts`` and ``checkpoint`` are informational
    and not used). The app removes the keys MONAI Label's server adds itself (``MONAI_LABEL_REQUEST_KEYS``)."""

    labels: Annotated[list[StrictStr], Field(min_length=1)] | None = Field(
        None, description="a subset of the model's label names, keeping their label values")
    prompts: Annotated[list[StrictStr], Field(min_length=1)] | None = Field(
        None, description="ad-hoc text prompts instead of the labels; label value i (1..P) belongs to prompt i")
    box: _Box | Annotated[list[_Box | None], Field(min_length=1)] | None = Field(
        None, description="2D only: [x1, y1, x2, y2] in pixels for every prompt, or one per prompt (null: none)")
    protocol: StrictStr | None = Field(None, description="2D: top_query (default), top_query_floor, threshold or "
                                                       "semantic")
    device: StrictStr | None = Field(None, description="MONAI Label's device name (cuda falls back to the CPU)")
    concepts: Any = Field(None, description="informational (the model's label -> prompt), not used")
    checkpoint: Any = Field(None, description="informational (the server's checkpoint), not used")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        data = _one_prompt_is_a_list(data)
        if isinstance(data, dict) and isinstance(data.get("labels"), str):  # "polyp,instrument"
            data["labels"] = [name.strip() for name in data["labels"].split(",") if name.strip()]
        if isinstance(data, dict) and data.get("labels") is not None and data.get("prompts") is not None:
            raise ValueError("give 'labels' (names of the model's labels) or 'prompts' (texts), not both")
        return data

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if prompts is None else _checked_prompts(prompts, info)



#: what MONAI Label's server puts into an infer request beside the client's params (endpoint and app)
MONAI_LABEL_REQUEST_KEYS = ("model", "image", "description", "save_label", "label_tag", "session", "label",
                            "timeout")


def _valid_protocol(protocol: str | None) -> str | None:
    from ..protocol_registry import PROTOCOLS

    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol[:64]!r}: choose one of {', '.join(PROTOCOLS)}")
    return protocol


def _valid_extension(extension: str | None) -> str | None:
    if extension is None:
        return None
    extension = extension.strip().lower()
    extension = extension if extension.startswith(".") else f".{extension}"
    if extension not in IMAGE_RESULTS and extension not in VOLUME_RESULTS:
        raise ValueError(f"result_extension {extension[:32]!r}: choose one of "
                         f"{', '.join(dict.fromkeys([*VOLUME_RESULTS, *IMAGE_RESULTS]))}")
    return extension


def _valid_dtype(dtype: str | None) -> str | None:
    if dtype is not None and dtype.strip().lower() not in RESULT_DTYPES:
        raise ValueError(f"result_dtype {dtype[:32]!r}: choose one of {', '.join(RESULT_DTYPES)}")
    return None if dtype is None else dtype.strip().lower()


class AgentParams(_ClientParams):
    """The ``params`` of ``POST /infer/medsam3_agent``: the MedSAM3 agent answers a free-text request (unknown keys
    are refused). The planner (an OpenAI-compatible MLLM, or the offline planner) is the server's, set on its
    command line; a request cannot name an endpoint or a key.

    The request's length limit comes with ``context={"max_request_chars": C}``.
    """

    request: StrictStr = Field(description="what to segment, in words, e.g. 'segment the lesion in the upper left "
                                           "quadrant'")
    protocol: StrictStr | None = Field(None, description="2D: the protocol of MedSAM3's masks (top_query default)")
    trace: StrictBool = Field(False, description="add the agent's trace (messages without images, tool calls, "
                                                 "marks, timings) to the result JSON")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """``prompt`` / ``text`` are accepted for ``request``."""
        if not isinstance(data, dict):
            return data
        if "prompts" in data and "request" not in data:
            raise ValueError("the agent model takes a free-text 'request' (e.g. {\"request\": \"segment the polyp\"}), "
                             "not 'prompts' (those are for the medsam3 model)")
        return _renamed(data, "request", ("prompt", "text"))

    @field_validator("request")
    @classmethod
    def _check_request(cls, request: str, info: ValidationInfo) -> str:
        max_chars = int((info.context or {}).get("max_request_chars", 1000))
        request = " ".join(request.split())
        if not request:
            raise ValueError("'request' is empty: say what to segment, e.g. \"segment the polyp\"")
        if len(request) > max_chars:
            raise ValueError(f"a request of {len(request)} characters: at most {max_chars}")
        return request


def parse_infer_params(text: str | None, max_prompts: int, max_prompt_chars: int) -> InferParams:
    """The ``params`` form field (a JSON object) -> :class:`InferParams`; :class:`ParamsError` when wrong."""
    data = _params_object(text, '{"prompts": ["polyp"]}')
    try:
        return InferParams.model_validate(data, context={"max_prompts": max_prompts,
                                                         "max_prompt_chars": max_prompt_chars})
    except ValidationError as err:
        raise ParamsError(_describe(err)) from None


def parse_label_params(data: Mapping[str, Any], max_prompts: int = 255,
                       max_prompt_chars: int = 200) -> LabelInferParams:
    """The MONAI Label app's request (MONAI Label's own keys removed) -> :class:`LabelInferParams`;
    :class:`ParamsError` when wrong."""
    try:
        return LabelInferParams.model_validate(dict(data), context={"max_prompts": max_prompts,
                                                                    "max_prompt_chars": max_prompt_chars})
    except ValidationError as err:
        raise ParamsError(_describe(err, LabelInferParams)) from None


def parse_agent_params(text: str | None, max_request_chars: int = 1000) -> AgentParams:
    """The agent model's ``params`` form field -> :class:`AgentParams`; :class:`ParamsError` when wrong."""
    data = _params_object(text, '{"request": "segment the polyp"}')
    try:
        return AgentParams.model_validate(data, context={"max_request_chars": max_request_chars})
    except ValidationError as err:
        raise ParamsError(_describe(err, AgentParams)) from None


def _params_object(text: str | None, example: str) -> dict[str, Any]:
    if text is None or not text.strip():
        raise ParamsError(f"missing 'params': give a JSON string such as {example}")
    if len(text) > MAX_PARAMS_CHARS:
        raise ParamsError("'params' is too long (64 KiB at most)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParamsError(f"'params' is not valid JSON: {err}") from None
    except RecursionError:
        raise ParamsError(f"'params' is nested too deeply to read: give a JSON object such as {example}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"'params' must be a JSON object like {example}")
    return data


def _describe(err: ValidationError, model: type[BaseModel] = InferParams) -> str:
    """One line naming every problem: unknown keys together, then each field's problem once."""
    unknown = sorted(str(e["loc"][0]) for e in err.errors() if e["type"] == "extra_forbidden" and e["loc"])
    problems: list[str] = []
    if unknown:
        known = sorted((name for name in model.model_fields if name not in CLIENT_PARAMS),
                       key=lambda name: name in _ClientParams.model_fields)  # the model's own params first
        problems.append(f"unknown params {[u[:64] for u in unknown]}: use {', '.join(known)} "
                        f"(MONAI Label clients may add {', '.join(CLIENT_PARAMS)})")
    seen: set[str] = set()
    for error in err.errors():
        if error["type"] == "extra_forbidden":
            continue
        field = str(error["loc"][0]) if error["loc"] else ""
        if field in seen:
            continue
        seen.add(field)
        if error["type"] == "value_error":
            problems.append(str(error["msg"]).removeprefix("Value error, "))
        elif error["type"] == "missing" and field == "prompts":
            problems.append("missing 'prompts': give a non-empty list of texts, e.g. {\"prompts\": [\"polyp\"]}")
        elif error["type"] == "missing" and field == "request":
            problems.append("missing 'request': say what to segment, e.g. {\"request\": \"segment the polyp\"}")
        else:
            problems.append(_FIELD_HINTS.get(field, f"{field or 'params'}: {error['msg']}"))
    return "; ".join(problems)


# ------------------------------------------------------------------------------------------------ results
def result_format(params: InferParams, is_volume: bool) -> tuple[str, str]:
    """(extension, writer) of the label file for this request; ParamsError for a combination that cannot be
    written (e.g. a NRRD for a 2D picture is fine, a PNG of a volume is not)."""
    table = VOLUME_RESULTS if is_volume else IMAGE_RESULTS
    extension = params.result_extension or next(iter(table))
    if extension not in table:
        kind = "a volume's" if is_volume else "a 2D image's"
        raise ParamsError(f"result_extension {extension!r}: {kind} labels are written as {', '.join(table)}")
    writer = table[extension]
    if writer == "picture" and params.result_dtype not in (None, "uint8"):
        raise ParamsError(f"result_dtype {params.result_dtype!r}: {extension} masks are uint8; ask for "
                          "result_extension .nrrd or .nii.gz for other data types")
    return extension, writer


def write_result(labels: Any, prediction: Any, params: InferParams, path: Path, reference: Path) -> str:
    """Write the label array as ``medsam3 segment`` does (same values, the input's geometry) in the requested
    format and data type; returns the media type. ``path`` must end with the extension of :func:`result_format`.

    2D pictures: PNG/BMP/TIFF of the input's size. NIfTI volumes: the input's affine and qform/sform codes.
    NRRD (and 2D NIfTI): ITK's writer, the affine converted from RAS to ITK's LPS as MONAI does."""
    import numpy as np

    from .segment_cli import IMAGE_OUTPUTS, write_label_volume, write_mask_image

    extension, writer = result_format(params, prediction.is_volume)
    if not str(path).lower().endswith(extension):
        raise ValueError(f"{path.name}: expected a name ending in {extension}")
    dtype = params.result_dtype
    array = np.asarray(labels)
    if writer == "picture":
        write_mask_image(array, path, IMAGE_OUTPUTS[extension])
    elif writer == "nifti":
        write_label_volume(array, prediction.affine.numpy(), path, reference=reference)
        written = "uint8" if array.size == 0 or array.max() <= 255 else "int32"  # write_label_volume's choice
        if dtype is not None and dtype != written:
            _recast_nifti(path, dtype)
    else:
        _write_itk(array, prediction, path, dtype or "uint8", params.result_compress)
    return MEDIA_TYPES[extension]


def _recast_nifti(path: Path, dtype: str) -> None:
    """Rewrite a NIfTI file with another data type, keeping its header (geometry codes, units)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    data = np.asarray(image.dataobj).astype(dtype)
    header = image.header.copy()
    header.set_data_dtype(dtype)
    nib.save(nib.Nifti1Image(data, image.affine, header), str(path))


def _write_itk(array: Any, prediction: Any, path: Path, dtype: str, compress: bool) -> None:
    import numpy as np

    if prediction.is_volume:
        from monai.data import ITKWriter

        # (X, Y, Z) label map with MONAI's RAS affine -> ITK image in LPS (what MONAI Label writes for OHIF)
        writer = ITKWriter(output_dtype=np.dtype(dtype), affine_lps_to_ras=True)
        writer.set_data_array(array, channel_dim=None)
        affine = prediction.affine.numpy()
        writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
        writer.write(str(path), compression=bool(compress))
        return
    import itk

    # a 2D mask (H, W), rows first: ITK's array view is (rows, columns) too
    image = itk.image_from_array(np.ascontiguousarray(array.astype(dtype)))
    itk.imwrite(image, str(path), compression=bool(compress))


def label_names(summary: Mapping[str, Any]) -> dict[str, int]:
    """prompt -> label value, MONAI Label's ``label_names`` (3D Slicer and OHIF name the segments with it)."""
    return {entry["prompt"]: int(value) for value, entry in summary.get("labels", {}).items()}


def multipart_answer(params: Mapping[str, Any], data: bytes, extension: str,
                     media_type: str) -> tuple[bytes, str]:
    """MONAI Label's ``output=all`` answer: a ``params`` part (JSON) and an ``image`` part (the label file).

    The client saves the image part under its file name, so the name is unique and carries the extension."""
    boundary = uuid.uuid4().hex
    filename = f"{uuid.uuid4().hex}{extension}"
    body = b"".join([
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
        f"Content-Type: application/json\r\n\r\n".encode(),
        json.dumps(params, separators=(",", ":")).encode(),
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {media_type}\r\n\r\n".encode(),
        data,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    return body, f"multipart/form-data; boundary={boundary}"
