"""The volume path's tracker against Meta's official SAM3 tracker (sam3 0.1.4), on the same random weights.

``scripts/official_tracker.py`` runs in the official environment (``make official``; skipped when it is not built):
sam3's own ``build_tracker`` at 112 px, its constant parameters perturbed, random features for 8 slices, three
objects each given a seed mask and propagated forward and back (its own ``add_new_mask`` / ``propagate_in_video``).
Here its state dict goes through our key map into transformers' ``Sam3TrackerVideoModel`` and the same seeds go
through ``inferers.tracking.track_prompts``: every slice's low-resolution mask logits must be sam3's within float
rounding, one prompt at a time and batched. transformers' port alone is up to 1014 away on the prompted slice (its
logits are +-10, sam3's +-1024) and about 2e-3 on tracked slices (memory encoding and seed pointer, see
``compat._mask_as_output`` and ``compat._official_memory``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import Sam3TrackerVideoConfig, Sam3TrackerVideoModel

from medsam3_monai.inferers import tracking
from medsam3_monai.networks.tracker_keys import convert_original_tracker

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_VENV = Path(os.environ.get("MEDSAM3_OFFICIAL_VENV")
                     or Path.home() / ".cache" / "medsam3-monai" / "sam3-official-venv")
#: float32 on the CPU: sam3 and we compute the same operations; measured 1.4e-6 (logits up to about 5)
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    python = OFFICIAL_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"the official SAM3 environment is not built at {OFFICIAL_VENV}: run `make official` "
                    "(scripts/setup_official_env.sh) to run this test")
    out = tmp_path_factory.mktemp("official") / "tracker.pt"
    done = subprocess.run([str(python), str(REPO / "scripts" / "official_tracker.py"), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def tracker(official) -> Sam3TrackerVideoModel:
    """transformers' tracker at the official run's size, holding the official weights (through our key map)."""
    model = Sam3TrackerVideoModel(Sam3TrackerVideoConfig(image_size=official["image_size"]),
                                  remove_vision_encoder=True)
    model.load_state_dict(convert_original_tracker(official["state_dict"]), strict=True)
    return model.eval()


def test_the_official_run_is_the_interactive_tracker_with_objects_present(official):
    assert official["settings"] == {"use_memory_selection": False, "num_maskmem": 7, "input_mask_size": 128}
    assert official["perturbed"] > 50 and len(official["state_dict"]) == 309
    for obj in official["objects"]:
        slices = official["slices"]
        assert sorted(obj["forward"]) == list(range(obj["seed"], slices))
        assert sorted(obj["backward"]) == list(range(obj["seed"] + 1))
        tracked = [step for passes in ("forward", "backward") for z, step in obj[passes].items() if z != obj["seed"]]
        # the objects are present on the tracked slices (a comparison of empty masks would prove nothing)
        assert all(step["score"] > 0 and 0.05 < (step["logits"] > 0).float().mean() < 0.95 for step in tracked)


def test_key_map_covers_the_official_tracker(official, tracker):
    converted = convert_original_tracker(official["state_dict"])
    assert len(converted) == 307 and set(converted) == set(tracker.state_dict())
    embed = tracker.prompt_encoder.point_embed.weight
    assert torch.equal(embed, torch.cat([official["state_dict"][f"sam_prompt_encoder.point_embeddings.{i}.weight"]
                                         for i in range(4)]))
    assert torch.equal(tracker.memory_encoder.mask_downsampler.final_conv.weight,
                       official["state_dict"]["maskmem_backbone.mask_downsampler.encoder.12.weight"])


@pytest.mark.parametrize("max_batch", [1, 8])
def test_propagation_equals_the_official_tracker(official, tracker, max_batch):
    size, slices, objects = official["image_size"], official["slices"], official["objects"]
    frames = {z: [level.flatten(2).permute(2, 0, 1) for level in official["features"][z]] for z in range(slices)}
    positions = [p.flatten(2).permute(2, 0, 1) for p in official["positions"]]
    logged: list[tuple[tracking.TrackingGroup, list[torch.Tensor]]] = []
    frame_masks, propagate_group = tracking.frame_masks, tracking._propagate_group

    def record_masks(session, step):
        logits = frame_masks(session, step)
        logged[-1][1].append(logits.clone())
        return logits

    def record_group(tracker, group, *args, **kwargs):
        logged.append((group, []))
        return propagate_group(tracker, group, *args, **kwargs)

    seeds = [obj["seed"] for obj in objects]
    masks = torch.stack([obj["mask"] for obj in objects])
    with mock.patch.object(tracking, "frame_masks", record_masks), \
            mock.patch.object(tracking, "_propagate_group", record_group):
        bits = dict(tracking.track_prompts(tracker, frames, positions, seeds, masks, size, max_batch=max_batch))
    assert sorted(bits) == [0, 1, 2]
    assert max(len(group.members) for group, _ in logged) == (2 if max_batch > 1 else 1)  # objects 0, 1 share a seed
    compared = 0
    for group, steps in logged:
        forward_steps = group.num_steps - group.seed
        for i, logits in enumerate(steps):
            step = group.seed + i if i < forward_steps else group.seed - (i - forward_steps)
            for row, member in enumerate(group.members):
                z = group.slices_at(step)[row]
                passes = objects[member]["forward" if i < forward_steps else "backward"]
                if z in passes:
                    torch.testing.assert_close(logits[row, 0].float(), passes[z]["logits"], rtol=0,
                                               atol=TOLERANCE, msg=f"object {member}, slice {z}, step {i}")
                    compared += 1
    assert compared == sum(len(obj["forward"]) + len(obj["backward"]) for obj in objects)
