"""``medsam3 segment`` against Meta's SAM3 image pipeline end to end, on the same weights and the same picture files:
sam3 0.1.4's ``Sam3Processor`` (``set_image``, ``set_text_prompt``; ``scripts/official_segment.py`` in its
environment) keeps the queries scoring above its confidence threshold and resizes their mask logits straight to the
picture's size. The tiny architecture of ``scripts/official_tiny.py`` with random weights, on two Kvasir-SEG pictures
(one enlarged to the slice space, one shrunk):

* a threshold between the best and the second score keeps the top query: ``--protocol top_query`` gives its mask,
  pixel for pixel but where sam3's probability is within 1e-6 of 0.5 (the detectors' float agreement), and its
  score;
* a threshold between the third and the fourth keeps three: ``--protocol threshold --score-threshold`` keeps the
  same, and their union is sam3's too (each kept query's mask resized to the picture on its own, united there),
  pixel for pixel but where sam3's highest probability is within 1e-6 of 0.5;
* a threshold above every score keeps none: an empty mask on both sides;
* text + a box (SAM3's T+I prompt: ``add_geometric_prompt`` there, ``--box`` in pixels here): the top query's mask
  and score again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from _official_helpers import official_python

from medsam3_monai.deploy.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from official_tiny import tiny_official_config  # noqa: E402

PICTURES = ("Kvasir-SEG_sample/images/cju0qkwl35piu0993l0dewei2.jpg",  # 622 x 529, enlarged
            "Kvasir-SEG_sample/images/cju0qoxqj9q6s0835b43399p4.jpg")  # 1348 x 1070, shrunk
PROMPT = "polyp"
SIZE = 112
#: sam3's mask probability this close to 0.5 may fall on either side of our logit's 0: the two detectors' mask logits
#: agree within 2.2e-6 (tests/test_official_detector.py), a probability within 5.5e-7 of 0.5
ROUNDING = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny detector as a ``sam3.pt`` (Meta's key layout) and as the folder our network saves."""
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.key_mapping import convert_hf_to_original

    official_python()
    folder = tmp_path_factory.mktemp("weights")
    net = MedSAM3Net("tiny", config=tiny_official_config(SIZE), seed=3)
    original = convert_hf_to_original(net.sam3.state_dict(), net.sam3.config)
    torch.save({"model": {f"detector.{k}": v.contiguous() for k, v in original.items()}}, folder / "sam3.pt")
    return folder / "sam3.pt", net.save_pretrained(folder / "saved")


def official(sam3_pt: Path, pictures: list[Path], threshold: float, out: Path, box: list[float] | None = None
             ) -> list[dict]:
    done = subprocess.run([str(official_python()), str(REPO / "scripts" / "official_segment.py"),
                           str(out), *map(str, pictures), "--checkpoint", str(sam3_pt), "--prompt", PROMPT,
                           "--threshold", str(threshold), "--tiny", *(["--box", *map(str, box)] if box else [])],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return [{key: arrays[f"{key}_{i}"] for key in ("scores", "union", "probability", "all_scores")}
                for i in range(len(pictures))]


def ours(folder: Path, picture: Path, protocol: str, threshold: float, out: Path, box: list[float] | None = None
         ) -> tuple[np.ndarray, float]:
    threshold_option = ["--score-threshold", str(threshold)] if protocol == "threshold" else []
    box_option = ["--box", *map(str, box)] if box else []
    assert cli_main(["segment", str(picture), "--prompt", PROMPT, "--checkpoint", str(folder), "--protocol",
                     protocol, *threshold_option, *box_option, "--out", str(out), "--no-progress"]) == 0
    return np.asarray(Image.open(out)) > 0, json.loads(Path(f"{out}.json").read_text())["labels"]["255"]["score"]


def test_segment_gives_the_masks_and_scores_of_sam3s_processor(weights, shared_data, tmp_path):
    sam3_pt, folder = weights
    pictures = [shared_data / name for name in PICTURES]
    if not all(path.is_file() for path in pictures):
        pytest.skip("the shared Kvasir-SEG pictures are not there")
    everything = official(sam3_pt, pictures, -1.0, tmp_path / "all.npz")
    for picture, result in zip(pictures, everything):
        scores = np.sort(result["all_scores"])[::-1]
        assert len(scores) == 8 and np.all(np.diff(scores) < 0)  # the tiny detector's 8 queries, no ties
        cases = (("top_query", float(scores[0] + scores[1]) / 2, 1),
                 ("threshold", float(scores[2] + scores[3]) / 2, 3),
                 ("threshold", float(scores[0]) + 1e-3, 0))
        for protocol, threshold, kept in cases:
            [theirs] = official(sam3_pt, [picture], threshold, tmp_path / "one.npz")
            mask, score = ours(folder, picture, protocol, threshold, tmp_path / f"{picture.stem}_{kept}.png")
            assert len(theirs["scores"]) == kept and mask.shape == theirs["union"].shape
            # the label's score: the best kept query's (with none kept, the best query's, whose mask is empty)
            assert score == pytest.approx(float(scores[0]), abs=2e-5)
            differ = mask != theirs["union"]
            if kept:  # the same masks, each resized once from the same logits, united at the picture's size
                assert 0.05 < theirs["union"].mean() < 0.95
                assert np.all(np.abs(theirs["probability"][differ] - 0.5) < ROUNDING), (kept, int(differ.sum()))
            else:
                assert not mask.any() and not theirs["union"].any()


def test_segment_with_a_box_gives_the_mask_of_sam3s_text_and_box_prompt(weights, shared_data, tmp_path):
    sam3_pt, folder = weights
    picture = shared_data / PICTURES[0]
    if not picture.is_file():
        pytest.skip(f"{picture} is not there")
    box = [150.0, 100.0, 420.0, 380.0]  # pixels of the 622 x 529 picture
    [everything] = official(sam3_pt, [picture], -1.0, tmp_path / "all.npz", box)
    scores = np.sort(everything["all_scores"])[::-1]
    [theirs] = official(sam3_pt, [picture], float(scores[0] + scores[1]) / 2, tmp_path / "one.npz", box)
    mask, score = ours(folder, picture, "top_query", 0.0, tmp_path / "box.png", box)
    assert len(theirs["scores"]) == 1 and score == pytest.approx(float(scores[0]), abs=2e-5)
    text_only = official(sam3_pt, [picture], -1.0, tmp_path / "text.npz")[0]["all_scores"]
    assert not np.allclose(np.sort(text_only), np.sort(everything["all_scores"]))  # the box changed the scores
    differ = mask != theirs["union"]
    assert 0.05 < theirs["union"].mean() < 0.95
    assert np.all(np.abs(theirs["probability"][differ] - 0.5) < ROUNDING), int(differ.sum())
