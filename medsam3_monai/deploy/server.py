"""``medsam3 serve``: an HTTP server speaking MONAI Label's REST protocol for what a client does with a model.

The unmodified MONAI Label client (``monailabel.client.MONAILabelClient``), 3D Slicer's MONAI Label module and
OHIF's MONAI Label plugin work against it. It is not a MONAI Label app: ``pip install monailabel==0.8.5`` would
downgrade numpy (2.x -> 1.26.4), jsonschema (4.x -> 3.2.0) and pandas and build ``sam2`` from source, so the
routes are served by FastAPI + uvicorn here, written from MONAI Label's endpoints (nothing imports monailabel).
Protocol details: :mod:`medsam3_monai.deploy.monailabel_protocol`; stored uploads:
:mod:`medsam3_monai.deploy.datastore`; the guide: ``bundles/medsam3/docs/monailabel.md``.

Routes (``{model}`` is ``medsam3``, or ``medsam3_agent`` for the MedSAM3 agent: params ``{"request": "segment the
lesion in the upper left quadrant", "modality", "protocol", "score_threshold", "trace"}``, answered with one label,
the union of the marks the planner selects; the planner is the server's, ``medsam3 serve
--llm-url/--llm-model/--api-key-env``, default the offline planner):

* ``GET /info/``: name, version, ``labels`` (a mapping), ``models: {medsam3: {type, labels (a mapping, empty:
  the labels are each request's prompts, named in the answer's ``label_names``), dimension, description,
  config}}``,
  ``strategies``, ``trainers`` (none), ``datastore`` stats and this server's ``limits``.
* ``POST /infer/{model}``: multipart ``params`` = JSON ``{"prompts": [...], "box", "protocol", "score_threshold",
  "modality"}`` (``score_threshold``: this request's, default the server's ``--score-threshold``; plus
  what MONAI Label clients add: ``client_id``, ``result_extension``, ``result_dtype``, ``result_compress``,
  ``restore_label_idx``) and the image as ``file`` (PNG, JPEG, BMP, TIFF, GIF, PPM, NIfTI), or ``?image=ID`` of an
  uploaded image, or ``?session_id=``. ``?output=all`` (default): multipart ``params`` (result JSON) + ``image`` (the
  label file); ``image`` (or ``file``): the label file, result JSON in the ``X-MedSAM3-Result`` header; ``json``: the
  result JSON. The label file is what ``medsam3 segment`` writes (2D: PNG of the input's size, one prompt 0/255,
  several 1..P; volumes: NIfTI labels 1..P with the input's affine), or ``result_extension``/``result_dtype``.
* ``/datastore/``: ``GET`` (stats, ``?output=all|train``), ``PUT /datastore/?image=ID`` (or ``/datastore/image``)
  upload, ``GET /datastore/image?image=ID``, ``GET /datastore/image/info?image=ID``, ``DELETE /datastore/?id=ID``,
  ``PUT|GET|DELETE /datastore/label``. ``POST /activelearning/{first|random}``: the next image without a label.
* ``/session/``: ``PUT`` (one file) -> ``{"session_id", "session_info"}``, ``GET|DELETE /session/{id}``.
* ``GET /auth/`` -> ``{"enabled": ...}``; ``POST /auth/token`` (OAuth2 password form: any username, the server's
  token as password) -> ``{"access_token", "token_type": "bearer"}``; ``GET /auth/token/valid``.
* ``GET /train/`` -> 404 (no training tasks: this server does not train).

With a token every route but ``/auth/`` and ``/auth/token`` needs ``Authorization: Bearer TOKEN`` (401); without one,
a loopback server answers only requests addressed to it as ``localhost`` or a loopback address (``127.0.0.1``,
``[::1]``; 403: no DNS rebinding from a web page). With CORS origins, browsers on those origins may call the server
(preflight answered). Every error is a JSON body ``{"error": "..."}`` with a 4xx status (507 when the datastore or
the server's disk is full; 502 when the agent's planner endpoint fails; 500 only for a bug); the server keeps
serving. Uploads are saved under fresh temporary names (only a whitelisted extension of the client's file name is
kept); a NRRD / MetaImage volume is one file (a header naming another data file, which ITK would read from the
server's disk, is refused). Inference runs under one lock (one model), so concurrent requests queue.
"""

# no `from __future__ import annotations`: FastAPI resolves the endpoints' annotations at runtime

import asyncio
import hmac
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .datastore import FINAL_TAG, STRATEGIES, Datastore, StoreError, check_id

__all__ = ["AGENT_MODEL_NAME", "MODEL_NAME", "ServerLimits", "UPLOAD_SUFFIXES", "create_app"]

MODEL_NAME = "medsam3"
AGENT_MODEL_NAME = "medsam3_agent"
RESULT_HEADER = "X-MedSAM3-Result"
#: accepted upload extensions -> kind (the only part of a client's file name that is used)
UPLOAD_SUFFIXES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".bmp": "image", ".tif": "image",
                   ".tiff": "image", ".gif": "image", ".ppm": "image",  # DRIVE's masks, STARE's pictures
                   ".dcm": "image",  # a single-frame DICOM picture (a volume comes as NIfTI, NRRD or MetaImage)
                   ".nii": "volume", ".nii.gz": "volume", ".nrrd": "volume", ".mha": "volume"}
#: labels submitted to the datastore are kept as sent (never read): these extensions
LABEL_SUFFIXES = (*UPLOAD_SUFFIXES, ".nrrd", ".seg.nrrd")
#: routes answered without a token (MONAI Label clients ask them before they have one)
PUBLIC_PATHS = frozenset({"/auth", "/auth/", "/auth/token"})
MAX_INFO_CHARS = 64 * 1024


class ServerLimits:
    """What one request may hold (checked before inference) and what the datastore may keep."""

    def __init__(self, max_request_bytes: int = 64 * 2**20, max_image_pixels: int = 50_000_000,
                 max_prompt_chars: int = 200, max_prompts: int = 16, max_stored_files: int = 1000,
                 max_stored_bytes: int = 2 * 2**30, session_expiry: int = 3600, max_request_chars: int = 1000) -> None:
        for name, value in (("max_request_bytes", max_request_bytes), ("max_image_pixels", max_image_pixels),
                            ("max_prompt_chars", max_prompt_chars), ("max_prompts", max_prompts),
                            ("max_stored_files", max_stored_files), ("max_stored_bytes", max_stored_bytes),
                            ("session_expiry", session_expiry), ("max_request_chars", max_request_chars)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.max_request_bytes = int(max_request_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.max_prompt_chars = int(max_prompt_chars)
        self.max_prompts = min(int(max_prompts), 255)
        self.max_stored_files = int(max_stored_files)
        self.max_stored_bytes = int(max_stored_bytes)
        self.session_expiry = int(session_expiry)
        self.max_request_chars = int(max_request_chars)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class RequestError(Exception):
    """A client error: status (4xx), message and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# ------------------------------------------------------------------------------------------------ auth
class TokenAuth:
    """Bearer-token authentication on FastAPI's ``OAuth2PasswordBearer`` (token URL ``/auth/token``, as MONAI
    Label's): :meth:`check` rejects a missing or wrong token with 401; with no token configured everything is
    open. The routes declare it as a dependency on :attr:`scheme` (see ``create_app``)."""

    def __init__(self, token: str | None) -> None:
        from fastapi.security import OAuth2PasswordBearer

        self.token = token
        self.scheme = OAuth2PasswordBearer(tokenUrl="auth/token", auto_error=False)

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def check(self, given: str | None) -> None:
        if self.token is None:
            return
        if given is None or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (POST /auth/token "
                                    "with the token as password gives it to MONAI Label clients)",
                               {"WWW-Authenticate": "Bearer"})

    def password_ok(self, password: str) -> bool:
        return self.token is not None and hmac.compare_digest(password.encode(), self.token.encode())


class _GuardMiddleware:
    """Pure ASGI, before any body is read: the ``Host`` (``loopback_only``: a loopback server without a token answers
    only ``localhost`` and loopback addresses, :func:`is_loopback`; 403 for others), the token (the same
    :class:`TokenAuth` check the routes declare, run here too so that an unauthenticated upload is refused unread) and
    the request size.

    It has to stay an ASGI middleware: FastAPI reads (and spools) a multipart body before it runs a route's
    dependencies, and only here can ``Content-Length`` be checked first. POST/PUT/PATCH bodies must declare
    ``Content-Length`` (411 otherwise) no larger than the limit (413); a body longer than declared is cut off
    (the request then fails as a disconnect). CORS preflights never get here (the CORS middleware answers)."""

    def __init__(self, app: Any, auth: TokenAuth, max_bytes: int, loopback_only: bool = False) -> None:
        from starlette.requests import HTTPConnection

        self.app = app
        self.auth = auth
        self.max_bytes = max_bytes
        self.loopback_only = loopback_only
        self.connection = HTTPConnection

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        connection = self.connection(scope)
        if self.loopback_only and not is_loopback(host_name(connection.headers.get("host", ""))):
            if scope.get("method") in ("POST", "PUT", "PATCH") and _sends_body_unasked(connection):
                await _drain(receive, DRAIN_SECONDS)
            await _send_json(send, 403, {"error": f"Host {connection.headers.get('host', '')[:64]!r} is not this "
                                                  "loopback server's name: call it as 127.0.0.1 or localhost (a "
                                                  "web page's DNS-rebinding name is refused); behind a proxy or "
                                                  "from other machines, start it with --token"})
            return
        if self.auth.enabled and scope.get("path") not in PUBLIC_PATHS:
            try:
                self.auth.check(await self.auth.scheme(connection))
            except RequestError as err:
                if scope.get("method") in ("POST", "PUT", "PATCH") and _sends_body_unasked(connection):
                    await _drain(receive, DRAIN_SECONDS)  # as before a 413: the client reads the 401, not a reset
                await _send_json(send, err.status, {"error": err.message},
                                 extra=[(k.lower().encode(), v.encode()) for k, v in err.headers.items()])
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = connection.headers.get("content-length")
            if length is None and "chunked" in connection.headers.get("transfer-encoding", "").lower():
                await _send_json(send, 411, {"error": "send the body with a Content-Length (no chunked uploads)"})
                return
            length = "0" if length is None else length  # neither header: a request without a body (HTTP/1.1)
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, {"error": f"bad Content-Length {length[:32]!r}"})
                return
            if declared > self.max_bytes:
                if _sends_body_unasked(connection):
                    await _drain(receive, DRAIN_SECONDS)
                await _send_json(send, 413, {"error": f"request of {declared} bytes exceeds the server's limit of "
                                                      f"{self.max_bytes} bytes (--max-request-mb)"})
                return
            seen = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + BODY_IDLE_SECONDS + declared / BODY_MIN_RATE

            async def limited_receive() -> dict:
                nonlocal seen
                # a body that stalls or trickles (slowloris) is a disconnect, not a connection held for ever
                wait = min(BODY_IDLE_SECONDS, deadline - loop.time())
                try:
                    if wait <= 0:
                        raise asyncio.TimeoutError
                    message = await asyncio.wait_for(receive(), wait)
                except asyncio.TimeoutError:
                    return {"type": "http.disconnect"}
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > declared:
                        return {"type": "http.disconnect"}
                return message

            await self.app(scope, limited_receive, send)
            return
        await self.app(scope, receive, send)


#: seconds a request body may stall between two reads before the request counts as a disconnect
BODY_IDLE_SECONDS = 30.0
#: bytes per second a request body must average (64 MiB: 22 minutes)
BODY_MIN_RATE = 50_000
#: seconds at most an over-limit body is read and discarded so that the client can read the 413
DRAIN_SECONDS = 30.0
#: a pause of the over-limit body this long ends the discarding (a client waiting for the answer)
DRAIN_IDLE_SECONDS = 2.0


def host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without its port, brackets or final dot: ``[::1]:8000`` ->
    ``::1``."""
    name = header.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    return (name.rpartition(":")[0] if name.count(":") == 1 else name).rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``--host``, or a ``Host`` header's :func:`host_name`) is this machine's loopback interface:
    ``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``), none of which a web page's DNS can rebind."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def _sends_body_unasked(connection: Any) -> bool:
    """Whether the client writes its body without waiting for the server: no ``Expect: 100-continue`` (MONAI
    Label's client, 3D Slicer; curl waits). Refused with its body unread, it sees a reset connection ('Broken pipe'),
    not the answer: the server drains the body first (what nginx's lingering close does)."""
    return "100-continue" not in connection.headers.get("expect", "").lower()


async def _drain(receive: Any, seconds: float) -> None:
    """Read and discard a request body until it ends, the client leaves or pauses (``DRAIN_IDLE_SECONDS``), or
    ``seconds`` pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        left = min(deadline - loop.time(), DRAIN_IDLE_SECONDS)
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_json(send: Any, status: int, body: dict, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------------------ helpers
def upload_suffix(filename: str | None, allowed: Sequence[str] = tuple(UPLOAD_SUFFIXES)) -> str:
    """The whitelisted extension of a client's file name (nothing else of the name is used)."""
    name = (filename or "").strip().lower()
    suffix = next((s for s in sorted(allowed, key=len, reverse=True) if "." in s[1:] and name.endswith(s)), None)
    suffix = suffix or os.path.splitext(name)[1]
    if suffix not in allowed:
        raise RequestError(415, f"unsupported file type {suffix[:16] or '(no extension)'!r}: upload "
                                f"{', '.join(allowed)}")
    return suffix


def image_size(path: Path, kind: str) -> tuple[int, ...]:
    """The upload's spatial shape from its header (no pixel data read; a picture's size whatever PIL's
    decompression-bomb limit: the server's --max-image-pixels is the limit); 422 when unreadable or, as on every
    path (``transforms.io.picture_size``), a multi-frame picture."""
    from ..transforms.errors import DataError

    hidden = f"upload{upload_suffix(path.name)}"
    try:
        if kind == "image":
            from ..transforms.io import picture_size

            width, height = picture_size(path)
            return (height, width)
        if upload_suffix(path.name) in (".nii", ".nii.gz"):
            import nibabel as nib

            return tuple(int(s) for s in nib.load(str(path)).shape)
        return _itk_shape(path)
    except DataError as err:  # a multi-frame picture
        raise RequestError(422, str(err).replace(str(path), hidden)) from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable upload
        raise unreadable_upload(path, err) from None


def unreadable_upload(path: Path, err: BaseException) -> RequestError:
    """The 422 of an upload whose header or data does not decode (named ``upload.<ext>``, never by its path)."""
    hidden = f"upload{upload_suffix(path.name)}"
    message = str(err).replace(str(path), hidden)
    return RequestError(422, f"{hidden} cannot be read ({type(err).__name__}: {message}): it is truncated or corrupt, "
                             "or not what its extension says; upload the whole file")


def _itk_shape(path: Path) -> tuple[int, ...]:
    """A NRRD / MetaImage volume's shape (x, y, z[, components]) from ITK's header reader."""
    import itk

    image_io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise ValueError("ITK cannot read it")
    image_io.SetFileName(str(path))
    image_io.ReadImageInformation()
    shape = tuple(int(image_io.GetDimensions(axis)) for axis in range(image_io.GetNumberOfDimensions()))
    components = int(image_io.GetNumberOfComponents())
    return shape + ((components,) if components > 1 else ())


#: bytes of a NRRD / MetaImage upload's header read for :func:`external_data_file` (real headers are a few KiB)
MAX_HEADER_BYTES = 1 << 20


def external_data_file(path: Path) -> str | None:
    """The separate data file a NRRD / MetaImage upload's header names (NRRD ``data file:`` / ``datafile:``,
    MetaImage ``ElementDataFile`` other than ``LOCAL``: a file name, ``LIST``, a pattern), else None. ITK would
    read that file from the server's own disk -- any file the server may read, another upload included -- so such
    an upload is refused; the header is read up to its end (NRRD: the blank line; MetaImage: ``ElementDataFile``,
    its last field), at most ``MAX_HEADER_BYTES`` (a header that does not end there is refused too).

    Lines are split as ITK's readers split them: NRRD (teem) at ``\\r``, ``\\n`` or ``\\r\\n``; MetaImage (MetaIO) at
    ``\\n``, a field's name ending at its first ``=`` or ``:`` (or a NUL) or a ``\\r``, its value at ``\\n`` only, names
    case-sensitive, a line without a separator running into the next line's value. A header that MetaIO could read
    otherwise than here (such a line, a lone ``\\r``, a field spelt ``elementdatafile``) is refused too."""
    nrrd = upload_suffix(path.name) == ".nrrd"
    with open(path, "rb") as stream:
        head = stream.read(MAX_HEADER_BYTES).decode("latin-1")
    for line in (re.split(r"\r\n|\r|\n", head) if nrrd else head.split("\n"))[:-1]:  # last: cut off, or the data
        if "\r" in line.removesuffix("\r"):  # (a NRRD's lines have none left)
            return "(a carriage return inside a header line)"
        line = line.strip()
        if nrrd:
            if not line:  # the header's end: the data follows in this file
                return None
            key, colon, value = line.partition(":")
            if colon and not value.startswith("=") and key.strip().lower() in ("data file", "datafile"):
                return value.strip() or "(blank)"
        elif line:
            at = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
            if at < 0:  # MetaIO reads on to the next separator: the next line is this one's value
                return f"(a header line without '=': {line[:40]})"
            key, value = line[:at].split("\0")[0].strip(), line[at + 1:].lstrip("=: \t").strip()
            if key.lower() == "elementdatafile":
                if key == "ElementDataFile":
                    return None if value in ("LOCAL", "Local", "local") else value or "(blank)"
                return f"{key} = {value}"
    return f"(no end of its header in the first {MAX_HEADER_BYTES} bytes)"


#: the largest NIfTI ``vox_offset`` (header and extensions, bytes) an upload may have
MAX_NIFTI_OFFSET = 16 * 2**20


def check_nifti_offset(path: Path) -> None:
    """422 when a NIfTI upload's ``vox_offset`` (where its voxels start: header and extensions) is beyond
    ``MAX_NIFTI_OFFSET``, or before the end of its header while its extension flag is set, read from its fixed
    header alone (348 / 540 bytes and the flag's 4, through gzip for a ``.nii.gz``) before nibabel loads it:
    nibabel reads every extension up to that offset (or, with no room for them, up to the end of the file) into
    memory first, so a small ``.nii.gz`` whose extensions inflate to gigabytes would take them. A file that is no
    NIfTI is left to the readers."""
    import nibabel as nib
    from nibabel.openers import Opener

    hidden = f"upload{upload_suffix(path.name)}"
    try:
        with Opener(str(path), "rb") as stream:
            raw = stream.read(nib.Nifti2Header.template_dtype.itemsize + 4)
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable upload
        raise unreadable_upload(path, err) from None
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        try:
            header = klass(raw[:size], check=False)
        except Exception:  # noqa: BLE001 - too short, or not this version
            continue
        if int(header["sizeof_hdr"]) != size:
            continue
        offset = float(header["vox_offset"])
        if not offset <= MAX_NIFTI_OFFSET:  # NaN too
            raise RequestError(422, f"{hidden} puts its voxels {offset:.0f} bytes into the file (vox_offset; a "
                                    f"NIfTI's header and extensions take a few KiB, at most {MAX_NIFTI_OFFSET} "
                                    "are read here): re-save the volume")
        if raw[size:size + 1] not in (b"", b"\0") and offset < size + 4:
            raise RequestError(422, f"{hidden} flags header extensions but its vox_offset ({offset:.0f}) leaves "
                                    "them no room (they would be read up to the end of the file): re-save the "
                                    "volume")


def check_picture_data(path: Path) -> None:
    """422 when a picture upload's pixel data does not decode (a truncated transfer): its header alone reads, so
    without this check the datastore would keep it and only an inference would fail. The size is already within
    the server's limit (the header's, checked first)."""
    from PIL import Image

    from ..transforms.io import dicom_picture_size, load_medical_image, pil_size_check_off

    try:
        if dicom_picture_size(path) is not None:  # a DICOM picture: its pixels are ITK's to decode
            load_medical_image(path)
            return
        with pil_size_check_off(), Image.open(path) as picture:
            picture.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable upload
        raise unreadable_upload(path, err) from None


def check_volume_data(path: Path) -> None:
    """422 when a volume upload's data is incomplete (a truncated transfer): its header alone reads, so without
    this check the datastore would keep it and only an inference would fail. A NIfTI's data bytes are counted
    (streamed through gzip, nothing kept); NRRD / MetaImage are read by ITK."""
    suffix = upload_suffix(path.name)
    hidden = f"upload{suffix}"
    try:
        if suffix not in (".nii", ".nii.gz"):
            import itk

            try:
                itk.imread(str(path))
            except RuntimeError:  # ITK's message: its source paths and object addresses, several lines
                raise RequestError(422, f"{hidden} cannot be read: ITK could not read its data (truncated or "
                                        "corrupt); upload the whole file") from None
            return
        import nibabel as nib

        from ..transforms.io import gzip_data_size

        volume = nib.load(str(path))
        header, offset = volume.header, int(volume.dataobj.offset)  # (a loaded image's header says 0)
        needed = offset + math.prod(header.get_data_shape()) * header.get_data_dtype().itemsize
        if suffix == ".nii":
            held = path.stat().st_size
        else:  # counted up to what the header needs: a gzip bomb's tail is not inflated
            held = gzip_data_size(path, limit=needed)
    except RequestError:
        raise
    except EOFError as err:  # gzip: the stream stops before its end
        raise RequestError(422, f"{hidden} is truncated ({err}); upload the whole file") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable upload
        message = str(err).replace(str(path), hidden)
        raise RequestError(422, f"cannot read the uploaded volume: {type(err).__name__}: {message}") from None
    if held < needed:
        raise RequestError(422, f"{hidden} is truncated: its header describes {needed} bytes, the file holds {held}; "
                                "upload the whole file")


def check_image(path: Path, limits: ServerLimits, decode_pictures: bool = True) -> tuple[str, tuple[int, ...]]:
    """(kind, shape) of a saved upload within the limits: not empty, a readable header of one picture or volume,
    the pixel count, data that is all there (``decode_pictures=False``: a picture's pixels are not decoded here,
    for an inference, whose own reading reports a truncated picture, so that it is decoded once)."""
    suffix = upload_suffix(path.name)
    kind = UPLOAD_SUFFIXES[suffix]
    if path.stat().st_size == 0:
        raise RequestError(422, "the uploaded file is empty")
    if suffix == ".dcm":
        from ..transforms.io import dicom_picture_size

        if dicom_picture_size(path) is None:
            raise RequestError(422, "upload.dcm is not a single-frame DICOM picture (a multi-frame file, or a header "
                                    "that does not read): upload one picture, or a volume as NIfTI, NRRD or "
                                    "MetaImage")
    if suffix in (".nrrd", ".mha"):
        named = external_data_file(path)
        if named is not None:
            raise RequestError(422, f"upload{suffix} keeps its data in another file ({named[:80]!r}), which would "
                                    "be read from the server's disk: upload one file with the data inside (NRRD "
                                    "without 'data file:', MetaImage with 'ElementDataFile = LOCAL'), or NIfTI")
    if suffix in (".nii", ".nii.gz"):  # before nibabel reads its extensions
        check_nifti_offset(path)
    shape = image_size(path, kind)
    pixels = 1
    for s in shape[:3]:
        pixels *= int(s)
    if pixels > limits.max_image_pixels:
        raise RequestError(413, f"image of {'x'.join(map(str, shape))} = {pixels} pixels exceeds the server's "
                                f"limit of {limits.max_image_pixels} (--max-image-pixels)")
    if kind == "volume" and math.prod(shape[3:]) > 1:
        raise RequestError(422, f"upload{suffix} is a 4D volume ({'x'.join(map(str, shape))}): "
                                "this server segments 3D volumes; upload one channel / time point as its own volume")
    if kind == "volume":
        check_volume_data(path)
    elif decode_pictures:
        check_picture_data(path)
    return kind, shape


def _one_file(files: Sequence[Any] | None) -> Any:
    """The one ``file`` part of a request (None when there is none); 422 for several (one would be ignored)."""
    if not files:
        return None
    if len(files) > 1:
        raise RequestError(422, f"{len(files)} 'file' parts: send one image file per request (PNG, JPEG, BMP, TIFF, "
                                "NIfTI, NRRD, MetaImage)")
    return files[0]


def _save_upload(upload: Any, target: Path) -> Path:
    with open(target, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    return target


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    """A small JSON object form field (image / label info); ``{}`` when empty."""
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_INFO_CHARS:
        raise RequestError(422, f"'{what}' is too long (64 KiB at most)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(422, f"'{what}' is not valid JSON: {err}") from None
    except RecursionError:
        raise RequestError(422, f"'{what}' is nested too deeply to read") from None
    if not isinstance(value, dict):
        raise RequestError(422, f"'{what}' must be a JSON object")
    return value


def _os_error(err: BaseException) -> BaseException | None:
    """A decoder's OSError (truncated / corrupt file) inside MONAI's transform wrappers, else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _map_strings(value: Any, change: Any) -> Any:
    """A JSON document with ``change`` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_map_strings(v, change) for v in value]
    if isinstance(value, dict):
        return {change(k): _map_strings(v, change) for k, v in value.items()}
    return value


def _media_type(suffix: str) -> str:
    from .monailabel_protocol import MEDIA_TYPES

    return MEDIA_TYPES.get(suffix, "image/jpeg" if suffix in (".jpg", ".jpeg") else "application/octet-stream")


# ------------------------------------------------------------------------------------------------ app
class _LockedPredictor:
    """The predictor behind the lock, for the agent: only MedSAM3's calls hold it, not the planner's HTTP calls."""

    def __init__(self, predictor: Any, lock: Any) -> None:
        self._predictor = predictor
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._predictor(*args, **kwargs)


def create_app(predictor: Any, *, token: str | None = None, limits: ServerLimits | None = None,
               model_name: str = MODEL_NAME, version: str | None = None,
               cors_origins: Sequence[str] | None = None, agent: Any = None,
               agent_model_name: str = AGENT_MODEL_NAME, host: str | None = None):
    """The FastAPI app serving ``predictor`` (a :class:`~medsam3_monai.inferers.predict.Predictor`).

    Args:
        predictor: the loaded model; calls are serialised by a lock.
        token: when given, every request but ``/auth/`` and ``/auth/token`` needs ``Authorization: Bearer
            <token>`` (401 otherwise); ``POST /auth/token`` with the token as password hands it to MONAI Label
            clients.
        limits: request size, pixel count, prompt and datastore limits.
        model_name: the name under ``/infer/{model}``.
        cors_origins: browser origins (``https://ohif.example.org``, or ``*``) allowed to call the server.
        agent: the planner of the second model, the MedSAM3 agent (``agent_model_name``): an
            :class:`~medsam3_monai.agent.runner.AgentSettings` (endpoint, model, key variable, limits); None = the
            offline planner. Its MedSAM3 calls use ``predictor``.
        host: the address the server listens on. A loopback one without ``token`` answers only requests that
            name it so (``Host: localhost`` or a loopback address: ``127.0.0.1``, ``[::1]``, the one it listens on; 403
            otherwise): a web page in the user's
            browser cannot reach the server and its datastore by DNS rebinding.
    """
    from fastapi import Body, Depends, FastAPI, File, Form, Query, Request, Security, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import OAuth2PasswordRequestForm
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    from ..inferers.inputs import box_prompts, user_error
    from ..protocol_registry import PROTOCOLS
    from ..agent.runner import AgentSettings, choose_planner
    from .monailabel_protocol import (ParamsError, ResultType, label_names, multipart_answer, parse_agent_params,
                                      parse_infer_params, result_format, write_result)
    from .segment_cli import add_notes, output_labels, request_notes, slice_axis_note

    limits = limits or ServerLimits()
    agent = agent if agent is not None else AgentSettings(llm="none")
    planner = choose_planner(agent)  # an incomplete endpoint fails here, at start
    version = version or __version__
    lock = threading.Lock()
    auth = TokenAuth(token)
    store = Datastore(limits.max_stored_files, limits.max_stored_bytes, limits.session_expiry)
    default_threshold = float(predictor.inferer.score_threshold)  # a request's params.score_threshold replaces it

    @asynccontextmanager
    async def lifespan(app: Any):
        yield
        store.close()

    app = FastAPI(title="medsam3-monai", version=version, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan,
                  description="MONAI Label protocol server for Medical SAM3 text-prompted segmentation")
    app.state.auth = auth
    app.state.datastore = store
    app.state.cors_origins = list(cors_origins or [])

    async def require_token(given: str | None = Security(auth.scheme)) -> None:
        auth.check(given)

    protected = [Depends(require_token)]

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, err: StoreError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = ("not found: the routes are /info/, /infer/{model}, /datastore/, /session/, "
                   "/activelearning/{strategy} and /auth/ (see GET /info/)") if err.status_code == 404 else str(
            err.detail)
        return JSONResponse({"error": message}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        from ..storage_errors import storage_error

        full = storage_error(err)
        if full is not None:  # the server's disk (its datastore, TMPDIR): the client's answer is 507, as a full store's
            logging.getLogger("uvicorn.error").error("the server's storage refused a write: %s", full)
            return JSONResponse({"error": "the server's disk is full or read-only (its temporary folder and datastore "
                                          "cannot take the upload): try again later, or ask its administrator"},
                                status_code=507)
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    model_info = {
        "type": "segmentation",
        # MONAI Label: label name -> value. The labels are this request's prompts (value i for prompt i, one
        # prompt on a 2D image 255), named in each answer's params.label_names, so none are fixed here.
        "labels": {},
        "dimension": 3,
        "description": "Medical SAM3 text-prompted segmentation: give the concepts as params.prompts; 2D images "
                       "-> PNG mask, NIfTI volumes -> NIfTI label map, both in the input's geometry",
        # 3D Slicer shows these as editable options and sends them back as params
        "config": {"prompts": "", "protocol": list(PROTOCOLS), "score_threshold": default_threshold,
                   "modality": "", "largest_cc": False},
        "prompts": "params = {\"prompts\": [text, ...] or \"text, text\", \"box\": [x1, y1, x2, y2] (2D, "
                   "optional), \"protocol\": " + "|".join(PROTOCOLS) + " (2D, optional), \"score_threshold\": 0..1 "
                   "(optional; default " + f"{default_threshold:g}" + "), \"modality\": optional, "
                   "\"largest_cc\": true|false}",
        "score_threshold": default_threshold,
        "dimensions": [2, 3],
        "checkpoint": str(getattr(predictor, "checkpoint", "")),
        "image_size": int(getattr(getattr(predictor, "network", None), "image_size", 0) or 0),
        "resize_kernel": str(getattr(predictor, "resize_kernel", "sam3")),
        "ct_window": getattr(predictor, "ct_window", "abdomen"),  # the CT inputs' (modality CT)
        "inputs": sorted(UPLOAD_SUFFIXES),
        "outputs": {"all": "multipart params (result JSON) + image (label file); the default",
                    "image": "the label file, result JSON in the " + RESULT_HEADER + " header",
                    "json": "the result JSON"},
    }

    agent_info = {
        "type": "segmentation",
        "labels": {},
        "dimension": 3,
        "description": "The MedSAM3 agent: give a free-text request as params.request; a planner calls MedSAM3 with "
                       "short noun phrases and answers with the union of the masks it selects (one label; no match: "
                       "an empty mask)",
        "config": {"request": "", "protocol": list(PROTOCOLS), "score_threshold": default_threshold, "modality": "",
                   "largest_cc": False},
        "prompts": "params = {\"request\": text, \"modality\": optional, \"protocol\": " + "|".join(PROTOCOLS)
                   + " (2D, optional), \"score_threshold\": 0..1 (optional), \"trace\": true|false}",
        "score_threshold": default_threshold,
        "planner": {"kind": planner, "model": agent.llm_model if planner == "llm" else None,
                    "max_rounds": agent.loop.max_rounds},
        "dimensions": [2, 3],
        "checkpoint": model_info["checkpoint"],
        "image_size": model_info["image_size"],
        "resize_kernel": model_info["resize_kernel"],
        "ct_window": model_info["ct_window"],
        "inputs": model_info["inputs"],
        "outputs": model_info["outputs"],
    }

    # ------------------------------------------------------------------------------------------ info
    @app.get("/info", dependencies=protected)
    @app.get("/info/", dependencies=protected)
    async def info() -> dict[str, Any]:
        return {"name": "MedSAM3 (medsam3-monai)", "version": version,
                "description": "MONAI Label REST protocol for Medical SAM3 text-prompted segmentation",
                # MONAI Label merges its models' labels here (a list, or the app's mapping); a mapping, empty like
                # the model's (OHIF appends the model's label names to it: nothing to append)
                "labels": {}, "models": {model_name: model_info, agent_model_name: agent_info}, "trainers": {},
                "strategies": {name: {"description": text} for name, text in STRATEGIES.items()},
                "scoring": {}, "train_stats": {}, "datastore": store.status(), "limits": limits.as_dict()}

    # ------------------------------------------------------------------------------------------ infer
    @app.post("/infer/{model}", dependencies=protected)
    def infer(model: str, image: str = Query(""), session_id: str = Query(""),
              output: ResultType | None = Query(None), params: str | None = Form(None),
              file: list[UploadFile] | None = File(None), label: UploadFile | None = File(None)) -> Response:
        started = time.perf_counter()
        if model not in (model_name, agent_model_name):  # compared only, never used as a path
            raise RequestError(404, f"unknown model {model[:64]!r}: this server has {model_name!r} and "
                                    f"{agent_model_name!r} (see GET /info/)")
        is_agent = model == agent_model_name
        if output is ResultType.dicom_seg:
            raise RequestError(422, "output=dicom_seg needs a DICOMweb datastore, which this server does not have: "
                                    "ask for output=image, json or all")
        if label is not None:
            raise RequestError(422, "a 'label' input (scribbles, clicks) is not used by this text-prompted model: "
                                    "send params and the image")
        file = _one_file(file)
        folder = Path(tempfile.mkdtemp(prefix="medsam3-serve-"))
        try:
            if file is not None:
                suffix = upload_suffix(file.filename)
                upload, source = _save_upload(file, folder / f"input{suffix}"), f"upload{suffix}"
            elif session_id:
                upload, source = store.link_session(session_id, folder), "session"
            elif image:
                upload, source = store.link_image(image, folder), "datastore image"
            else:
                raise RequestError(422, "no image: send it as the multipart field 'file', or name an uploaded one "
                                        "with ?image=ID (PUT /datastore/) or ?session_id= (PUT /session/)")
            try:
                request = (parse_agent_params(params, limits.max_request_chars) if is_agent else
                           parse_infer_params(params, limits.max_prompts, limits.max_prompt_chars))
            except ParamsError as err:
                raise RequestError(422, str(err)) from None
            kind, shape = check_image(upload, limits, decode_pictures=False)  # the inference decodes it
            if kind == "volume" and (getattr(request, "box", None) is not None
                                     or request.protocol not in (None, "top_query")):
                raise RequestError(422, "protocols are for 2D images; send a volume with the request alone" if is_agent
                                   else "box prompts and protocols are for 2D images; send volumes with prompts only")
            if not is_agent and request.box is not None:
                try:
                    box_prompts(request.box, len(request.prompts), shape)
                except ValueError as err:
                    raise RequestError(422, str(err)) from None
            try:
                extension, _ = result_format(request, kind == "volume")
            except ParamsError as err:
                raise RequestError(422, str(err)) from None
            prediction, agent_summary = _agent(upload, request, kind) if is_agent else (_predict(upload, request), None)
            if request.largest_cc:
                prediction = prediction.largest_components()
            labels, summary = output_labels(prediction, upload)
            add_notes(summary, prediction, _notes(prediction, request, is_agent))
            if agent_summary is not None:
                summary["agent"] = agent_summary
            mask_path = folder / f"mask{extension}"
            media_type = write_result(labels, prediction, request, mask_path, upload)
            data = mask_path.read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        summary.update(input=source, model=model, mask_format=extension.lstrip("."), largest_cc=request.largest_cc,
                       label_names=label_names(summary),
                       latencies={"total": round(time.perf_counter() - started, 3)})
        if output is ResultType.json:
            return JSONResponse(summary)
        if output in (ResultType.image, ResultType.file):
            return Response(content=data, media_type=media_type, headers={
                RESULT_HEADER: json.dumps(summary, separators=(",", ":"), ensure_ascii=True),
                "Content-Disposition": f'attachment; filename="mask{extension}"'})
        body, content_type = multipart_answer(summary, data, extension, media_type)
        return Response(content=body, media_type=content_type)

    def _notes(prediction: Any, request: Any, is_agent: bool) -> list[str]:
        """What the answer says beside the labels, as ``medsam3 segment`` says it: why a mask is empty, a volume's
        slices that are not axial, a request's ``score_threshold`` that its 2D protocol does not read. The agent's
        answer label is the union of its selections: its ``agent`` entry says why it is empty."""
        if is_agent:
            axis = slice_axis_note(prediction.affine) if prediction.is_volume else None
            return [axis] if axis else []
        return request_notes(prediction, request.score_threshold, default_threshold, "params.score_threshold")

    def _predict(upload: Path, request: Any) -> Any:
        with lock:  # one model, one request at a time; the protocol travels with the request
            try:
                return predictor(upload, request.prompts, box=request.box, modality=request.modality,
                                 protocol=request.protocol, score_threshold=request.score_threshold)
            except (ValueError, FileNotFoundError) as err:
                raise RequestError(422, str(err).replace(str(upload), f"upload{upload_suffix(upload.name)}")) from None
            except RuntimeError as err:
                cause = user_error(err) or _os_error(err)
                if cause is None:
                    raise
                raise RequestError(422, str(cause).replace(str(upload), "upload")) from None
            except OSError as err:  # decoders: truncated or corrupt data
                raise unreadable_upload(upload, err) from None

    def _agent(upload: Path, request: Any, kind: str) -> tuple[Any, dict[str, Any]]:
        """The agent's answer to ``request.request`` on the upload: (one-label Prediction, the result's ``agent``
        entry). MedSAM3's calls hold the lock; the planner's do not."""
        import dataclasses

        from ..agent.errors import PlannerError
        from ..agent.output import answer_prediction
        from ..agent.runner import decide, without_url
        from ..agent.segmenter import PhraseSegmenter, SegmenterSettings
        from ..agent.trace import Trace

        segmenter_settings = SegmenterSettings(
            checkpoint=str(getattr(predictor, "checkpoint", "")),
            protocol="top_query" if kind == "volume" else (request.protocol or predictor.inferer.protocol),
            score_threshold=default_threshold if request.score_threshold is None else float(request.score_threshold),
            ct_window=predictor.ct_window, resize_kernel=model_info["resize_kernel"],
            modality=request.modality, max_pixels=getattr(predictor, "max_pixels", "auto"))
        settings = dataclasses.replace(agent, segmenter=segmenter_settings)
        segmenter = PhraseSegmenter(_LockedPredictor(predictor, lock), str(upload), segmenter_settings)
        notes: list[str] = []
        trace = Trace()
        hide = str(upload), f"upload{upload_suffix(upload.name)}"

        def private(text: str) -> str:
            """What a client may read: no server path, no planner URL."""
            return without_url(text.replace(*hide), settings)

        try:
            decision = decide(str(upload), request.request, settings, segmenter, log=notes.append, trace=trace,
                              plain_notes=True)
            prediction = answer_prediction(decision, segmenter)
        except PlannerError as err:  # the planner endpoint failed: not the client's fault
            raise RequestError(502, private(f"the agent's planner failed: {err}")) from None
        except (ValueError, FileNotFoundError) as err:
            raise RequestError(422, private(str(err))) from None
        except RuntimeError as err:
            cause = user_error(err) or _os_error(err)
            if cause is None:
                raise
            raise RequestError(422, private(str(cause))) from None
        entry = {"request": request.request, "planner": trace.data["planner"].get("kind"), "status": decision.status,
                 "phrases": decision.phrases, "marks": [m.facts() for m in decision.marks], "reason": decision.reason,
                 "rounds": len(trace.data["rounds"]), "tokens": trace.data["tokens"],
                 "notes": [private(n) for n in notes]}
        if request.trace:
            entry["trace"] = _map_strings(json.loads(json.dumps(trace.as_json(), default=str)), private)
        return prediction, entry

    # ------------------------------------------------------------------------------------------ datastore
    def _stored_file_response(link: Any, name: str) -> Response:
        """A stored file, read through a private link that is removed after the answer."""
        from fastapi.responses import FileResponse

        folder = Path(tempfile.mkdtemp(prefix="medsam3-serve-"))
        try:
            path = link(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        suffix = upload_suffix(path.name, LABEL_SUFFIXES)
        return FileResponse(path, media_type=_media_type(suffix), filename=f"{name}{suffix}",
                            background=BackgroundTask(shutil.rmtree, folder, True))

    @app.get("/datastore/", dependencies=protected)
    def datastore(output: str = Query("stats")) -> Any:
        if output == "all":
            return store.describe()
        if output == "train":
            return store.datalist()
        if output == "stats":
            return store.status()
        raise RequestError(422, f"output {output[:16]!r}: choose stats, all or train")

    @app.put("/datastore/", dependencies=protected)
    @app.put("/datastore/image", dependencies=protected)
    def add_image(image: str | None = Query(None), params: str = Form("{}"),
                  file: list[UploadFile] = File(...)) -> dict[str, str]:
        file = _one_file(file)
        suffix = upload_suffix(file.filename)
        image_id = check_id(image) if image else check_id(
            Path(file.filename or "image").name[: -len(suffix)] or "image")
        info = _json_object(params, "params")
        folder = Path(tempfile.mkdtemp(prefix="medsam3-serve-"))
        try:
            upload = _save_upload(file, folder / f"upload{suffix}")
            check_image(upload, limits)
            store.add_image(image_id, upload, suffix, info)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"image": image_id}

    @app.get("/datastore/image", dependencies=protected)
    def download_image(image: str = Query(...)) -> Response:
        return _stored_file_response(lambda folder: store.link_image(image, folder, "image"), "image")

    @app.get("/datastore/image/info", dependencies=protected)
    def get_image_info(image: str = Query(...)) -> dict[str, Any]:
        return store.image_info(image)

    @app.delete("/datastore/", dependencies=protected)
    @app.delete("/datastore/image", dependencies=protected)
    def remove_image(id: str = Query(...)) -> dict[str, Any]:
        store.remove_image(id)
        return {}

    @app.put("/datastore/label", dependencies=protected)
    def save_label(image: str = Query(...), tag: str = Query(FINAL_TAG), params: str = Form("{}"),
                   label: UploadFile = File(...)) -> dict[str, Any]:
        suffix = upload_suffix(label.filename, LABEL_SUFFIXES)
        info = _json_object(params, "params")
        folder = Path(tempfile.mkdtemp(prefix="medsam3-serve-"))
        try:
            upload = _save_upload(label, folder / f"label{suffix}")
            if upload.stat().st_size == 0:
                raise RequestError(422, "the uploaded label is empty")
            label_id = store.save_label(image, upload, suffix, tag or FINAL_TAG, info)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"image": image, "label": label_id}

    @app.get("/datastore/label", dependencies=protected)
    def download_label(label: str = Query(...), tag: str = Query(FINAL_TAG)) -> Response:
        return _stored_file_response(lambda folder: store.link_label(label, tag, folder), "label")

    @app.get("/datastore/label/info", dependencies=protected)
    def get_label_info(label: str = Query(...), tag: str = Query(FINAL_TAG)) -> dict[str, Any]:
        return store.label_info(label, tag)

    @app.delete("/datastore/label", dependencies=protected)
    def remove_label(id: str = Query(...), tag: str = Query(FINAL_TAG)) -> dict[str, Any]:
        store.remove_label(id, tag)
        return {}

    @app.post("/activelearning/{strategy}", dependencies=protected)
    def next_sample(strategy: str, params: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
        return store.next_sample(strategy)

    # ------------------------------------------------------------------------------------------ sessions
    @app.put("/session/", dependencies=protected)
    def create_session(uncompress: bool = Query(False), expiry: int = Query(0),
                       files: list[UploadFile] = File(...)) -> dict[str, Any]:
        if uncompress:
            raise RequestError(422, "uncompress=true is not supported: send one image file (PNG, JPEG, BMP, TIFF, "
                                    "NIfTI, NRRD, MetaImage)")
        if len(files) != 1:
            raise RequestError(422, f"{len(files)} files: a session holds one image file (PNG, JPEG, BMP, TIFF, "
                                    "NIfTI, NRRD, MetaImage; not a DICOM series)")
        suffix = upload_suffix(files[0].filename)
        folder = Path(tempfile.mkdtemp(prefix="medsam3-serve-"))
        try:
            upload = _save_upload(files[0], folder / f"upload{suffix}")
            check_image(upload, limits)
            session_id, session_info = store.add_session(upload, suffix, expiry)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"session_id": session_id, "session_info": session_info}

    @app.get("/session/{session_id}", dependencies=protected)
    def get_session(session_id: str, update_ts: bool = Query(False), image: bool = Query(False)) -> Any:
        if image:
            return _stored_file_response(lambda folder: store.link_session(session_id, folder, "image"), "image")
        return store.session_info(session_id, touch=update_ts)

    @app.delete("/session/{session_id}", dependencies=protected)
    def remove_session(session_id: str) -> dict[str, Any]:
        return store.remove_session(session_id)

    # ------------------------------------------------------------------------------------------ train, auth
    @app.api_route("/train/", methods=["GET", "POST", "DELETE"], dependencies=protected)
    @app.api_route("/train/{model}", methods=["POST"], dependencies=protected)
    def train() -> None:
        raise RequestError(404, "No Train Tasks Found: medsam3 serve does not train (train with the medsam3 "
                                "bundle, bundles/medsam3/configs/train.json)")

    @app.get("/auth/")
    @app.get("/auth")
    async def auth_enabled() -> dict[str, Any]:
        return {"enabled": auth.enabled, "client_id": None, "realm": None}

    @app.post("/auth/token")
    def access_token(form: OAuth2PasswordRequestForm = Depends()) -> dict[str, Any]:
        if not auth.enabled:
            raise RequestError(404, "authentication is not enabled on this server (it was started without --token)")
        if not auth.password_ok(form.password):
            raise RequestError(401, "wrong password: give the server's token (--token) as the password",
                               {"WWW-Authenticate": "Bearer"})
        return {"access_token": auth.token, "token_type": "bearer"}

    @app.get("/auth/token/valid", dependencies=protected)
    async def valid_token() -> dict[str, Any]:
        return {"username": "medsam3", "email": None, "name": None, "roles": ["user"]}

    # last added = outermost: CORS (answers preflights itself, adds headers to every answer, errors included),
    # then the guard (token and size before any body is read), then FastAPI's routing
    loopback_only = host is not None and is_loopback(host) and not auth.enabled
    app.add_middleware(_GuardMiddleware, auth=auth, max_bytes=limits.max_request_bytes, loopback_only=loopback_only)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"], allow_headers=["*"],
                           expose_headers=[RESULT_HEADER, "Content-Disposition"], max_age=600)
    return app
