"""Several prompts through SAM3's tracker in one batch (inferers.tracking, compat.batched_objects): against
transformers' own propagation loop, one object at a time, with the two steps where we follow Meta's tracker instead
of transformers' port swapped in (the numbers of those steps are held to sam3 0.1.4 itself in
test_official_tracker.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from medsam3_monai import compat
from medsam3_monai.inferers import BitMasks
from medsam3_monai.inferers import tracking
from medsam3_monai.inferers.tracking import TrackingGroup, plan_tracking_groups, track_prompts, tracker_lookahead
from medsam3_monai.inferers.volume import _TrackerFeatures, detect_slices
from medsam3_monai.networks import MedSAM3Net
from medsam3_monai.networks.outputs import upsample_logits
from medsam3_monai.networks.tracker import build_tracker

S = 112
DEPTH = 40  # more than 2 x the lookahead (15): the sessions forget slices in both passes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volume():
    """A tiny detector and tracker (objects always "present", so the masks are visible) and the tracker's
    features of DEPTH random slices."""
    detector = MedSAM3Net("tiny").eval()
    tracker = build_tracker("tiny", detector=detector)
    with torch.no_grad():
        tracker.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    slices = torch.randint(0, 256, (DEPTH, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = _TrackerFeatures(tracker)
    detect_slices(detector, slices, ["liver"], batch_size=8, vision_hook=features.from_vit_output)
    return tracker, features


def seed_masks(count: int) -> torch.Tensor:
    masks = torch.zeros(count, S, S, dtype=torch.bool)
    for k in range(count):
        masks[k, 20 + 3 * k : 60 + 3 * k, 30 + 2 * k : 70] = True
    return masks


def transformers_propagation(tracker, features, seed: int, mask: torch.Tensor) -> torch.Tensor:
    """(D, S, S) bool: transformers' own propagation loop for one object (``propagate_in_video_iterator``, batch
    size 1, every slice's outputs kept), forward from the seed, then backward, as the volume path always ran it;
    its prompted-slice output and memory encoding are Meta's (``compat._mask_as_output``, ``_official_memory``)."""
    frames = features.frames
    session = compat.tracker_session(len(frames), S, torch.device("cpu"), torch.float32, lambda i: frames[i],
                                     features.positions)
    compat.add_mask_prompt(session, obj_id=1, frame_idx=seed, mask=mask)
    low_res = {}
    tracker._use_mask_as_output = partial(compat._mask_as_output, tracker)
    tracker._encode_new_memory = partial(compat._official_memory, tracker)
    try:
        for reverse in (False, True):
            for out in tracker.propagate_in_video_iterator(session, start_frame_idx=seed, reverse=reverse):
                low_res[int(out.frame_idx)] = out.pred_masks[0, 0].float()
    finally:
        del tracker._use_mask_as_output, tracker._encode_new_memory
    assert sorted(low_res) == list(range(len(frames)))
    stacked = torch.stack([low_res[i] for i in range(len(frames))])[:, None]
    return upsample_logits(stacked, S)[:, 0] > 0


def tracked(tracker, features, seeds, masks, max_batch) -> dict[int, torch.Tensor]:
    return {p: BitMasks(bits, S).unpack() for p, bits in track_prompts(
        tracker, features.frames, features.positions, seeds, masks, S, max_batch=max_batch)}


# ---------------------------------------------------------------------------------------- the swapped steps
def test_batched_steps_are_transformers_steps_at_batch_one_and_per_prompt_at_more(volume):
    tracker, features = volume
    generator = torch.Generator().manual_seed(1)
    frames = [features.frames[z] for z in (3, 17, 30)]
    embeddings = [torch.cat(level, dim=1).permute(1, 2, 0) for level in zip(*frames)]  # (B, C, HW) per level
    sizes = tracker.backbone_feature_sizes
    embeddings = [e.reshape(*e.shape[:2], *size) for e, size in zip(embeddings, sizes)]
    embeddings[-1] = embeddings[-1] + torch.randn(embeddings[-1].shape, generator=generator)
    masks = torch.rand(3, 1, S, S, generator=generator) > 0.6
    with torch.no_grad():
        for multimask in (True, False):
            ours = compat._frame_forward(tracker, image_embeddings=embeddings, multimask_output=multimask)
            for b in range(3):
                one = [e[b : b + 1] for e in embeddings]
                theirs = tracker._single_frame_forward(image_embeddings=one, multimask_output=multimask)
                alone = compat._frame_forward(tracker, image_embeddings=one, multimask_output=multimask)
                for key in ("pred_masks", "high_res_masks", "object_pointer", "object_score_logits", "iou_scores"):
                    assert torch.equal(getattr(alone, key), getattr(theirs, key)), (multimask, key)
                    torch.testing.assert_close(getattr(ours, key)[b : b + 1], getattr(theirs, key), msg=key)
        # the prompted slice (Meta's steps, not transformers'): each prompt of a batch gets what it gets alone
        ours = compat._mask_as_output(tracker, embeddings[-1], embeddings[:-1], masks)
        for b in range(3):
            alone = compat._mask_as_output(tracker, embeddings[-1][b : b + 1],
                                           [e[b : b + 1] for e in embeddings[:-1]], masks[b : b + 1])
            for key in ("pred_masks", "high_res_masks", "object_pointer", "object_score_logits"):
                torch.testing.assert_close(getattr(ours, key)[b : b + 1], getattr(alone, key), msg=key)
    # transformers' own steps are back after a batched run
    with compat.batched_objects(tracker):
        assert "_single_frame_forward" in vars(tracker) and type(tracker.memory_attention).__name__.startswith("_")
    assert "_single_frame_forward" not in vars(tracker) and "_use_mask_as_output" not in vars(tracker)
    assert type(tracker.memory_attention).__name__ == "Sam3TrackerVideoMemoryAttention"


# ---------------------------------------------------------------------------------------- propagation
@pytest.mark.parametrize("seed", [0, 12, DEPTH - 3])
def test_one_prompt_gets_the_propagation_of_transformers_loop(volume, seed):
    tracker, features = volume
    mask = seed_masks(1)
    with torch.no_grad():
        expected = transformers_propagation(tracker, features, seed, mask[0])
        got = tracked(tracker, features, [seed], mask, max_batch=1)[0]
    assert expected.any() and torch.equal(got, expected)


def test_prompts_in_a_batch_get_the_masks_they_get_alone(volume, monkeypatch):
    tracker, features = volume
    seeds = [12, 0, 14, 12, 9, DEPTH - 1, DEPTH - 3, DEPTH - 3, 20, 3]
    groups = plan_tracking_groups(seeds, DEPTH, tracker_lookahead(tracker), max_batch=4)
    assert max(len(g.members) for g in groups) == 4 and any(len(set(g.seeds)) > 1 for g in groups)
    sessions = []
    monkeypatch.setattr(tracking, "tracker_session", lambda *a: sessions.append(compat.tracker_session(*a))
                        or sessions[-1])
    masks = seed_masks(len(seeds))
    with torch.no_grad():
        alone = tracked(tracker, features, seeds, masks, max_batch=1)
        batched = tracked(tracker, features, seeds, masks, max_batch=4)
    assert sorted(batched) == list(range(len(seeds)))
    for p in range(len(seeds)):
        assert alone[p].any()
        # the same operations; a batched matrix product may round its last bit differently
        assert int((alone[p] != batched[p]).sum()) <= alone[p].numel() // 10_000, p
    # a session keeps only what its next steps read: a bounded memory bank, no high-resolution logits
    lookahead = tracker_lookahead(tracker)
    for session in sessions:
        kept = session.output_dict_per_obj[0]["non_cond_frame_outputs"]
        assert len(kept) <= 2 * lookahead + 2 < DEPTH
        assert all("high_res_masks" not in out and "pred_masks" not in out for out in kept.values())


def test_batched_propagation_against_transformers_one_object_at_a_time(volume):
    """The whole chain against the reference that needs none of our code in its steps."""
    tracker, features = volume
    seeds = [5, 11, 20]
    masks = seed_masks(3)
    with torch.no_grad():
        batched = tracked(tracker, features, seeds, masks, max_batch=3)
        for p, seed in enumerate(seeds):
            expected = transformers_propagation(tracker, features, seed, masks[p])
            assert int((expected != batched[p]).sum()) <= expected.numel() // 10_000, p


# ---------------------------------------------------------------------------------------- planning
def test_plan_batches_seeds_by_window_and_keeps_seeds_near_the_end_apart():
    lookahead, depth = 15, 100
    seeds = [50, 10, 90, 30, 11, 90, 95, 35, 0, 60, 61, 62]
    groups = plan_tracking_groups(seeds, depth, lookahead, max_batch=3, window=0.25)
    assert [g.seeds for g in groups] == [(0, 10, 11), (30, 35, 50), (60, 61, 62), (90, 90), (95,)]
    assert sorted(m for g in groups for m in g.members) == list(range(len(seeds)))
    assert all(seeds[m] == s for g in groups for m, s in zip(g.members, g.seeds))
    group = groups[1]  # seeds 30, 35, 50 on one timeline: the seeds coincide at step 50
    assert group.seed == 50 and group.num_steps == 50 + (depth - 1 - 30) + 1
    assert group.slices_at(50) == [30, 35, 50] and group.slices_at(0) == [-20, -15, 0]
    assert [g.seeds for g in plan_tracking_groups(seeds, depth, lookahead, max_batch=1)] == \
        [(s,) for s in sorted(seeds)]
    assert plan_tracking_groups([], depth, lookahead) == []
    with pytest.raises(ValueError, match="slices 0 .. 99"):
        plan_tracking_groups([100], depth, lookahead)
    with pytest.raises(ValueError, match="max_batch"):
        plan_tracking_groups([1], depth, lookahead, max_batch=0)
    assert TrackingGroup((0,), (7,), 10).num_steps == 10


def test_tracker_batch_is_a_segment_evaluate_serve_and_bundle_option(hippocampus, tmp_path, capsys, monkeypatch):
    """``--tracker-batch N`` reaches the tracker from ``medsam3 segment`` and ``evaluate`` (``serve`` has it too),
    ``tracker_batch`` from the bundles' configs; the masks do not depend on it; 0 is refused before any output."""
    import nibabel as nib
    import numpy as np

    from medsam3_monai.bundle import config_parser
    from medsam3_monai.data import build_datalist, write_datalist
    from medsam3_monai.deploy.cli import main
    from medsam3_monai.inferers import volume as volume_module

    batches: list[int] = []

    def recorded(*args, max_batch: int, **kwargs):
        batches.append(max_batch)
        return track_prompts(*args, max_batch=max_batch, **kwargs)

    monkeypatch.setattr(volume_module, "track_prompts", recorded)
    prompts = ["--prompt", "anterior hippocampus", "--prompt", "posterior hippocampus", "--prompt", "ventricle"]
    common = [str(hippocampus), *prompts, "--tracker", "tiny", "--score-threshold", "0.2", "--no-progress"]
    assert main(["segment", *common, "--out", str(tmp_path / "default.nii.gz")]) == 0
    assert main(["segment", *common, "--out", str(tmp_path / "one.nii.gz"), "--tracker-batch", "1"]) == 0
    assert batches == [tracking.TRACKER_BATCH, 1]
    default, one = (np.asarray(nib.load(tmp_path / name).dataobj) for name in ("default.nii.gz", "one.nii.gz"))
    assert len(np.unique(default)) > 1 and (one != default).mean() <= 1e-4  # batched products may round differently
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", *common, "--out", str(tmp_path / "zero.nii.gz"), "--tracker-batch", "0"])
    assert exit_info.value.code == 2 and "give a number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "zero.nii.gz").exists() and len(batches) == 2

    folder = hippocampus.parents[1]
    datalist = write_datalist(build_datalist("MSD_Task04_Hippocampus_cropped", folder).datalist, tmp_path / "hip.json")
    assert main(["evaluate", "--datalist", str(datalist), "--checkpoint", "tiny", "--split", "all", "--max-cases", "1",
                 "--tracker", "tiny", "--score-threshold", "0.2", "--tracker-batch", "2", "--no-mlflow",
                 "--overlays", "0", "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    assert batches[2:] == [2] and (tmp_path / "eval" / "cases.csv").exists()

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert f"(default {tracking.TRACKER_BATCH};" in " ".join(capsys.readouterr().out.split())
    for overrides, expected in (({}, tracking.TRACKER_BATCH), ({"tracker_batch": 3}, 3)):
        parser = config_parser("inference.json", checkpoint="tiny", tracker=None, **overrides)
        assert parser.get_parsed_content("inferer").tracker_batch == expected
