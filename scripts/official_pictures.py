#!/usr/bin/env python
"""Meta's SAM3 image preprocessing of pictures (sam3 0.1.4's ``Sam3Processor.set_image``), for comparison with ours.

Run it with the official environment's Python (``make official``, ``scripts/setup_official_env.sh``)::

    ~/.cache/medsam3-monai/sam3-official-venv/bin/python scripts/official_pictures.py out.npz a.jpg b.png

``Sam3Processor.set_image`` opens nothing itself: each picture is read with PIL and converted to RGB, as SAM3's
examples do, and given to ``set_image``, which makes the network's input tensor and hands it to the model's image
backbone. A stand-in model records that tensor instead of encoding it (no weights are built). ``out.npz`` holds
``image_<i>``: the recorded (3, S, S) float32 SAM3-normalised input of the i-th picture, and ``paths``.
``tests/test_official_preprocessing.py`` compares them with the inference and training bundles' images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


class _RecordingModel:
    """What ``Sam3Processor.set_image`` uses of a model: ``backbone.forward_image`` (recorded here) and
    ``inst_interactive_predictor`` (none)."""

    inst_interactive_predictor = None

    def __init__(self) -> None:
        self.backbone = self
        self.images: list[np.ndarray] = []

    def forward_image(self, image):  # (1, 3, S, S)
        self.images.append(image[0].detach().cpu().float().numpy())
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("pictures", type=Path, nargs="+", help="picture files (anything PIL reads)")
    parser.add_argument("--image-size", type=int, default=1008, help="Sam3Processor's resolution (default 1008)")
    args = parser.parse_args()
    missing = [str(path) for path in args.pictures if not path.is_file()]
    if missing:
        parser.error(f"no such picture: {', '.join(missing)}")

    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    model = _RecordingModel()
    processor = Sam3Processor(model, resolution=args.image_size, device="cpu")
    for path in args.pictures:
        with Image.open(path) as picture:
            processor.set_image(picture.convert("RGB"))
    np.savez(args.out, paths=np.array([str(path) for path in args.pictures]),
             **{f"image_{i}": image for i, image in enumerate(model.images)})
    print(f"wrote {args.out}: {len(model.images)} pictures at {args.image_size} px")


if __name__ == "__main__":
    main()
