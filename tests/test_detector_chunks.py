"""Many prompts at bounded memory: ``MedSAM3Net.forward_chunks`` runs the ViT once and the detector on at most
``detector_chunk`` find-queries at a time, and the inferers keep only each chunk's protocol masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam3_monai.inferers.batch import segment_image_batch
from medsam3_monai.inferers.image import segment_image
from medsam3_monai.inferers.volume import detect_slices
from medsam3_monai.networks import MedSAM3Net

PROMPTS = ["liver", "spleen", "left kidney", "right kidney", "aorta"]


@pytest.fixture(scope="module")
def network() -> MedSAM3Net:
    return MedSAM3Net("tiny").eval()


class Passes:
    """Counts the ViT's passes and the find-queries of each detector (DETR decoder) pass."""

    def __init__(self, network: MedSAM3Net) -> None:
        self.vit, self.queries = 0, []
        self.handles = [
            network.sam3.vision_encoder.register_forward_hook(lambda *_: setattr(self, "vit", self.vit + 1)),
            network.sam3.detr_decoder.register_forward_hook(
                lambda _m, _i, out: self.queries.append(out.intermediate_hidden_states.shape[1])),
        ]

    def __enter__(self) -> Passes:
        return self

    def __exit__(self, *_) -> None:
        for handle in self.handles:
            handle.remove()


def test_chunks_give_the_forward_of_their_queries_with_one_vit_pass(network):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 112, 112)
    image_ids = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        whole = network(images, PROMPTS, image_ids=image_ids, pixels_normalized=True)
        with Passes(network) as passes:
            chunks = list(network.forward_chunks(images, PROMPTS, image_ids=image_ids, pixels_normalized=True,
                                                 chunk=2))
    assert passes.vit == 1 and passes.queries == [2, 2, 1]
    assert [(start, stop) for start, stop, _ in chunks] == [(0, 2), (2, 4), (4, 5)]
    for name in ("pred_masks", "pred_logits", "pred_boxes", "presence_logits", "semantic_seg"):
        joined = torch.cat([getattr(outputs, name) for _, _, outputs in chunks])
        assert torch.allclose(joined, getattr(whole, name), atol=1e-5), name  # batch size changes rounding only
    with torch.no_grad(), Passes(network) as passes:  # few queries: one forward, as before
        [(start, stop, outputs)] = list(network.forward_chunks(images, PROMPTS[:2], pixels_normalized=True))
    assert (start, stop, passes.vit, passes.queries) == (0, 2, 1, [2])
    with pytest.raises(ValueError, match="detector chunk must be >= 1"):
        next(network.forward_chunks(images, PROMPTS[:2], chunk=0))


def test_masks_do_not_depend_on_the_detector_chunk(network):
    torch.manual_seed(1)
    image, images, slices = torch.rand(3, 112, 112), torch.rand(3, 3, 112, 112), torch.rand(5, 3, 112, 112)
    per_image = [PROMPTS[:2], PROMPTS[2:], PROMPTS[:1]]
    protocols = ["top_query", "semantic", "threshold"]

    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.3]]).repeat(len(PROMPTS), 1)  # (P, 4) cxcywh: the T+I prompt
    labels = torch.tensor([[1], [1], [-10], [1], [0]])  # positive, padding, negative boxes across the chunks

    def run(chunk: int):
        network.detector_chunk = chunk
        try:
            with Passes(network) as passes:
                one = segment_image(network, image, PROMPTS, protocol="threshold", score_threshold=0.2)
                boxed = segment_image(network, image, PROMPTS, boxes=boxes, box_labels=labels)
                batch = segment_image_batch(network, images, per_image, protocols=protocols, score_threshold=0.2)
                volume = detect_slices(network, slices, PROMPTS[:3], batch_size=4)
                # the way back's: threshold's kept queries, each with its own map and prompt
                kept = segment_image(network, image, PROMPTS, protocol="threshold", score_threshold=0.2,
                                     at_mask_size=True)
                kept_batch = segment_image_batch(network, images, per_image, protocols=protocols, score_threshold=0.2,
                                                 at_mask_size=True)
            return one, boxed, batch + [kept, *kept_batch], volume, passes
        finally:
            network.detector_chunk = 16

    one, boxed, batch, (masks, scores), _ = run(64)
    chunked_one, chunked_boxed, chunked_batch, (chunked_masks, chunked_scores), passes = run(2)
    # image, boxed image, batch, 2 slice batches, image and batch at the masks' size
    assert max(passes.queries) == 2 and passes.vit == 1 + 1 + 1 + 2 + 1 + 1
    assert batch[3].owners is not None and len(batch[3].owners) > len(PROMPTS)  # kept queries, several prompts
    for a, b in zip([chunked_one, chunked_boxed, *chunked_batch], [one, boxed, *batch]):
        assert a.protocol == b.protocol and a.prompts == b.prompts
        assert (a.owners is None and b.owners is None) or torch.equal(a.owners, b.owners)
        assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.scores, b.scores, atol=1e-6)
        clear = b.prompt_logits.abs() > 1e-6  # a logit within rounding of 0 may fall either side
        assert torch.equal(a.masks[clear], b.masks[clear])
    assert (chunked_masks.unpack() != masks.unpack()).float().mean() < 1e-4
    assert torch.allclose(chunked_scores, scores, atol=1e-6)


def test_detector_chunk_is_a_segment_evaluate_serve_agent_and_bundle_option(hippocampus, tmp_path, capsys,
                                                                              monkeypatch):
    import nibabel as nib

    from medsam3_monai.bundle import config_parser
    from medsam3_monai.deploy.cli import main
    from medsam3_monai.inferers import predict
    from medsam3_monai.networks.medsam3_net import DETECTOR_CHUNK

    runs: list[Passes] = []  # the detector passes of each `segment` run's network
    load_network = predict.load_network

    def counted(*args, **kwargs) -> MedSAM3Net:
        network = load_network(*args, **kwargs)
        runs.append(Passes(network))
        return network

    monkeypatch.setattr(predict, "load_network", counted)
    prompts = ["--prompt", "anterior hippocampus", "--prompt", "posterior hippocampus", "--prompt", "ventricle"]
    common = [str(hippocampus), *prompts, "--score-threshold", "0.2", "--no-progress"]
    try:
        assert main(["segment", *common, "--out", str(tmp_path / "default.nii.gz")]) == 0
        assert main(["segment", *common, "--out", str(tmp_path / "one.nii.gz"), "--detector-chunk", "1"]) == 0
    finally:
        for passes in runs:
            passes.__exit__()
    default, one = (np.asarray(nib.load(tmp_path / name).dataobj) for name in ("default.nii.gz", "one.nii.gz"))
    assert len(np.unique(default)) > 1 and np.array_equal(one, default)  # 3 prompts x 8 slices, 1 per pass
    assert len(runs) == 2 and max(runs[0].queries) > 1 and max(runs[1].queries) == 1  # the chunk reached the detector
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", *common, "--out", str(tmp_path / "zero.nii.gz"), "--detector-chunk", "0"])
    assert exit_info.value.code == 2 and "give a number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "zero.nii.gz").exists()
    for command in ("evaluate", "serve", "agent"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"(default {DETECTOR_CHUNK})" in " ".join(capsys.readouterr().out.split())
    from medsam3_monai.agent.segmenter import PhraseSegmenter, SegmenterSettings

    segmenter = PhraseSegmenter.load(str(hippocampus), SegmenterSettings(device="cpu", detector_chunk=3))
    assert segmenter.network.detector_chunk == 3  # what `medsam3 agent --detector-chunk 3` builds
    parser = config_parser("inference.json", checkpoint="tiny", detector_chunk=3)
    assert parser.get_parsed_content("network_def").detector_chunk == 3
    assert config_parser("inference.json", checkpoint="tiny").get_parsed_content("network_def").detector_chunk == \
        DETECTOR_CHUNK


def test_a_batch_mixing_box_and_text_prompts_gives_each_image_its_own_results(network):
    """Images with boxes take a forward of their own: each image's rows still come back to it (the results of
    segmenting it alone), whatever its position in its forward and in the batch."""
    from medsam3_monai.inferers.inputs import box_prompts

    torch.manual_seed(2)
    images = torch.rand(4, 3, 112, 112)
    per_image = [PROMPTS[:2], PROMPTS[2:3], PROMPTS[3:4], PROMPTS[3:]]
    boxes = [None, box_prompts([10, 20, 80, 90], 1, (112, 112)), None,
             box_prompts([[30, 30, 100, 70], [0, 0, 50, 50]], 2, (112, 112))]
    batch = segment_image_batch(network, images, per_image, boxes=boxes)
    for index, result in enumerate(batch):
        box, labels = boxes[index] if boxes[index] is not None else (None, None)
        alone = segment_image(network, images[index], per_image[index], boxes=box, box_labels=labels)
        assert result.prompts == per_image[index] and result.protocol == alone.protocol, index
        assert torch.allclose(result.logits, alone.logits, atol=1e-5), index
        assert torch.allclose(result.scores, alone.scores, atol=1e-6), index

