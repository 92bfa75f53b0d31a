"""Talk to the running app with MONAI Label's own client (``monailabel.client.MONAILabelClient``).

Run it with the MONAI Label environment's python::

    python apps/monailabel_medsam3/client.py --server http://127.0.0.1:8000 info
    python apps/monailabel_medsam3/client.py --server URL infer --image IMAGE_ID --out mask.png
    python apps/monailabel_medsam3/client.py --server URL infer --file volume.nii.gz --out labels.nii.gz \
        --params '{"labels": ["hippocampus"], "score_threshold": 0.2}'

``info`` prints ``GET /info/``; ``infer`` runs ``POST /infer/<model>`` on a datastore image (``--image``, its id:
the file name without the extension) or an uploaded file (``--file``), saves the returned label file to
``--out`` and prints the result JSON. ``--out``'s extension (``.png``, ``.nii.gz``, ``.nrrd``, ...) asks for that
format (MONAI Label's ``result_extension``) unless ``--params`` names one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from monailabel.client.client import MONAILabelClient, MONAILabelClientException


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the server's URL")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="GET /info/")
    info.add_argument("--out", default=None, help="also write the JSON here")
    infer = sub.add_parser("infer", help="POST /infer/<model>")
    infer.add_argument("--model", default="medsam3")
    what = infer.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="image id in the server's datastore (studies folder)")
    what.add_argument("--file", help="a file to upload (PNG/JPEG/... image, NIfTI volume)")
    infer.add_argument("--params", default="{}", help="request params as JSON (labels, prompts, protocol, ...)")
    infer.add_argument("--out", required=True, help="where to save the returned label file")
    args = parser.parse_args(argv)
    try:
        result = _run(args)
    except (UsageError, MONAILabelClientException, OSError) as err:  # OSError: server down, unreadable file
        message = err.msg if isinstance(err, MONAILabelClientException) else str(err)  # "Status: 400; Response: ..."
        print(f"{args.command} failed: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


class UsageError(ValueError):
    """A bad argument, found before anything is sent."""


def _run(args: argparse.Namespace) -> dict:
    """The command's result JSON; raises UsageError, MONAILabelClientException or OSError."""
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    params: dict = {}
    if args.command == "infer":
        if args.file and not Path(args.file).is_file():
            raise UsageError(f"--file {args.file}: no such file")
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as err:
            raise UsageError(f"--params is not valid JSON ({err}): give an object such as "
                             "'{\"labels\": [\"polyp\"]}'") from None
        if not isinstance(params, dict):
            raise UsageError("--params must be a JSON object such as '{\"labels\": [\"polyp\"]}'")
        params = {**params, "result_extension": _result_extension(out, params.get("result_extension"))}
    with tempfile.TemporaryDirectory() as tmp:
        client = MONAILabelClient(args.server, tmpdir=tmp)
        try:
            if args.command == "info":
                return _info(client, out)
            return _infer(client, args, params, out)
        except ConnectionError as err:
            raise OSError(f"cannot reach the server at {args.server} ({err.strerror or err}): is it running? "
                          "(monailabel start_server ..., see README.md)") from None


def _info(client: MONAILabelClient, out: Path | None) -> dict:
    result = client.info()
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _infer(client: MONAILabelClient, args: argparse.Namespace, params: dict, out: Path) -> dict:
    # image id "" with a file: MONAI Label takes the upload
    label, result = client.infer(args.model, args.image or "", params, file=args.file)
    if label is None:
        raise UsageError(f"the server returned no label file: {json.dumps(result)}")
    shutil.copyfile(label, out)
    return {"file": str(out), **result}


def _result_extension(out: Path, asked: str | None) -> str:
    """The label file's format: ``--out``'s extension (one the server writes), or the ``result_extension`` of
    ``--params``, which must then be ``--out``'s."""
    from medsam3_monai.deploy.monailabel_protocol import IMAGE_RESULTS, VOLUME_RESULTS

    known = sorted({*IMAGE_RESULTS, *VOLUME_RESULTS}, key=len, reverse=True)
    suffix = next((s for s in known if out.name.lower().endswith(s)), None)
    if asked is not None and suffix is not None and asked.lower() != suffix:
        raise UsageError(f"--out {out.name} ends in {suffix} but --params asks for result_extension {asked!r}: "
                         "make them agree")
    if asked is not None:
        return asked
    if suffix is None:
        raise UsageError(f"--out {out.name}: name a label file the server writes ({', '.join(sorted(known))})")
    return suffix


if __name__ == "__main__":
    sys.exit(main())
