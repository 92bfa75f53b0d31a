"""Talk to the running app with MONAI Label's own client (``monailabel.client.MONAILabelClient``).

Run it with the MONAI Label environment's python::

    python apps/monailabel_medsam3/client.py --server http://127.0.0.1:8000 info
    python apps/monailabel_medsam3/client.py --server URL infer --image IMAGE_ID --out mask.png
    python apps/monailabel_medsam3/client.py --server URL infer --file volume.nii.gz --out labels.nii.gz \
        --params '{"labels": ["hippocampus"], "score_threshold": 0.2}'

``info`` prints ``GET /info/``; ``infer`` runs ``POST /infer/<model>`` on a datastore image (``--image``, its id:
the file name without the extension) or an uploaded file (``--file``), saves the returned label file to
``--out`` and prints the result JSON.
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

    with tempfile.TemporaryDirectory() as tmp:
        client = MONAILabelClient(args.server, tmpdir=tmp)
        if args.command == "info":
            result = client.info()
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        else:
            params = json.loads(args.params)
            # image id "" with a file: MONAI Label takes the upload
            try:
                label, result = client.infer(args.model, args.image or "", params, file=args.file)
            except MONAILabelClientException as err:  # e.g. "Status: 400; Response: {"detail": "..."}"
                print(f"infer failed: {err.msg}", file=sys.stderr)
                return 2
            if label is None:
                print(f"the server returned no label file: {json.dumps(result)}", file=sys.stderr)
                return 1
            shutil.copyfile(label, args.out)
            result = {"file": args.out, **result}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
