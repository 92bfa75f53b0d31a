"""3D inference: detector on every slice, SAM3's tracker both ways from the most confident slice, merge,
and a real hippocampus volume through slice space and back to its own geometry."""

from __future__ import annotations

import json
import math

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from safetensors.torch import load_file, save_file

from _model_helpers import same_weights, tracker_neck
from _transforms_helpers import SAMPLES, item, requires_data
from medsam3_monai.inferers import (
    BitMasks,
    VolumeSegmentation,
    detect_slices,
    segment_volume,
    select_seeds,
)
from medsam3_monai.inferers import volume as volume_module
from medsam3_monai.inferers.protocols import top_query_logits
from medsam3_monai.networks import CheckpointError, MedSAM3Net, network_pixels, tiny_sam3_config
from medsam3_monai.networks.key_mapping import convert_hf_to_original
from medsam3_monai.networks.tracker import build_tracker, has_tracker_weights, resolve_tracker, tiny_tracker_config
from medsam3_monai.transforms import RestackSlicesd, sam3_normalize, slice_space_transforms

S = 112
PROMPTS = ["anterior hippocampus", "posterior hippocampus"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector() -> MedSAM3Net:
    return MedSAM3Net("tiny").eval()


def present_tracker(**kwargs):
    """A tiny tracker whose object score always says "present", so its random masks are visible."""
    tracker = build_tracker("tiny", **kwargs)
    with torch.no_grad():
        tracker.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    return tracker


@pytest.fixture(scope="module")
def tracker():
    return present_tracker()


def random_slices(depth: int, seed: int = 0) -> torch.Tensor:
    """(depth, 3, S, S) random float slices in [0, 1], as ``segment_volume`` takes them by default."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(depth, 3, S, S, generator=generator)


class PropagationSpy:
    """Records every propagation the tracker runs: (start slice, reverse, slices visited in order), one entry per
    pass of each session (a batch of prompts with one seed shares its session)."""

    def __init__(self, tracker, monkeypatch):
        self.runs: list[tuple[int, bool, list[int]]] = []
        original = tracker.forward
        sessions: list[object] = []

        def spy(session, frame_idx=None, reverse=False, **kwargs):
            if not sessions or sessions[-1] is not session or self.runs[-1][1] != reverse:
                sessions.append(session)
                self.runs.append((frame_idx, reverse, []))
            self.runs[-1][2].append(frame_idx)
            return original(session, frame_idx=frame_idx, reverse=reverse, **kwargs)

        monkeypatch.setattr(tracker, "forward", spy)


def hand_set_detections(monkeypatch, depth: int, confident: dict[int, int]):
    """Replace the detector pass: a square on every slice of every prompt, score 0.9 on ``confident``
    {prompt: slice} and 0.1 elsewhere."""
    square = torch.zeros(S, S, dtype=torch.bool)
    square[40:72, 36:80] = True

    def fake(detector, slices, prompts, **kwargs):
        masks = square.expand(len(prompts), depth, S, S).clone()
        scores = torch.full((len(prompts), depth), 0.1)
        for prompt, index in confident.items():
            scores[prompt, index] = 0.9
        return BitMasks.pack(masks), scores

    monkeypatch.setattr(volume_module, "detect_slices", fake)
    return square


# ---------------------------------------------------------------------------------------- builder
def test_tiny_tracker_is_reproducible_by_seed_and_fully_initialised():
    a, b, c = build_tracker("tiny", seed=0), build_tracker("tiny", seed=0), build_tracker("tiny", seed=1)
    assert not a.training and a.config.image_size == S
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    assert all(torch.isfinite(v).all() for v in sa.values() if v.is_floating_point())
    assert build_tracker("tiny", image_size=224).config.image_size == 224


def test_tracker_built_with_a_detector_uses_its_vit_module(detector):
    tied = build_tracker("tiny", detector=detector)
    assert tied.vision_encoder.backbone is detector.sam3.vision_encoder.backbone
    with pytest.raises(ValueError, match="differs from the detector"):
        build_tracker("tiny", image_size=224, detector=detector)


def _tiny_sam3_video_folder(tmp_path):
    """A facebook/sam3-layout folder (model_type sam3_video) of a tiny random SAM3 video model."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    detector_config = tiny_sam3_config(S, hidden_size=128)  # SAM3: the tracker neck is the detector's FPN shape
    tracker_config = tiny_tracker_config(S, detector_config.vision_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Sam3VideoModel(Sam3VideoConfig(detector_config=detector_config.to_dict(),
                                               tracker_config=tracker_config.to_dict()))
    # written by hand as facebook/sam3 ships it (detector_model.*, tracker_model.*, tracker_neck.*):
    # Sam3VideoModel.save_pretrained writes tracker_model.tracker_model.* instead
    folder = tmp_path / "sam3"
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return model, folder


def test_build_tracker_loads_the_facebook_sam3_layout_strictly(tmp_path, detector):
    model, folder = _tiny_sam3_video_folder(tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam3_video"
    tracker = build_tracker(folder)
    assert not tracker.training and tracker.config.image_size == S
    source = model.state_dict()
    for key, value in tracker.state_dict().items():  # tracker, its neck, and the detector's ViT
        if key.startswith("vision_encoder.backbone."):
            origin = "detector_model." + key
        elif key.startswith("vision_encoder.neck."):
            origin = "tracker_neck." + key[len("vision_encoder.neck."):]
        else:
            origin = "tracker_model." + key
        assert torch.equal(source[origin], value), key
    with pytest.raises(ValueError, match="works at 112 px"):
        build_tracker(folder, image_size=224)
    # --tracker auto with that folder as the checkpoint: its own tracker, the same weights
    chosen, described = resolve_tracker("auto", str(folder), detector, described=True)
    assert same_weights(chosen, tracker)  # (this detector is not the folder's: the description says so)
    assert described.startswith(f"{folder} (its own ViT: its weights are not the detector's")
    # a tracker weight missing from the file: an error naming it, not a silent random init
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    dropped = next(k for k in tensors if k.startswith("tracker_model.memory_encoder."))
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        build_tracker(folder)


def test_build_tracker_rejects_bad_sources_with_a_reason(tmp_path, detector):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_tracker(tmp_path / "nowhere")
    (tmp_path / "sam3.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_tracker(tmp_path / "sam3.pt")
    assert resolve_tracker("auto", str(tmp_path / "sam3.pt"), detector, described=True) == (
        None, "none (the checkpoint has no tracker weights)")
    # an original-layout detector without tracker.* keys (a Medical-SAM3 release, an image model), with or without
    # the tracker's neck among its keys (saved from SAM3's video model)
    original = convert_hf_to_original(detector.sam3.state_dict(), detector.sam3.config)
    for name, state in (("detector.pt", original), ("with_neck.pt", {**original, **tracker_neck(original)})):
        torch.save({"model": {f"detector.{k}": v for k, v in state.items()}}, tmp_path / name)
        with pytest.raises(CheckpointError, match="holds no SAM3 tracker weights"):
            build_tracker(tmp_path / name)
        assert resolve_tracker("auto", str(tmp_path / name), detector) is None
    detector.save_pretrained(tmp_path / "detector_only")  # model_type sam3: no tracker in it
    with pytest.raises(CheckpointError, match="no tracker"):
        build_tracker(tmp_path / "detector_only")
    assert resolve_tracker("auto", str(tmp_path / "detector_only"), detector, described=True) == (
        None, "none (the checkpoint has no tracker weights)")  # auto: the detector alone


def test_a_sam3_pt_is_recognised_in_every_layout_loading_reads(tmp_path):
    """``--tracker auto`` finds a sam3.pt's tracker whatever wrapper or serialisation the loader accepts."""
    state = {"detector.transformer.x": torch.zeros(1), "tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64)}
    for name, payload, legacy in (("plain.pt", state, False), ("model.pt", {"model": state}, False),
                                  ("state_dict.pt", {"state_dict": state}, False),
                                  ("legacy.pt", {"model": state}, True)):
        torch.save(payload, tmp_path / name, _use_new_zipfile_serialization=not legacy)
        assert has_tracker_weights(str(tmp_path / name)), name
    torch.save({"model": {"detector.transformer.x": torch.zeros(1)}}, tmp_path / "detector.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert not has_tracker_weights(str(tmp_path / "detector.pt"))
    assert not has_tracker_weights(str(tmp_path / "text.pt"))


# ---------------------------------------------------------------------------------------- inference
def test_segment_volume_shapes_dtypes_and_per_slice_detections(detector, tracker):
    slices = random_slices(5)
    result = segment_volume(detector, slices, PROMPTS, tracker, score_threshold=0.0, batch_size=2)
    assert isinstance(result, VolumeSegmentation)
    assert result.masks.shape == (2, 5, S, S) and result.masks.dtype == torch.bool
    assert result.scores.shape == (2, 5) and result.scores.dtype == torch.float32
    assert result.seed_slices.shape == (2,) and result.seed_slices.dtype == torch.long
    assert ((result.scores >= 0) & (result.scores <= 1)).all()
    # batching (2 slices x 2 prompts per forward) keeps every (prompt, slice) pair in its place
    for z in (0, 3, 4):
        with torch.no_grad():
            logits, scores = top_query_logits(detector(slices[z : z + 1], PROMPTS), S)
        torch.testing.assert_close(result.scores[:, z], scores)
        detected, _ = detect_slices(detector, slices[z : z + 1], PROMPTS)
        assert torch.equal(detected[:, 0].unpack(), logits > 0) and torch.equal(result.bits[:, z].unpack(),
                                                                                result.masks[:, z])
        assert (result.masks[:, z] >= detected[:, 0].unpack()).all()  # threshold 0: every detection is kept
    assert torch.equal(result.seed_slices, select_seeds(*detect_slices(detector, slices, PROMPTS), 0.0))


def test_the_seed_is_the_most_confident_slice_above_the_threshold_with_a_mask():
    masks = torch.ones(3, 5, 8, 8, dtype=torch.bool)
    masks[0, 2] = False  # prompt 0's most confident slice detected nothing
    scores = torch.tensor([[0.6, 0.7, 0.95, 0.8, 0.1],  # -> 3 (2 has no mask)
                           [0.2, 0.55, 0.3, 0.9, 0.9],  # -> 3 (a tie: the lower slice)
                           [0.1, 0.2, 0.3, 0.4, 0.49]])  # -> -1 (none reaches 0.5)
    assert select_seeds(BitMasks.pack(masks), scores, 0.5).tolist() == [3, 3, -1]


def test_tracker_propagates_both_ways_from_the_most_confident_slice(monkeypatch, detector, tracker):
    depth, seed = 9, 4
    square = hand_set_detections(monkeypatch, depth, confident={0: seed})  # prompt 1: never confident
    spy = PropagationSpy(tracker, monkeypatch)
    result = segment_volume(detector, random_slices(depth), PROMPTS, tracker)
    assert result.seed_slices.tolist() == [seed, -1]
    # one session for prompt 0: forward from the seed to the last slice, then backward to slice 0
    assert [(start, reverse) for start, reverse, _ in spy.runs] == [(seed, False), (seed, True)]
    assert spy.runs[0][2] == list(range(seed, depth)) and spy.runs[1][2] == list(range(seed, -1, -1))
    masks = result.masks[0]
    assert (masks[seed] >= square).all()  # the confident detection is kept on its slice
    area = masks.flatten(1).sum(1)
    assert (area[:seed] > 0).all() and (area[seed + 1 :] > 0).all()  # tracked masks on both sides
    # unconfident detections are left out: the (random) tracked masks do not cover the square
    assert all(not (masks[z] >= square).all() for z in range(depth) if z != seed)
    assert not result.masks[1].any()
    # without the tracker only the confident slice has a mask
    alone = segment_volume(detector, random_slices(depth), PROMPTS)
    assert alone.masks[0].flatten(1).any(1).tolist() == [z == seed for z in range(depth)]
    assert alone.seed_slices.tolist() == [seed, -1]


def test_seed_at_the_first_slice_tracks_forward_only(monkeypatch, detector, tracker):
    hand_set_detections(monkeypatch, 4, confident={0: 0, 1: 3})
    spy = PropagationSpy(tracker, monkeypatch)
    result = segment_volume(detector, random_slices(4), PROMPTS, tracker)
    assert result.seed_slices.tolist() == [0, 3]
    # seed 0 has no backward pass; seed 3 (the last slice) no forward pass beyond its own slice
    assert [visited for _, _, visited in spy.runs] == [[0, 1, 2, 3], [3], [3, 2, 1, 0]]
    assert result.masks.flatten(2).any(-1).all()


def test_no_confident_slice_gives_empty_masks_and_seed_minus_one(monkeypatch, detector, tracker):
    spy = PropagationSpy(tracker, monkeypatch)
    slices = random_slices(4)
    result = segment_volume(detector, slices, PROMPTS, tracker, score_threshold=0.9)
    assert float(result.scores.max()) < 0.9  # the random tiny detector is never that sure
    assert not result.masks.any() and result.seed_slices.tolist() == [-1, -1]
    assert spy.runs == []  # the tracker never starts


def test_segment_volume_is_deterministic_and_restores_modes(detector, tracker):
    slices = random_slices(6, seed=2)
    detector.train()
    try:
        first = segment_volume(detector, slices, PROMPTS, tracker, score_threshold=0.0, batch_size=4)
        assert detector.training and not tracker.training  # modes as they were
    finally:
        detector.eval()
    second = segment_volume(detector, slices, PROMPTS, tracker, score_threshold=0.0, batch_size=4)
    assert torch.equal(first.masks, second.masks) and torch.equal(first.scores, second.scores)
    assert torch.equal(first.seed_slices, second.seed_slices)


def test_shared_vit_pass_gives_the_tracker_the_same_features(detector):
    tied = present_tracker(detector=detector)
    slices, batch = random_slices(6, seed=4), 4
    calls = []
    handle = detector.sam3.vision_encoder.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        shared = segment_volume(detector, slices, PROMPTS, tied, score_threshold=0.0, batch_size=batch)
        shared_calls = len(calls)
        calls.clear()
        own = segment_volume(detector, slices, PROMPTS, tied, score_threshold=0.0, batch_size=batch,
                             share_vision=False)
    finally:
        handle.remove()
    batches = math.ceil(len(slices) / batch)
    assert shared_calls == batches and len(calls) == 2 * batches  # the ViT ran once per slice batch, not twice
    assert torch.equal(shared.masks, own.masks) and torch.equal(shared.seed_slices, own.seed_slices)
    # the features themselves: detector ViT output through the tracker's neck == the tracker's own encoder
    from_detector, from_tracker = volume_module._TrackerFeatures(tied), volume_module._TrackerFeatures(tied)
    detect_slices(detector, slices, PROMPTS, batch_size=batch, vision_hook=from_detector.from_vit_output)
    from_tracker.from_pixels(slices, batch_size=len(slices), progress=False, pixels_normalized=False)
    assert sorted(from_detector.frames) == sorted(from_tracker.frames) == list(range(len(slices)))
    for index, levels in from_detector.frames.items():
        for ours, theirs in zip(levels, from_tracker.frames[index]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(from_detector.positions, from_tracker.positions):
        assert torch.equal(ours, theirs)


def test_a_compiled_vision_encoder_compiles_once_for_a_whole_volume(dynamo_counters):
    """``medsam3 segment --compile --batch-size 4`` on a volume of 22 slices (five batches of 4 and one of 2): the
    tracker takes each slice batch's ViT output from a hook on the vision encoder, a hook that differs from batch to
    batch, kept out of the compiled code (traced, it made every batch recompile: a minute or more each at full
    size); the last batch is padded to the first one's 4 images (the network's ``vision_batch``), so the encoder
    compiles once."""
    from medsam3_monai.inferers.batch import compile_network

    detector = MedSAM3Net("tiny").eval()  # its own: compiling changes the module in place
    tied = present_tracker(detector=detector)
    slices = random_slices(22, seed=5)
    eager = segment_volume(detector, slices, PROMPTS, tied, score_threshold=0.0, batch_size=4)
    compile_network(detector, compile=True, pad_batches=True)
    compiled = segment_volume(detector, slices, PROMPTS, tied, score_threshold=0.0, batch_size=4)
    assert detector.vision_batch == 4
    assert dynamo_counters["frames"]["ok"] == 1  # six batches, one compiled frame
    assert dynamo_counters["stats"]["unique_graphs"] == 1  # and one graph
    assert torch.equal(compiled.seed_slices, eager.seed_slices)
    flipped = (compiled.masks != eager.masks).float().mean()  # compiled float rounding may flip a pixel at 0
    assert flipped < 1e-3


def test_a_compiled_tracker_gives_the_eager_masks_and_compiles_only_at_the_first_volume(monkeypatch, detector,
                                                                                        dynamo_counters):
    """``compile_tracker`` (what ``medsam3 segment --compile`` does to a volume's tracker): its per-slice modules
    compiled give the eager masks, with no graph break; their graphs are made during the first volume (the memory
    bank's first shapes, then dynamic ones; a prompt alone and a batch of two) and serve a second volume of another
    depth and other seeds, with a prompt alone and a batch, without a new compilation."""
    from medsam3_monai.inferers.batch import TRACKER_FRAME_MODULES, compile_tracker

    tracker = present_tracker(detector=detector)  # its own: compiling changes the modules in place
    prompts = [*PROMPTS, "hippocampus"]
    # (depth, seeds): two prompts batched on one seed, the third alone (its seed is near the last slice)
    volumes = [(20, {0: 2, 1: 2, 2: 15}), (13, {0: 9, 1: 4, 2: 4})]

    def run():
        results = []
        for index, (depth, seeds) in enumerate(volumes):
            hand_set_detections(monkeypatch, depth, seeds)
            results.append(segment_volume(detector, random_slices(depth, seed=6 + index), prompts, tracker,
                                          batch_size=4))
            if index == 0:
                graphs.append(dynamo_counters["stats"]["unique_graphs"])
        return results

    graphs: list[int] = []
    eager = run()
    compile_tracker(tracker)
    compiled = run()
    assert dynamo_counters["stats"]["unique_graphs"] == graphs[-1]  # the second volume compiled nothing
    assert not dynamo_counters["graph_break"]
    # every module compiled: for a batch and for a prompt alone (torch.compile specialises a size of 1), each at
    # its first shapes and then with a dynamic memory bank
    assert len(TRACKER_FRAME_MODULES) <= graphs[-1] <= 4 * len(TRACKER_FRAME_MODULES)
    for ours, theirs in zip(compiled, eager):
        assert torch.equal(ours.seed_slices, theirs.seed_slices) and (ours.seed_slices >= 0).all()
        flipped = (ours.masks != theirs.masks).float().mean()  # compiled float rounding may flip a pixel at 0
        assert flipped < 1e-3
    with pytest.raises(TypeError, match="compile_tracker takes a SAM3 tracker"):
        compile_tracker(detector)


def test_with_cuda_graphs_the_compiled_tracker_modules_hand_out_copies_of_their_outputs(detector, dynamo_counters):
    """In torch.compile's CUDA-graph modes a graph's outputs are overwritten at its next replay, while the tracker
    keeps a slice's memory features and object pointer for the slices after it: ``compile_tracker`` then has each
    module's outputs copied, eagerly after its graph (a forward hook outside it; the default mode adds none)."""
    from torch import nn

    from medsam3_monai.inferers.batch import CUDA_GRAPH_MODES, TRACKER_FRAME_MODULES, _own_outputs, compile_tracker

    plain, graphed = present_tracker(detector=detector), present_tracker(detector=detector)
    compile_tracker(plain)  # compiled lazily, at the first call: neither tracker runs here
    compile_tracker(graphed, "reduce-overhead")
    for name in TRACKER_FRAME_MODULES:
        assert _own_outputs not in getattr(plain, name)._forward_hooks.values()
        assert _own_outputs in getattr(graphed, name)._forward_hooks.values()
    outputs = (torch.ones(2), [torch.zeros(3), 4], None)
    copied = _own_outputs(None, (), outputs)
    assert torch.equal(copied[0], outputs[0]) and copied[0].data_ptr() != outputs[0].data_ptr()
    assert copied[1][1] == 4 and copied[2] is None and copied[1][0].data_ptr() != outputs[1][0].data_ptr()
    # the hook breaks the compiled graph and runs after it: a module compiled so gives its eager outputs
    module = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    expected = module(x)
    module.register_forward_hook(_own_outputs)
    module.compile(mode=CUDA_GRAPH_MODES[0])
    assert torch.allclose(module(x), expected)


def test_a_compiling_predictor_compiles_its_tracker_when_it_builds_it():
    """``Predictor.compile`` (``medsam3 segment --compile``): the vision encoder at once, batches padded; the tracker,
    built at the first volume, with its per-slice modules compiled."""
    from medsam3_monai.inferers.batch import TRACKER_FRAME_MODULES
    from medsam3_monai.inferers.predict import Predictor

    predictor = Predictor(MedSAM3Net("tiny").eval(), tracker="tiny").compile()
    assert predictor.network.vision_batch == "first"
    assert predictor.network.sam3.vision_encoder._compiled_call_impl is not None
    tracker, _ = predictor.tracker()
    assert all(getattr(tracker, name)._compiled_call_impl is not None for name in TRACKER_FRAME_MODULES)
    eager, _ = Predictor(MedSAM3Net("tiny").eval(), tracker="tiny").tracker()
    assert all(getattr(eager, name)._compiled_call_impl is None for name in TRACKER_FRAME_MODULES)


def test_uint8_levels_segment_as_their_normalised_slices(detector):
    """Slices kept as 8-bit levels (``Sam3Normalized(levels=True)``; grey as one channel) are repeated
    and normalised a batch at a time on the device: the same masks, scores and seeds as the normalised float
    slices, through the shared ViT pass and the tracker's own."""
    generator = torch.Generator().manual_seed(5)
    grey = torch.randint(0, 256, (5, 1, S, S), dtype=torch.uint8, generator=generator)
    normalised = sam3_normalize(grey.expand(-1, 3, -1, -1))
    assert torch.equal(network_pixels(grey, "cpu"), normalised)
    rgb = torch.randint(0, 256, (2, 3, S, S), dtype=torch.uint8, generator=generator)
    assert torch.equal(network_pixels(rgb, "cpu"), sam3_normalize(rgb))
    assert network_pixels(normalised, "cpu") is normalised  # float slices are the network's input already
    with torch.no_grad():  # the network itself takes uint8 images as levels, whatever pixels_normalized says
        ours = detector(rgb[:1], ["liver"], pixels_normalized=True)
        theirs = detector(sam3_normalize(rgb[:1]), ["liver"], pixels_normalized=True)
    assert torch.equal(ours.pred_masks, theirs.pred_masks) and torch.equal(ours.pred_logits, theirs.pred_logits)
    tied = present_tracker(detector=detector)
    for share in (None, False):
        ours = segment_volume(detector, grey, PROMPTS, tied, score_threshold=0.0, batch_size=2, share_vision=share)
        theirs = segment_volume(detector, normalised, PROMPTS, tied, score_threshold=0.0, batch_size=2,
                                share_vision=share, pixels_normalized=True)
        assert torch.equal(ours.masks, theirs.masks) and torch.equal(ours.scores, theirs.scores)
        assert torch.equal(ours.seed_slices, theirs.seed_slices) and (ours.seed_slices >= 0).all()


def test_float_slices_are_read_as_the_network_reads_images(detector):
    """``segment_volume`` takes float slices in [0, 1] as ``MedSAM3Net`` and ``segment_image`` take images (its
    detections equal the network's), SAM3-normalised ones with ``pixels_normalized=True``; either kind given as the
    other is refused when it lies outside the range, naming the switch."""
    unit = random_slices(3, seed=8)
    as_unit = segment_volume(detector, unit, PROMPTS, score_threshold=0.0)
    as_normalised = segment_volume(detector, sam3_normalize(unit), PROMPTS, score_threshold=0.0,
                                   pixels_normalized=True)
    torch.testing.assert_close(as_unit.scores, as_normalised.scores)  # the same values, rounded apart
    assert (as_unit.masks != as_normalised.masks).float().mean() < 1e-3
    with torch.no_grad():
        logits, scores = top_query_logits(detector(unit[1:2], PROMPTS), S)
    torch.testing.assert_close(as_unit.scores[:, 1], scores)
    assert torch.equal(as_unit.masks[:, 1], logits > 0)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]: .*pixels_normalized=True"):
        segment_volume(detector, unit * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        segment_volume(detector, unit * 255, PROMPTS, pixels_normalized=True)


def test_inputs_are_checked(detector, tracker):
    with pytest.raises(ValueError, match=r"\(D, 3, 112, 112\)"):
        segment_volume(detector, torch.zeros(3, 3, 224, 224), PROMPTS)
    with pytest.raises(ValueError, match="uint8 levels"):
        segment_volume(detector, torch.zeros(3, 1, S, S), PROMPTS)  # one channel: levels only
    with pytest.raises(ValueError, match="uint8 levels"):
        segment_volume(detector, torch.zeros(3, 2, S, S, dtype=torch.uint8), PROMPTS)
    with pytest.raises(ValueError, match="prompt"):
        segment_volume(detector, random_slices(2), [])
    with pytest.raises(ValueError, match="224 px"):
        segment_volume(detector, random_slices(2), PROMPTS, build_tracker("tiny", image_size=224))


# ---------------------------------------------------------------------------------------- real volume
@requires_data
def test_hippocampus_volume_through_slice_space_and_back(detector, tracker):
    image, label = SAMPLES["MSD_Task04_Hippocampus_cropped"][0]
    entry = item("MSD_Task04_Hippocampus_cropped", image, label)
    del entry["label"]  # inference: the image only
    transform = slice_space_transforms(S, max_instances=None, with_label=False)
    items = transform(entry)
    volume = transform.transforms[0](entry)["image"]  # the loaded volume, for its geometry
    _, x, y, z = volume.shape
    slices = torch.stack([s["image"] for s in items])  # a MetaTensor, as a pipeline would hand it over
    assert slices.shape == (z, 1, S, S) and slices.dtype == torch.uint8  # grey 8-bit levels
    result = segment_volume(detector, slices, PROMPTS, tracker, score_threshold=0.0)
    assert result.masks.shape == (2, z, S, S) and (result.seed_slices >= 0).all()
    for index, s in enumerate(items):  # per slice: back to the slice's own size, then restack
        pred = MetaTensor(result.masks[:, index].float())
        s["pred"] = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(
            dict(s) | {"pred": pred})["pred"] > 0.5
    restacked = RestackSlicesd(keys="pred")(items)["pred"]
    assert restacked.shape == (2, x, y, z)
    torch.testing.assert_close(restacked.affine, volume.affine)
    assert restacked[:, :, :, int(result.seed_slices[0])].any()
