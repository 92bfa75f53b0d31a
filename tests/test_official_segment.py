"""``medsam3 segment`` against Meta's SAM3 image pipeline end to end, on the same weights and the same picture files:
sam3 0.1.4's ``Sam3Processor`` (``set_image``, ``set_text_prompt``; ``scripts/official_segment.py`` in its
environment) keeps the queries scoring above its confidence threshold; ``--protocol threshold --score-threshold``
is that rule. The tiny architecture of ``scripts/official_tiny.py`` with random weights: the scores agree to float
rounding, a threshold between two scores keeps the same queries on both sides, and one above every score keeps none.
The kept masks' union agrees but along its edges (sam3 resizes the mask logits straight to the picture's size, we
resize them to the slice space first; 0.4 % of the pixels of the enlarged picture differ); the masks' logits in
slice space are compared with sam3's in ``tests/test_official_detector.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsam3_monai.deploy.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_VENV = Path(os.environ.get("MEDSAM3_OFFICIAL_VENV")
                     or Path.home() / ".cache" / "medsam3-monai" / "sam3-official-venv")
sys.path.insert(0, str(REPO / "scripts"))

from official_tiny import tiny_official_config  # noqa: E402

PICTURES = ("Kvasir-SEG_sample/images/cju0qkwl35piu0993l0dewei2.jpg",  # 622 x 529, enlarged
            "Kvasir-SEG_sample/images/cju0qoxqj9q6s0835b43399p4.jpg")  # 1348 x 1070, shrunk
PROMPT = "polyp"
SIZE = 112

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny detector as a ``sam3.pt`` (Meta's key layout) and as the folder our network saves."""
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.key_mapping import convert_hf_to_original

    if not (OFFICIAL_VENV / "bin" / "python").exists():
        pytest.skip(f"the official SAM3 environment is not built at {OFFICIAL_VENV}: run `make official` "
                    "(scripts/setup_official_env.sh) to run this test")
    folder = tmp_path_factory.mktemp("weights")
    net = MedSAM3Net("tiny", config=tiny_official_config(SIZE), seed=3)
    original = convert_hf_to_original(net.sam3.state_dict(), net.sam3.config)
    torch.save({"model": {f"detector.{k}": v.contiguous() for k, v in original.items()}}, folder / "sam3.pt")
    return folder / "sam3.pt", net.save_pretrained(folder / "saved")


def official(sam3_pt: Path, pictures: list[Path], threshold: float, out: Path) -> list[dict]:
    done = subprocess.run([str(OFFICIAL_VENV / "bin" / "python"), str(REPO / "scripts" / "official_segment.py"),
                           str(out), *map(str, pictures), "--checkpoint", str(sam3_pt), "--prompt", PROMPT,
                           "--threshold", str(threshold), "--tiny"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return [{key: arrays[f"{key}_{i}"] for key in ("scores", "boxes", "union", "all_scores")}
                for i in range(len(pictures))]


def ours(folder: Path, picture: Path, threshold: float, out: Path) -> tuple[np.ndarray, dict]:
    assert cli_main(["segment", str(picture), "--prompt", PROMPT, "--checkpoint", str(folder), "--protocol",
                     "threshold", "--score-threshold", str(threshold), "--out", str(out), "--no-progress"]) == 0
    return np.asarray(Image.open(out)) > 0, json.loads(Path(f"{out}.json").read_text())["labels"]


def test_segment_keeps_the_queries_sam3s_processor_keeps_with_their_scores(weights, shared_data, tmp_path):
    sam3_pt, folder = weights
    pictures = [shared_data / name for name in PICTURES]
    if not all(path.is_file() for path in pictures):
        pytest.skip("the shared Kvasir-SEG pictures are not there")
    everything = official(sam3_pt, pictures, -1.0, tmp_path / "all.npz")
    for picture, result in zip(pictures, everything):
        scores = np.sort(result["all_scores"])[::-1]
        assert len(scores) == 8 and np.all(np.diff(scores) < 0)  # the tiny detector's 8 queries, no ties
        between = float(scores[2] + scores[3]) / 2  # keeps the best three on both sides
        above = float(scores[0]) + 1e-3  # keeps none
        for threshold, kept in ((between, 3), (above, 0)):
            [theirs] = official(sam3_pt, [picture], threshold, tmp_path / "one.npz")
            mask, labels = ours(folder, picture, threshold, tmp_path / f"{picture.stem}_{kept}.png")
            assert len(theirs["scores"]) == kept
            assert mask.shape == theirs["union"].shape
            # the label's score: the best kept query's (with none kept, the best query's, whose mask is empty)
            assert labels["255"]["score"] == pytest.approx(float(scores[0]), abs=2e-5)
            if kept:
                # sam3 resizes the mask logits straight to the picture's size, we resize them to S first (both
                # bilinear): the masks differ only along their edges
                disagree = float((mask != theirs["union"]).mean())
                print(f"{picture.name}: {disagree:.4%} of the pixels differ")
                assert 0.05 < theirs["union"].mean() < 0.95 and disagree < 0.01
            else:
                assert not mask.any() and not theirs["union"].any()
