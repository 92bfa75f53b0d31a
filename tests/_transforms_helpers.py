"""Shared helpers of the transforms tests: the real samples in ../shared/data and datalist items for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

requires_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real samples not found at {SHARED_DATA} (clone with ../shared beside the repo)"
)

# catalogue facts of the shared samples (datasets_meta holds the same; kept here so the tests pin them)
DATASETS: dict[str, dict[str, Any]] = {
    "BUSI": {"modality": "ultrasound", "prompts": {"1": "breast tumor"}, "instance_rule": "components",
             "mask_encoding": "binary"},
    "DRIVE": {"modality": "fundus", "prompts": {"1": "retinal blood vessel"}, "instance_rule": "semantic",
              "mask_encoding": "binary"},
    "GBM40_HE_nuclei": {"modality": "pathology", "prompts": {"1": "cell nucleus"}, "instance_rule": "instance_ids",
                        "mask_encoding": "instance_map"},
    "ISBI2012_EM_membrane": {"modality": "EM", "prompts": {"1": "cell"}, "instance_rule": "components",
                             "mask_encoding": "binary"},
    "Kvasir-SEG_sample": {"modality": "endoscopy", "prompts": {"1": "polyp"}, "instance_rule": "components",
                          "mask_encoding": "binary"},
    "ChestXray_lung_sample": {"modality": "X-ray", "prompts": {"1": "lung"}, "instance_rule": "semantic",
                              "mask_encoding": "binary"},
    "MSD_Task04_Hippocampus_cropped": {"modality": "MRI", "instance_rule": "semantic", "mask_encoding": "label_map",
                                       "prompts": {"1": "anterior hippocampus", "2": "posterior hippocampus"}},
    "TotalSegmentator_example_CT_MR": {"modality": "CT", "instance_rule": "semantic", "mask_encoding": "label_map",
                                       "prompts": {"1": "spleen", "5": "liver"}},
}


def item(dataset: str, image: str, label: str | list[str], **overrides: Any) -> dict[str, Any]:
    """A datalist item for a file pair of ../shared/data/<dataset>."""
    root = SHARED_DATA / dataset
    labels = [str(root / p) for p in label] if isinstance(label, list) else str(root / label)
    return {"image": str(root / image), "label": labels, "dataset": dataset, **DATASETS[dataset], **overrides}


# two file pairs per folder (small and quick; the second differs in size or kind where the folder allows)
SAMPLES: dict[str, list[tuple[str, str | list[str]]]] = {
    "BUSI": [("images/malignant (1).png", "masks/malignant (1)_mask.png"),
             ("images/benign (25).png", ["masks/benign (25)_mask.png", "masks/benign (25)_mask_1.png"])],
    "DRIVE": [("images/01_test.tif", "masks/01_manual1.gif"), ("images/21_training.tif", "masks/21_manual1.gif")],
    "GBM40_HE_nuclei": [("images/01.tif", "masks/01_instances.png"), ("images/02.tif", "masks/02_instances.png")],
    "ISBI2012_EM_membrane": [("images/0.png", "masks/0.png"), ("images/1.png", "masks/1.png")],
    "Kvasir-SEG_sample": [("images/cju0qkwl35piu0993l0dewei2.jpg", "masks/cju0qkwl35piu0993l0dewei2.jpg"),
                          ("images/cju0roawvklrq0799vmjorwfv.jpg", "masks/cju0roawvklrq0799vmjorwfv.jpg")],
    "ChestXray_lung_sample": [("images/1.jpg", "masks/1-mask.png"), ("images/2.jpg", "masks/2-mask.png")],
    "MSD_Task04_Hippocampus_cropped": [("images/hippocampus_001.nii.gz", "masks/hippocampus_001.nii.gz"),
                                       ("images/hippocampus_003.nii.gz", "masks/hippocampus_003.nii.gz")],
    "TotalSegmentator_example_CT_MR": [("images/example_ct_sm.nii.gz", "masks/example_seg.nii.gz")],
}


def dice(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
