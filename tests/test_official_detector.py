"""Our detector computes what Meta's official SAM3 code computes, checked on every change: ``scripts/check_official.py
--tiny`` builds sam3 0.1.4's own ``Sam3Image`` in its environment at a tiny size (``scripts/official_tiny.py``),
perturbs and saves it as a ``sam3.pt``, and compares with our network loaded from that file (and from the folder it
saves): inference outputs of every decoder layer for text-only, text + box and box-only prompts, the training (DAC)
forward, every loss term against sam3's ``Sam3LossWrapper`` and the gradient of every parameter after the backbones,
at the full-size check's tolerances. transformers' own ``Sam3Model.forward`` is the control: its text-only prompts
lack the geometry token, and the comparison sees it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _official_helpers import official_python

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from check_official import TOLERANCES  # noqa: E402


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> dict:
    python = official_python()
    out = tmp_path_factory.mktemp("official_check") / "check"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_official.py"), "--tiny", "--official-python",
                           str(python), "--seeds", "0", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads(out.with_suffix(".json").read_text())
    summary["markdown"] = out.with_suffix(".md").read_text()
    return summary


def test_the_tiny_detector_equals_the_official_one_outputs_losses_and_gradients(check):
    assert check["within_tolerance"] and check["tiny"] and check["image_size"] == 112
    assert check["outputs_over_tolerance"] == []
    [result] = check["results"]
    columns = result["columns"]
    assert set(columns) == {"sam3.pt", "saved folder", "Sam3Model.forward (last layer)"}
    rows = columns["sam3.pt"]
    for case in ("text_only", "text_box", "box_only"):
        for output in ("logits", "boxes", "presence", "masks", "semantic"):
            assert f"{case}/{output}" in rows and f"{case}/{output}" in columns["saved folder"]
    assert {f"train/{k}" for k in ("logits", "boxes", "masks", "o2m_logits", "o2m_masks")} <= set(rows)
    assert result["losses"]["(terms without an official counterpart)"] == 0
    assert result["losses"]["(official loss terms without one of ours)"] == []
    gradients = result["gradients"]
    assert gradients["compared"] > 150 and gradients["only_one_side"] == []
    assert check["max_rel_diff_gradients"] <= 1e-3


def test_the_comparison_sees_transformers_missing_geometry_token(check):
    """The control: transformers' own forward on the same weights is off on text-only prompts (SAM3 encodes the
    empty geometric prompt, whose CLS token joins the text), within tolerance where boxes are given."""
    plain = check["results"][0]["columns"]["Sam3Model.forward (last layer)"]
    assert plain["text_only/masks"] > 100 * TOLERANCES["masks"]
    assert plain["text_box/masks"] <= TOLERANCES["masks"] and plain["box_only/masks"] <= TOLERANCES["masks"]
    assert "random tiny weights, 112 px" in check["markdown"] and "--tiny" in check["markdown"]
