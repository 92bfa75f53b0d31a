#!/usr/bin/env python
"""Meta's SAM3 image pipeline end to end (sam3 0.1.4's ``Sam3Processor``) on pictures, for comparison with
``medsam3 segment``.

Run it with the official environment's Python (``make official``)::

    ~/.cache/medsam3-monai/sam3-official-venv/bin/python scripts/official_segment.py OUT.npz PICTURE... \\
        --checkpoint sam3.pt --prompt polyp [--threshold 0.5] [--box X1 Y1 X2 Y2] [--tiny] [--image-size 1008]

The model is sam3's ``Sam3Image`` holding the ``detector.*`` weights of a ``sam3.pt``: SAM3's architecture
(``build_sam3_image_model``), or with ``--tiny`` the tiny one of ``scripts/official_tiny.py``. Each picture is read
with PIL as RGB and given to ``Sam3Processor.set_image``, then ``set_text_prompt(prompt)`` (with ``--box``, then
``add_geometric_prompt``: text + a positive box, SAM3's T+I prompt). The processor keeps the queries whose score
(sigmoid of the query logit x sigmoid of the presence logit) exceeds ``--threshold`` and resizes their mask logits
straight to the picture's size. ``OUT.npz`` holds, per picture i, ``scores_<i>`` (kept
queries' scores), ``boxes_<i>`` (their xyxy pixel boxes), ``union_<i>`` (H, W) bool (the union of their masks),
``probability_<i>`` (H, W) (the highest of their mask probabilities), ``all_scores_<i>`` (every query's score) and
``paths``. ``tests/test_official_segment.py`` compares them with ``medsam3 segment``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def build_model(checkpoint: Path, tiny: bool, image_size: int):
    """sam3's ``Sam3Image`` (eval mode, CPU) holding the checkpoint's ``detector.*`` tensors, loaded strictly."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    detector = {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}
    from official_tiny import build_official  # this folder

    model = build_official(image_size, tiny)
    if not detector:
        raise ValueError(f"{checkpoint} holds no detector.* tensors: give a sam3.pt (Meta's layout)")
    try:
        model.load_state_dict(detector, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:2] or [str(err)[:200]]
        architecture = f"sam3's {'tiny ' if tiny else ''}Sam3Image at {image_size} px"
        raise ValueError(f"{checkpoint} does not fit {architecture} (--tiny and --image-size must be those it was "
                         f"made with): {first[0].strip()[:300]}") from None
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("pictures", type=Path, nargs="+", help="picture files (anything PIL reads)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a sam3.pt (its detector.* tensors)")
    parser.add_argument("--prompt", required=True, help="the text prompt")
    parser.add_argument("--threshold", type=float, default=0.5, help="Sam3Processor's confidence threshold")
    parser.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                        help="a positive box in the picture's pixels (x along columns, the picture spanning [0, W] x "
                             "[0, H], as medsam3 segment --box), added after the text with add_geometric_prompt")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture of scripts/official_tiny.py")
    parser.add_argument("--image-size", type=int, default=None, help="the resolution (default 1008, 112 with --tiny)")
    args = parser.parse_args()
    missing = [str(path) for path in [args.checkpoint, *args.pictures] if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    size = args.image_size or (112 if args.tiny else 1008)
    if size <= 0 or size % 14:
        parser.error(f"--image-size {size}: give a positive multiple of 14 (the ViT's patch), e.g. 1008 or 112")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from official_tracker import official_code_on_cpu  # this folder: sam3's CUDA calls on the CPU
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    arrays: dict[str, np.ndarray] = {"paths": np.array([str(path) for path in args.pictures])}
    with official_code_on_cpu(), torch.inference_mode():
        try:
            model = build_model(args.checkpoint, args.tiny, size)
        except ValueError as err:
            parser.error(str(err))
        processor = Sam3Processor(model, resolution=size, device="cpu", confidence_threshold=args.threshold)
        for i, path in enumerate(args.pictures):
            try:
                picture = Image.open(path)
            except OSError as err:
                parser.error(f"{path}: PIL cannot read it as a picture ({err})")
            with picture:
                state = processor.set_image(picture.convert("RGB"))
            state = processor.set_text_prompt(args.prompt, state)
            if args.box:
                x1, y1, x2, y2 = args.box
                width, height = state["original_width"], state["original_height"]
                box = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
                state = processor.add_geometric_prompt(box, True, state)  # normalised cx, cy, w, h
            masks = state["masks"][:, 0]
            height, width = state["original_height"], state["original_width"]
            union = masks.any(0) if masks.shape[0] else torch.zeros(height, width, dtype=torch.bool)
            probability = state["masks_logits"][:, 0].amax(0) if masks.shape[0] else torch.zeros(height, width)
            arrays.update({f"scores_{i}": state["scores"].float().numpy(), f"boxes_{i}": state["boxes"].numpy(),
                           f"union_{i}": union.numpy(), f"probability_{i}": probability.float().numpy()})
            every = processor.set_confidence_threshold(-1.0, state)  # the same forward, every query kept
            arrays[f"all_scores_{i}"] = every["scores"].float().numpy()
            processor.set_confidence_threshold(args.threshold)
    np.savez(args.out, **arrays)
    print(f"wrote {args.out}: {len(args.pictures)} pictures at {size} px, prompt {args.prompt!r}")


if __name__ == "__main__":
    main()
