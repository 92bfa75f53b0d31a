"""A small HTTP server shaped like MONAI Label's REST API (``GET /info``, ``POST /infer/{model}``).

It is *MONAI-Label-shaped*, not a MONAI Label app: ``pip install monailabel==0.8.5`` would downgrade numpy
(2.x -> 1.26.4), jsonschema (4.x -> 3.2.0, below our test pin) and pandas, and build ``sam2`` from source,
so the two routes a MONAI Label client uses for inference are served by FastAPI + uvicorn instead. See
:func:`create_app`.

Routes:

* ``GET /info`` -> ``{"name", "version", "description", "labels", "models": {name: {"type", "labels",
  "dimension", "description", ...}}, "limits": {...}}``.
* ``POST /infer/{model}`` (multipart): ``file`` = the image (PNG, JPEG, BMP, TIFF; NIfTI ``.nii``/``.nii.gz``
  volume), ``params`` = a JSON string ``{"prompts": ["polyp", ...], "box": [x1, y1, x2, y2] (optional, 2D,
  one for all prompts or one per prompt), "protocol": "top_query"|"threshold"|"semantic" (optional, 2D),
  "modality": "CT"|... (optional)}``. Query ``output``:

  - ``file`` (default) or ``image``: the mask file (PNG of the input's size for 2D: one prompt 0/255, several
    prompts labels 1..P; ``.nii.gz`` with the input's affine for volumes), the result JSON (labels -> prompt,
    score, pixel count; protocol; shape) in the ``X-MedSAM3-Result`` header;
  - ``json``: ``{"result": {...}, "mask": base64 of the file, "mask_format": "png"|"nii.gz",
    "media_type": ...}``.

Every error is a JSON body ``{"error": "..."}`` with a 4xx status (500 only for a bug); the server keeps
serving. Uploads are saved under a fresh temporary folder with a server-chosen name (only the extension of
the client's file name is kept, from a whitelist) and removed after the request. Inference runs under one
lock (one model), so concurrent requests queue.
"""

# no `from __future__ import annotations`: FastAPI resolves the endpoints' annotations at runtime

import base64
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MODEL_NAME", "ServerLimits", "UPLOAD_SUFFIXES", "create_app"]

MODEL_NAME = "medsam3"
RESULT_HEADER = "X-MedSAM3-Result"
#: accepted upload extensions -> kind (the only part of a client's file name that is used)
UPLOAD_SUFFIXES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".bmp": "image", ".tif": "image",
                   ".tiff": "image", ".nii": "volume", ".nii.gz": "volume"}
OUTPUTS = ("file", "image", "json")


class ServerLimits:
    """What one request may hold (checked before inference)."""

    def __init__(self, max_request_bytes: int = 64 * 2**20, max_image_pixels: int = 50_000_000,
                 max_prompt_chars: int = 200, max_prompts: int = 16) -> None:
        for name, value in (("max_request_bytes", max_request_bytes), ("max_image_pixels", max_image_pixels),
                            ("max_prompt_chars", max_prompt_chars), ("max_prompts", max_prompts)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.max_request_bytes = int(max_request_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.max_prompt_chars = int(max_prompt_chars)
        self.max_prompts = min(int(max_prompts), 255)

    def as_dict(self) -> dict[str, int]:
        return {"max_request_bytes": self.max_request_bytes, "max_image_pixels": self.max_image_pixels,
                "max_prompt_chars": self.max_prompt_chars, "max_prompts": self.max_prompts}


class RequestError(Exception):
    """A client error: status (4xx) and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------------------ middleware
class _GuardMiddleware:
    """Pure ASGI: bearer token and request size, checked before the body is read.

    POST bodies must declare ``Content-Length`` (411 otherwise) no larger than the limit (413); a body longer
    than declared is cut off (the request then fails as a disconnect)."""

    def __init__(self, app: Any, token: str | None, max_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is not None:
            import hmac

            given = headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                await _send_json(send, 401, {"error": "missing or wrong token: send 'Authorization: Bearer TOKEN'"},
                                 extra=[(b"www-authenticate", b"Bearer")])
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                await _send_json(send, 411, {"error": "send the body with a Content-Length (no chunked uploads)"})
                return
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, {"error": f"bad Content-Length {length!r}"})
                return
            if declared > self.max_bytes:
                await _send_json(send, 413, {"error": f"request of {declared} bytes exceeds the server's limit of "
                                                      f"{self.max_bytes} bytes (--max-request-mb)"})
                return
            seen = 0

            async def limited_receive() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > declared:
                        return {"type": "http.disconnect"}
                return message

            await self.app(scope, limited_receive, send)
            return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, body: dict, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------------------ helpers
def upload_suffix(filename: str | None) -> str:
    """The whitelisted extension of a client's file name (nothing else of the name is used)."""
    name = (filename or "").strip().lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    if suffix not in UPLOAD_SUFFIXES:
        raise RequestError(415, f"unsupported file type {suffix or '(no extension)'!r}: upload "
                                f"{', '.join(UPLOAD_SUFFIXES)}")
    return suffix


def parse_params(text: str | None, limits: ServerLimits) -> dict[str, Any]:
    """The ``params`` form field -> {"prompts": [...], "box", "protocol", "modality"}; 422 on anything wrong."""
    from ..protocol_registry import PROTOCOLS

    if text is None or not text.strip():
        raise RequestError(422, "missing 'params': give a JSON string such as {\"prompts\": [\"polyp\"]}")
    if len(text) > 64 * 1024:
        raise RequestError(422, "'params' is too long (64 KiB at most)")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(422, f"'params' is not valid JSON: {err}") from None
    if not isinstance(params, dict):
        raise RequestError(422, "'params' must be a JSON object like {\"prompts\": [\"polyp\"]}")
    unknown = sorted(set(params) - {"prompts", "prompt", "box", "protocol", "modality"})
    if unknown:
        raise RequestError(422, f"unknown params {unknown}: use prompts, box, protocol, modality")
    prompts = params.get("prompts", params.get("prompt"))
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError(422, "'prompts' must be a non-empty list of texts, e.g. [\"polyp\"]")
    if len(prompts) > limits.max_prompts:
        raise RequestError(422, f"{len(prompts)} prompts: at most {limits.max_prompts} per request")
    for text_prompt in prompts:
        if not isinstance(text_prompt, str) or not text_prompt.strip():
            raise RequestError(422, "every prompt must be a non-empty text")
        if len(text_prompt) > limits.max_prompt_chars:
            raise RequestError(422, f"a prompt of {len(text_prompt)} characters: at most "
                                    f"{limits.max_prompt_chars} (--max-prompt-chars)")
    protocol = params.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise RequestError(422, f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    modality = params.get("modality")
    if modality is not None and (not isinstance(modality, str) or len(modality) > 64):
        raise RequestError(422, "'modality' must be a short text such as CT, MRI, endoscopy")
    box = params.get("box")
    if box is not None:
        flat = isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
        nested = isinstance(box, list) and box and all(
            b is None or (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)) for b in box)
        if not (flat or nested):
            raise RequestError(422, "'box' must be [x1, y1, x2, y2] in pixels, or one such box per prompt")
    return {"prompts": [p.strip() for p in prompts], "box": box, "protocol": protocol, "modality": modality}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def image_size(path: Path, kind: str) -> tuple[int, ...]:
    """The upload's spatial shape from its header only (no pixel data read); 422 when unreadable."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as image:
                width, height = image.size
                frames = int(getattr(image, "n_frames", 1) or 1)
            return (height, width) if frames == 1 else (frames, height, width)
        import nibabel as nib

        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable upload
        message = str(err).replace(str(path), f"upload{upload_suffix(path.name)}")
        raise RequestError(422, f"cannot read the uploaded file: {type(err).__name__}: {message}") from None


def _os_error(err: BaseException) -> BaseException | None:
    """A decoder's OSError (truncated / corrupt file) inside MONAI's transform wrappers, else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# ------------------------------------------------------------------------------------------------ app
def create_app(predictor: Any, *, token: str | None = None, limits: ServerLimits | None = None,
               model_name: str = MODEL_NAME, version: str | None = None):
    """The FastAPI app serving ``predictor`` (a :class:`~medsam3_monai.inferers.predict.Predictor`).

    Args:
        predictor: the loaded model; calls are serialised by a lock.
        token: when given, every request needs ``Authorization: Bearer <token>`` (401 otherwise).
        limits: request size, pixel count and prompt limits.
        model_name: the name under ``/infer/{model}``.
    """
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    from ..inferers.inputs import box_prompts, user_error
    from ..protocol_registry import PROTOCOLS
    from .segment_cli import output_labels, write_label_volume, write_mask_image

    limits = limits or ServerLimits()
    version = version or __version__
    lock = threading.Lock()
    app = FastAPI(title="medsam3-monai", version=version, docs_url=None, redoc_url=None, openapi_url=None,
                  description="MONAI-Label-shaped inference server for Medical SAM3 (not a MONAI Label app)")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = "not found: the routes are GET /info and POST /infer/{model}" if err.status_code == 404 else str(
            err.detail)
        return JSONResponse({"error": message}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    model_info = {
        "type": "segmentation",
        "labels": "free text: each prompt of 'params.prompts' becomes label value 1..P (one prompt: 0/255 PNG)",
        "prompts": "params = {\"prompts\": [text, ...], \"box\": [x1, y1, x2, y2] (2D, optional), "
                   "\"protocol\": " + "|".join(PROTOCOLS) + " (2D, optional), \"modality\": optional}",
        "dimension": [2, 3],
        "description": "Medical SAM3 text-prompted segmentation: 2D images -> PNG mask, NIfTI volumes -> NIfTI "
                       "label map, both in the input's geometry",
        "checkpoint": str(getattr(predictor, "checkpoint", "")),
        "image_size": int(getattr(getattr(predictor, "network", None), "image_size", 0) or 0),
        "inputs": sorted(UPLOAD_SUFFIXES),
        "outputs": {"file": "mask file, result JSON in the " + RESULT_HEADER + " header",
                    "json": "JSON with the result and the base64 mask file"},
    }

    @app.get("/info")
    @app.get("/info/")
    def info() -> dict[str, Any]:
        return {"name": "MedSAM3 (medsam3-monai)", "version": version,
                "description": "MONAI-Label-shaped REST API (GET /info, POST /infer/{model}); not a MONAI Label app",
                "labels": [], "models": {model_name: model_info}, "limits": limits.as_dict()}

    @app.post("/infer/{model}")
    def infer(model: str, file: UploadFile | None = File(None), params: str | None = Form(None),
              output: str = Query("file")) -> Response:
        if model != model_name:  # compared only, never used as a path
            raise RequestError(404, f"unknown model {model[:64]!r}: this server has {model_name!r} (see GET /info)")
        if output not in OUTPUTS:
            raise RequestError(422, f"output {output[:32]!r}: choose file, image or json")
        if file is None:
            raise RequestError(422, "missing multipart field 'file' (the image or volume to segment)")
        suffix = upload_suffix(file.filename)
        kind = UPLOAD_SUFFIXES[suffix]
        request = parse_params(params, limits)
        if kind == "volume" and (request["box"] is not None or request["protocol"] not in (None, "top_query")):
            raise RequestError(422, "box prompts and protocols are for 2D images; send volumes with prompts only")
        folder = Path(tempfile.mkdtemp(prefix="medsam3-serve-"))
        try:
            upload = folder / f"input{suffix}"
            with open(upload, "wb") as out:
                shutil.copyfileobj(file.file, out, 1 << 20)
            if upload.stat().st_size == 0:
                raise RequestError(422, "the uploaded file is empty")
            shape = image_size(upload, kind)
            pixels = 1
            for s in shape[:3]:
                pixels *= int(s)
            if pixels > limits.max_image_pixels:
                raise RequestError(413, f"image of {'x'.join(map(str, shape))} = {pixels} pixels exceeds the "
                                        f"server's limit of {limits.max_image_pixels} (--max-image-pixels)")
            if kind == "image" and len(shape) != 2:
                raise RequestError(422, "multi-frame images are not supported: upload one 2D picture")
            if request["box"] is not None:
                try:
                    box_prompts(request["box"], len(request["prompts"]), shape)
                except ValueError as err:
                    raise RequestError(422, str(err)) from None
            prediction = _predict(upload, request)
            labels, summary = output_labels(prediction)
            summary.update(input=f"upload{suffix}", model=model_name)
            if prediction.is_volume:
                mask_path, media_type, mask_format = folder / "mask.nii.gz", "application/gzip", "nii.gz"
                write_label_volume(labels, prediction.affine.numpy(), mask_path, reference=upload)
            else:
                mask_path, media_type, mask_format = folder / "mask.png", "image/png", "png"
                write_mask_image(labels, mask_path, "PNG")
            data = mask_path.read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        summary["mask_format"] = mask_format
        if output == "json":
            return JSONResponse({"result": summary, "mask": base64.b64encode(data).decode("ascii"),
                                 "mask_format": mask_format, "media_type": media_type})
        return Response(content=data, media_type=media_type, headers={
            RESULT_HEADER: json.dumps(summary, separators=(",", ":"), ensure_ascii=True),
            "Content-Disposition": f'attachment; filename="mask.{mask_format}"'})

    def _predict(upload: Path, request: dict[str, Any]) -> Any:
        with lock:  # one model, one request at a time; the protocol travels with the request
            try:
                return predictor(upload, request["prompts"], box=request["box"], modality=request["modality"],
                                 protocol=request["protocol"])
            except (ValueError, FileNotFoundError) as err:
                raise RequestError(422, str(err).replace(str(upload), f"upload{upload_suffix(upload.name)}")) from None
            except RuntimeError as err:
                cause = user_error(err) or _os_error(err)
                if cause is None:
                    raise
                raise RequestError(422, str(cause).replace(str(upload), "upload")) from None
            except OSError as err:  # decoders: truncated or corrupt data
                raise RequestError(422, f"cannot read the uploaded file: {err}".replace(str(upload), "upload")) from None

    return _GuardMiddleware(app, token, limits.max_request_bytes)
