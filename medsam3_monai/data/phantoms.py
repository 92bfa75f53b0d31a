"""Synthetic phantoms for the demo: grey images with two named concepts, so that the text prompt matters.

Every image holds bright discs ("bright disc", label 1) and/or dark elongated bars ("dark bar", label 2) on a
smoothly varying noisy background; some images hold only one of the two, so the other prompt is a negative.
Images are 8-bit PNGs, masks label maps (0 background, 1, 2); the datalist follows the datalist schema (``bundles/medsam3/docs/conventions.md``) with
``instance_rule = components`` (each disc or bar is one instance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .datalist import write_datalist

PHANTOM_DATASET = "Phantom_discs_bars"
PHANTOM_PROMPTS = {"1": "bright disc", "2": "dark bar"}


def phantom_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (H, W), label uint8 (H, W)) pair with 1-3 discs and/or 1-2 bars."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, 2)
    image = 0.45 + 0.08 * np.sin(2 * np.pi * xx + phase[0]) * np.cos(2 * np.pi * yy + phase[1])
    label = np.zeros((size, size), np.uint8)
    kinds = [(True, True), (True, False), (False, True)][rng.choice(3, p=[0.6, 0.2, 0.2])]
    if kinds[1]:
        for _ in range(rng.integers(1, 3)):
            cx, cy = rng.uniform(0.2, 0.8, 2)
            length, width = rng.uniform(0.4, 0.6), rng.uniform(0.08, 0.12)
            angle = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            bar = (np.abs(u) < length / 2) & (np.abs(v) < width / 2)
            image[bar] = rng.uniform(0.1, 0.2)
            label[bar] = 2
    if kinds[0]:
        for _ in range(rng.integers(1, 3)):
            cx, cy = rng.uniform(0.15, 0.85, 2)
            radius = rng.uniform(0.1, 0.16)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
            image[disc] = rng.uniform(0.8, 0.95)
            label[disc] = 1
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def make_phantom_datalist(out_dir: str | Path, num_training: int = 32, num_validation: int = 6, num_test: int = 8,
                          size: int = 112, seed: int = 0) -> Path:
    """Write phantom images and masks under ``out_dir/images``, ``out_dir/masks`` and the datalist
    ``out_dir/phantom_datalist.json``; returns the datalist path (existing files are replaced)."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    datalist: dict[str, list[dict[str, Any]]] = {}
    index = 0
    for split, count in (("training", num_training), ("validation", num_validation), ("test", num_test)):
        datalist[split] = []
        for _ in range(count):
            image, label = phantom_image(size, rng)
            case = f"phantom_{index:03d}"
            Image.fromarray(image).save(out / "images" / f"{case}.png")
            Image.fromarray(label).save(out / "masks" / f"{case}.png")
            datalist[split].append({
                "image": str((out / "images" / f"{case}.png").resolve()),
                "label": str((out / "masks" / f"{case}.png").resolve()),
                "dataset": PHANTOM_DATASET, "modality": "xray", "prompts": dict(PHANTOM_PROMPTS),
                "instance_rule": "components", "mask_encoding": "label_map", "case": case,
            })
            index += 1
    return write_datalist(datalist, out / "phantom_datalist.json", overwrite=True)
