"""The volume path's tracker against Meta's official SAM3 tracker (sam3 0.1.4), on the same random weights.

``scripts/official_tracker.py`` runs in the official environment (``make official``; skipped when it is not built):
sam3's own ``build_tracker`` at 112 px and the tracker's neck of its video model (on a trunk of the tiny detector's
width), their constant parameters perturbed, random trunk outputs for 8 slices, three objects each given a
seed mask and propagated forward and back (its own ``add_new_mask`` / ``propagate_in_video``). Here the tracker and
its neck go into a ``sam3.pt`` laid out as Meta's (``tracker.*``, ``detector.backbone.vision_backbone.sam2_convs.*``,
a detector), ``build_tracker`` loads it, ``inferers.volume``'s tracker features are made from the same trunk outputs
and ``inferers.tracking.track_prompts`` propagates the same seeds: the features and every slice's low-resolution
mask logits must be sam3's within float rounding, one prompt at a time and batched, with the objects present on
every slice and with some slices where they are absent (the no-object pointer and occlusion embedding).
transformers' port alone is up to 1014 away on the prompted slice (its logits are +-10, sam3's +-1024) and about 2e-3
on tracked slices (memory encoding and seed pointer, see ``compat._mask_as_output`` and ``compat._official_memory``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
from _model_helpers import same_weights
from transformers import Sam3TrackerVideoModel, Sam3VideoModel
from _official_helpers import official_python

from medsam3_monai.inferers import tracking
from medsam3_monai.inferers.volume import _TrackerFeatures
from medsam3_monai.networks import MedSAM3Net, tiny_sam3_config
from medsam3_monai.networks.key_mapping import convert_hf_to_original
from medsam3_monai.deploy.cli import main as cli_main
from medsam3_monai.networks.tracker import build_tracker, has_tracker_weights, resolve_tracker, tracker_config_for
from medsam3_monai.networks.tracker_keys import convert_original_tracker

REPO = Path(__file__).resolve().parents[1]
#: the slice size of the comparison; ``MEDSAM3_OFFICIAL_TRACKER_SIZE=1008`` runs it at SAM3's (about 10 min)
IMAGE_SIZE = int(os.environ.get("MEDSAM3_OFFICIAL_TRACKER_SIZE", "112"))
#: the tiny detector's width (ViT and FPN): SAM3's FPN and the tracker's neck have 256 channels
WIDTH = 256
#: float32 on the CPU: sam3 and we compute the same operations; measured 1.4e-6 at 112 px and 1.0e-6 at 1008 px
#: (logits up to about 5)
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


#: object-score biases of the official run: 15, every tracked slice has the object (random weights would give
#: scores near 0); 0, scores of either sign, so absent slices (no-object pointer, occlusion embedding in the memory)
#: come before present ones
OBJECT_SCORE_BIASES = {"present": 15.0, "mixed_presence": 0.0}


@pytest.fixture(scope="module", params=list(OBJECT_SCORE_BIASES))
def official(request, tmp_path_factory) -> dict:
    python = official_python()
    out = tmp_path_factory.mktemp("official") / "tracker.pt"
    done = subprocess.run([str(python), str(REPO / "scripts" / "official_tracker.py"), str(out),
                           "--image-size", str(IMAGE_SIZE), "--trunk-width", str(WIDTH),
                           "--object-score-bias", str(OBJECT_SCORE_BIASES[request.param])],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**torch.load(out, weights_only=True), "case": request.param}


@pytest.fixture(scope="module")
def detector(official) -> MedSAM3Net:
    """A tiny detector whose FPN has SAM3's 256 channels, the tracker neck's (one trunk, two necks of one shape)."""
    return MedSAM3Net("tiny", config=tiny_sam3_config(official["image_size"], hidden_size=WIDTH)).eval()


@pytest.fixture(scope="module")
def sam3_pt(official, detector, tmp_path_factory) -> Path:
    """A ``sam3.pt`` laid out as Meta's: the detector, the official tracker and, among the detector's keys, the
    official tracker neck."""
    original = convert_hf_to_original(detector.sam3.state_dict(), detector.sam3.config)
    model = {f"detector.{k}": v for k, v in {**original, **official["neck_state_dict"]}.items()}
    model.update({f"tracker.{k}": v for k, v in official["state_dict"].items()})
    path = tmp_path_factory.mktemp("weights") / "sam3.pt"
    torch.save({"model": model}, path)
    return path


@pytest.fixture(scope="module")
def tracker(detector, sam3_pt) -> Sam3TrackerVideoModel:
    """transformers' tracker holding the official weights, loaded from the ``sam3.pt`` as ``--tracker auto`` does
    (the tracker around this detector)."""
    assert has_tracker_weights(str(sam3_pt))
    tracker, described = resolve_tracker("auto", str(sam3_pt), detector, described=True)
    assert described == str(sam3_pt)
    # its ViT weights are the detector's: one ViT module, so no volume compares the weights again
    assert tracker.vision_encoder.backbone is detector.sam3.vision_encoder.backbone
    return tracker


def test_a_tracker_whose_vit_is_not_the_detectors_is_said_to_run_its_own(official, detector, sam3_pt):
    """A detector fine-tuned away from the sam3.pt (here: another seed) with that file's tracker: the tracker keeps
    its own ViT, which the described tracker (printed and logged) now says; it said only the path."""
    other = MedSAM3Net("tiny", config=tiny_sam3_config(official["image_size"], hidden_size=WIDTH), seed=9).eval()
    tracker, described = resolve_tracker(str(sam3_pt), "tiny", other, described=True)
    assert described.startswith(f"{sam3_pt} (its own ViT: its weights are not the detector's")
    assert tracker.vision_encoder.backbone is not other.sam3.vision_encoder.backbone


@pytest.fixture(scope="module")
def features(official, tracker) -> _TrackerFeatures:
    """The volume path's tracker features of the official run's trunk outputs."""
    features = _TrackerFeatures(tracker)
    for z, trunk in enumerate(official["trunk"]):
        features.from_vit_output(trunk.flatten(2).transpose(1, 2), z, z + 1)  # (1, HW, W) as the ViT gives it
    return features


def test_the_official_run_is_the_interactive_tracker_with_objects_present(official):
    assert official["image_size"] == IMAGE_SIZE
    assert official["settings"] == {"use_memory_selection": False, "num_maskmem": 7,
                                    "input_mask_size": 16 * (IMAGE_SIZE // 14)}  # 1152 at 1008 px
    assert official["perturbed"] > 50 and len(official["state_dict"]) == 309
    for obj in official["objects"]:
        slices = official["slices"]
        assert sorted(obj["forward"]) == list(range(obj["seed"], slices))
        assert sorted(obj["backward"]) == list(range(obj["seed"] + 1))
        tracked = [step for passes in ("forward", "backward") for z, step in obj[passes].items() if z != obj["seed"]]
        present = [step for step in tracked if step["score"] > 0]
        # a present object has a mask to compare (a comparison of empty masks would prove nothing)
        assert all(0.05 < (step["logits"] > 0).float().mean() < 0.95 for step in present)
        if official["case"] == "present":
            assert len(present) == len(tracked)
        else:  # absent slices (all logits -1024), and present ones after them
            assert 0 < len(present) < len(tracked)
            assert all((step["logits"] == -1024).all() for step in tracked if step["score"] <= 0)


def test_the_official_run_refuses_fewer_slices_than_its_seeds_need(tmp_path):
    """--slices below the seed slices + 1: one usage line and nothing written (sam3 used to fail mid-run on an
    uncached frame)."""
    python = official_python()
    done = subprocess.run([str(python), str(REPO / "scripts" / "official_tracker.py"), str(tmp_path / "t.pt"),
                           "--slices", "5"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "error: --slices must be at least 6: the objects are seeded on slices 3, 5"), done.stderr
    assert not list(tmp_path.iterdir())


def test_a_sam3_pt_holds_a_tracker_and_a_detector(sam3_pt, detector, tracker):
    # the tracker neck among the detector keys is set aside: the detector loads strictly
    assert same_weights(MedSAM3Net(sam3_pt, config=detector.sam3.config).sam3, detector.sam3)
    assert tracker.config.image_size == detector.image_size and not tracker.training
    assert same_weights(tracker.vision_encoder.backbone, detector.sam3.vision_encoder.backbone)  # the one trunk
    built = build_tracker(sam3_pt, config=tracker_config_for(detector.sam3.config))
    assert same_weights(built, tracker)


def test_a_tracker_that_does_not_fit_is_reported_in_the_files_own_key_names(sam3_pt, detector, tmp_path):
    """A ``sam3.pt`` whose tracker does not fit the architecture: the key report names each tensor the file holds
    as the file has it (``tracker.*``, the neck's ``detector.*``), beside transformers' name; nothing loads."""
    from medsam3_monai.networks.checkpoints import CheckpointError
    from medsam3_monai.networks.tracker import tracker_config_for

    model = torch.load(sam3_pt, weights_only=True)["model"]
    model["tracker.maskmem_tpos_enc"] = model["tracker.maskmem_tpos_enc"][:3]
    model["tracker.extra_head.weight"] = torch.zeros(2)
    neck = next(k for k in model if k.startswith("detector.backbone.vision_backbone.sam2_convs.") and
                k.endswith(".weight"))
    model[neck] = model[neck][:1]
    broken = tmp_path / "sam3.pt"
    torch.save({"model": model}, broken)
    with pytest.raises(CheckpointError) as raised:
        build_tracker(broken, config=tracker_config_for(detector.sam3.config))
    report = str(raised.value)
    assert "does not match the SAM3 tracker's architecture; nothing was loaded" in report
    assert "extra_head.weight (original name: tracker.extra_head.weight)" in report
    assert "memory_temporal_positional_encoding (original name: tracker.maskmem_tpos_enc): (3," in report
    assert f"(original name: {neck}): (1," in report


def test_convert_checkpoint_writes_the_facebook_layout_with_the_tracker(tmp_path, sam3_pt, detector, tracker, capsys):
    config = tmp_path / "config.json"
    detector.sam3.config.to_json_file(str(config))
    dst = tmp_path / "hf"
    assert cli_main(["convert-checkpoint", str(sam3_pt), str(dst), "--config", str(config)]) == 0
    assert "detector and tracker, facebook/sam3 layout" in capsys.readouterr().out
    assert same_weights(MedSAM3Net(dst).sam3, detector.sam3)
    assert same_weights(build_tracker(dst), tracker)
    assert resolve_tracker("auto", str(dst), detector, described=True)[1] == str(dst)
    video = Sam3VideoModel.from_pretrained(dst)  # plain transformers reads it: detector and tracker
    assert same_weights(video.detector_model, detector.sam3)
    assert torch.equal(video.tracker_model.memory_encoder.projection.weight, tracker.memory_encoder.projection.weight)


def test_key_map_covers_the_official_tracker_and_neck(official, tracker):
    converted = convert_original_tracker({**official["state_dict"], **official["neck_state_dict"]})
    ours = {k for k in tracker.state_dict() if not k.startswith("vision_encoder.backbone.")}
    assert len(converted) == 307 + 22 and set(converted) == ours
    embed = tracker.prompt_encoder.point_embed.weight
    assert torch.equal(embed, torch.cat([official["state_dict"][f"sam_prompt_encoder.point_embeddings.{i}.weight"]
                                         for i in range(4)]))
    assert torch.equal(tracker.memory_encoder.mask_downsampler.final_conv.weight,
                       official["state_dict"]["maskmem_backbone.mask_downsampler.encoder.12.weight"])
    assert torch.equal(tracker.vision_encoder.neck.fpn_layers[0].scale_layers[2].weight,
                       official["neck_state_dict"]["backbone.vision_backbone.sam2_convs.0.dconv_2x2_1.weight"])


def test_tracker_features_equal_the_official_neck_and_projections(official, features):
    for z in range(official["slices"]):
        for ours, theirs in zip(features.frames[z], official["features"][z]):
            torch.testing.assert_close(ours, theirs.flatten(2).permute(2, 0, 1), rtol=0, atol=1e-5)
    for ours, theirs in zip(features.positions, official["positions"]):
        torch.testing.assert_close(ours, theirs.flatten(2).permute(2, 0, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("max_batch", [1, 8])
def test_propagation_equals_the_official_tracker(official, tracker, features, max_batch):
    size, objects = official["image_size"], official["objects"]
    frames, positions = features.frames, features.positions
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
