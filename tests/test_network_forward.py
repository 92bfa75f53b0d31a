"""MedSAM3Net's own forward: SAM3's official semantics on transformers' modules, plus every decoder layer.

transformers' ``Sam3Model.forward`` is the reference for everything but one step: for a text-only prompt the
official model also runs the geometry encoder on the empty box set and appends its CLS token to the prompt
(``Sam3Image._encode_prompt``), which ``Sam3Model`` skips. The reference below feeds ``Sam3Model.forward`` that
official prompt (text tokens + geometry token) as its text embedding.
"""

from __future__ import annotations

import pytest
import torch
from medsam3_monai.networks import MedSAM3Net, PromptError, normalize_pixels
from medsam3_monai.networks.official_numerics import sam3model_text_only_forward

LAST_LAYER_FIELDS = ("pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg")
PROMPTS = ["polyp", "left kidney"]


def _reference(net, images, prompts, **box_kwargs):
    input_ids, attention_mask = net.tokenize(prompts)
    return net.sam3(
        pixel_values=normalize_pixels(images), input_ids=input_ids, attention_mask=attention_mask, **box_kwargs
    )


def _official_text_only_reference(net, images, prompts):
    """Sam3Model.forward on the official text-only prompt: 32 text tokens + the geometry encoder's CLS token."""
    input_ids, attention_mask = net.tokenize(prompts)
    return sam3model_text_only_forward(net.sam3, normalize_pixels(images), input_ids, attention_mask)


def test_text_only_forward_has_the_official_geometry_token(tiny_net, tiny_images):
    with torch.no_grad():
        vision = tiny_net.sam3.vision_encoder(normalize_pixels(tiny_images))
        empty = tiny_net.sam3.geometry_encoder(
            box_embeddings=torch.zeros(2, 0, 4), box_mask=torch.zeros(2, 0, dtype=torch.bool),
            box_labels=torch.zeros(2, 0, dtype=torch.long), img_feats=vision.fpn_hidden_states[:-1],
            img_pos_embeds=vision.fpn_position_encoding[:-1],
        )
    assert empty.last_hidden_state.shape[1] == 1, "an empty box set still gives the geometry CLS token"
    with torch.no_grad():
        ours = tiny_net(tiny_images, PROMPTS)
        ref = _official_text_only_reference(tiny_net, tiny_images, PROMPTS)
        upstream = _reference(tiny_net, tiny_images, PROMPTS)  # transformers: text tokens only
    for field in LAST_LAYER_FIELDS:
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field
    assert not torch.allclose(ours.pred_logits, upstream.pred_logits, atol=1e-6), "the geometry token must count"


def test_box_only_prompt_uses_sam3s_visual_text(tiny_net, tiny_images):
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3]], [[0.3, 0.4, 0.1, 0.1]]])
    with torch.no_grad():
        box_only = tiny_net(tiny_images, None, boxes=boxes)
        visual = tiny_net(tiny_images, ["visual", "visual"], boxes=boxes)
    assert torch.equal(box_only.pred_masks, visual.pred_masks)
    with pytest.raises(ValueError, match="needs boxes"):
        tiny_net(tiny_images, None)


def test_last_layer_equals_sam3model_forward_text_and_box(tiny_net, tiny_images):
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]], [[0.3, 0.4, 0.1, 0.1], [0, 0, 0, 0]]])
    labels = torch.tensor([[1, 0], [1, -10]])  # positive, negative; positive, padding
    with torch.no_grad():
        ours = tiny_net(tiny_images, PROMPTS, boxes=boxes, box_labels=labels)
        ref = _reference(tiny_net, tiny_images, PROMPTS, input_boxes=boxes, input_boxes_labels=labels)
        text_only = tiny_net(tiny_images, PROMPTS)
    for field in LAST_LAYER_FIELDS:
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field
    assert not torch.equal(ours.pred_logits, text_only.pred_logits), "the box prompt must change the result"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_decoder_reads_the_grid_size_from_a_host_tensor(device, tiny_images):
    """The DETR decoder turns the feature grid's height and width into numbers (``.item()``, its box position bias):
    it is given the grid's shape as a host tensor, the values of the encoder's own (which lives on the network's
    device, where each read would synchronise the host with the device)."""
    net = MedSAM3Net("tiny").eval().to(device)
    seen = {}
    hooks = [net.sam3.detr_decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(decoder=kw["spatial_shapes"]),
                                                             with_kwargs=True),
             net.sam3.detr_encoder.register_forward_hook(lambda m, a, out: seen.update(encoder=out.spatial_shapes))]
    try:
        with torch.no_grad():
            net(tiny_images.to(device), PROMPTS)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["decoder"].device.type == "cpu" and seen["encoder"].device.type == device
    assert torch.equal(seen["decoder"], seen["encoder"].cpu())
    assert seen["decoder"].data_ptr() != seen["encoder"].data_ptr()  # its own, on a CPU network too


def out_reference_boxes(net, images):
    """Each decoder layer's starting reference boxes, from transformers' forward on the official prompt."""
    with torch.no_grad():
        return _official_text_only_reference(net, images, PROMPTS).decoder_reference_boxes


def test_every_decoder_layer_is_returned(tiny_net, tiny_images):
    layers, queries, mask = tiny_net.num_decoder_layers, tiny_net.num_queries, tiny_net.mask_size
    with torch.no_grad():
        out = tiny_net(tiny_images, PROMPTS)
    assert out.all_pred_logits.shape == (layers, 2, queries)
    assert out.all_pred_boxes.shape == (layers, 2, queries, 4)
    assert out.all_presence_logits.shape == (layers, 2, 1)
    assert out.pred_masks.shape == (2, queries, mask, mask)
    assert out.semantic_seg.shape == (2, 1, mask, mask)
    # layer l's refined boxes are the reference boxes that layer l + 1 starts from
    assert torch.allclose(out.all_pred_boxes_cxcywh[:-1], out_reference_boxes(tiny_net, tiny_images)[1:], atol=1e-6)
    assert not torch.allclose(out.all_pred_logits[0], out.all_pred_logits[-1])
    xyxy = out.all_pred_boxes
    assert (xyxy[..., 2] >= xyxy[..., 0]).all() and (xyxy >= 0).all() and (xyxy <= 1).all()
    expected = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()
    assert torch.equal(out.scores, expected)


def test_prompts_share_one_image_through_image_ids(tiny_net, tiny_images):
    with torch.no_grad():
        shared = tiny_net(tiny_images[:1], PROMPTS)  # one image, two prompts
        separate = [tiny_net(tiny_images[:1], [p]) for p in PROMPTS]
        indexed = tiny_net(tiny_images, PROMPTS, image_ids=[1, 0])
        swapped = tiny_net(tiny_images.flip(0), PROMPTS)
    for i in range(2):
        assert torch.allclose(shared.pred_logits[i], separate[i].pred_logits[0], atol=1e-5)
        assert torch.allclose(shared.pred_masks[i], separate[i].pred_masks[0], atol=1e-4)
    assert torch.allclose(indexed.pred_masks, swapped.pred_masks, atol=1e-4)


def test_a_vision_batch_pads_the_encoders_input_and_keeps_each_images_features(tiny_images):
    net = MedSAM3Net("tiny").eval()
    calls = []
    handle = net.sam3.vision_encoder.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            plain = net(tiny_images, PROMPTS)
            net.vision_batch = 5
            padded = net(tiny_images, PROMPTS)
            features, positions = net.encode_images(normalize_pixels(tiny_images))
            net.vision_batch = "first"  # as compile_network(..., pad_batches=True) sets it: the first batch's size
            net(tiny_images[:1], PROMPTS[:1])
            first = net.vision_batch
            net(tiny_images, PROMPTS)  # a larger batch is not cut
    finally:
        handle.remove()
    assert calls == [2, 5, 5, 1, 2] and first == 1  # padded to 5 (the detector saw the 2 real ones); then 1, 2
    assert all(level.shape[0] == 2 for level in features + positions)
    for field in LAST_LAYER_FIELDS:
        torch.testing.assert_close(getattr(padded, field), getattr(plain, field), rtol=1e-4, atol=1e-4)


def test_uint8_pixels_use_sam3_scaling(tiny_net):
    raw = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    expected = (raw.float() * (1.0 / 255.0) - 0.5) / 0.5
    assert torch.equal(normalize_pixels(raw), expected)
    assert torch.allclose(normalize_pixels(raw.float() / 255.0), expected, atol=1e-6)  # /255 may differ by one bit


def test_text_cache_serves_repeats_and_invalidates_on_weight_change():
    net = MedSAM3Net("tiny").eval()
    with torch.no_grad():
        first, _ = net.encode_text(["liver", "spleen"])
        misses = net.text_cache.misses
        again, _ = net.encode_text(["spleen", "liver"])
    assert net.text_cache.misses == misses and net.text_cache.hits >= 2
    assert torch.equal(again[0], first[1])
    with torch.no_grad():
        net.sam3.text_projection.weight.mul_(2.0)  # like an optimiser step
        changed, _ = net.encode_text(["liver"])
    assert not torch.allclose(changed[0], first[0])
    net.train()
    features, _ = net.encode_text(["liver"])
    assert features.requires_grad, "training must bypass the cache so gradients reach the text encoder"


def test_text_cache_invalidates_when_new_tensors_replace_the_weights():
    """``load_state_dict(assign=True)`` puts new tensors in place, each at version 0 like the ones it replaces: the
    cache must tell them apart by their storage."""
    net = MedSAM3Net("tiny").eval()
    with torch.no_grad():
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
        first, _ = net.encode_text(["liver"])
        state = {k: v.clone() for k, v in net.state_dict().items()}
        state["sam3.text_projection.weight"] = state["sam3.text_projection.weight"] * 2  # a new tensor, version 0
        net.load_state_dict(state, assign=True)
        assert net.sam3.text_projection.weight._version == 0
        changed, _ = net.encode_text(["liver"])
    assert not torch.allclose(changed, first)


def test_gradient_checkpointing_switches_on_and_off():
    net = MedSAM3Net("tiny", gradient_checkpointing=True)
    assert net.gradient_checkpointing is True
    net.set_gradient_checkpointing(False)
    assert net.gradient_checkpointing is False
    net.set_gradient_checkpointing(True)
    assert net.gradient_checkpointing is True


def test_gradient_checkpointing_gives_same_gradients(tiny_images):
    grads = []
    for enabled in (False, True):
        net = MedSAM3Net("tiny", gradient_checkpointing=enabled).eval()  # eval: no dropout
        assert net.gradient_checkpointing is enabled
        out = net(tiny_images, PROMPTS)
        (out.pred_masks.square().mean() + out.all_pred_logits.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    vit = [n for n in grads[0] if ".backbone.layers." in n]
    text = [n for n in grads[0] if "text_model.encoder.layers" in n]
    assert vit and text
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_tiny_preset_initialises_every_parameter_reproducibly():
    a = MedSAM3Net("tiny", seed=3).sam3.state_dict()
    b = MedSAM3Net("tiny", seed=3).sam3.state_dict()
    c = MedSAM3Net("tiny", seed=4).sam3.state_dict()
    assert 1_800_000 < sum(v.numel() for v in a.values()) < 1_900_000
    for key, value in a.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, b[key]), key
    text_pos = "text_encoder.text_model.embeddings.position_embedding.weight"
    assert not torch.equal(a[text_pos], c[text_pos])
    assert a[text_pos].abs().sum() > 0 and a["text_projection.weight"].abs().sum() > 0


def test_bad_inputs_raise_clear_errors(tiny_net, tiny_images):
    with pytest.raises(ValueError, match="takes 112x112"):
        tiny_net(torch.rand(1, 3, 96, 96), ["liver"])
    with pytest.raises(PromptError, match="empty"):
        tiny_net(tiny_images, ["liver", "  "])
    with pytest.raises(PromptError, match="at most 32"):
        tiny_net(tiny_images[:1], [" ".join(["tumor"] * 40)])
    with pytest.raises(ValueError, match="image_ids"):
        tiny_net(tiny_images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="boxes must be"):
        tiny_net(tiny_images, PROMPTS, boxes=torch.rand(2, 4))
    from medsam3_monai.inferers import segment_image

    with pytest.raises(ValueError, match=r"got shape \(112, 112\): repeat a grey picture to 3 channels"):
        segment_image(tiny_net, tiny_images[0, 0], ["liver"])


def test_inputs_that_would_run_wrongly_are_refused_by_name(tiny_net, tiny_images):
    """Images of another scale or dtype, pixel boxes and box labels without boxes would run and give wrong masks;
    they are refused with what to do. Box prompts as nested lists are taken as tensors."""
    levels = (tiny_images * 255).round()
    with pytest.raises(ValueError, match=r"int64: give uint8 8-bit levels"):
        tiny_net(levels.long(), PROMPTS)
    with pytest.raises(ValueError, match="bool: give uint8"):
        tiny_net(tiny_images > 0.5, PROMPTS)
    with pytest.raises(ValueError, match=r"values in \[0, 255\], expected \[0, 1\]: divide 0..255 floats by 255"):
        tiny_net(levels, PROMPTS)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]: replace the NaN"):
        tiny_net(torch.full_like(tiny_images, float("nan")), PROMPTS)
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]: SAM3-normalised"):
        tiny_net(levels, PROMPTS, pixels_normalized=True)
    with pytest.raises(ValueError, match="no prompts"):
        tiny_net(tiny_images, [])
    with pytest.raises(ValueError, match="positive multiple of 14.*got 0"):
        MedSAM3Net("tiny", image_size=0)
    with pytest.raises(ValueError, match="at least 28 .*got 14"):  # one patch: the FPN's 0.5x level is empty
        MedSAM3Net("tiny", image_size=14)
    with pytest.raises(ValueError, match="box_labels given without boxes"):
        tiny_net(tiny_images, PROMPTS, box_labels=torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"normalised cx, cy, w, h in \[0, 1\] \(pixel boxes .*box_prompts"):
        tiny_net(tiny_images, PROMPTS, boxes=torch.tensor([[[10.0, 10.0, 50.0, 50.0]]] * 2))
    one_box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]] * 2)
    with pytest.raises(ValueError, match=r"box_labels hold \[2\]: each is 1 \(positive box\), 0"):
        tiny_net(tiny_images, PROMPTS, boxes=one_box, box_labels=torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"box_labels are bool \(SAM3's convention\); give integers"):
        tiny_net(tiny_images, PROMPTS, boxes=one_box, box_labels=torch.tensor([[True], [False]]))
    with pytest.raises(ValueError, match=r"box_labels must be \(B, K\) = \(2, 1\)"):
        tiny_net(tiny_images, PROMPTS, boxes=one_box, box_labels=torch.ones(2, 2))
    boxes = [[[0.5, 0.5, 0.2, 0.2]], [[0.4, 0.6, 0.3, 0.2]]]
    with torch.no_grad():
        as_lists, as_tensor = tiny_net(tiny_images, PROMPTS, boxes=boxes), tiny_net(tiny_images, PROMPTS,
                                                                                  boxes=torch.tensor(boxes))
    assert torch.equal(as_lists.pred_masks, as_tensor.pred_masks)


def test_metatensor_images_reach_the_network_as_plain_tensors(tiny_net):
    """Slice-space images are MONAI MetaTensors (their metadata serves the way back); the network and the training
    batch take them as plain tensors -- every operation of a MetaTensor goes through its ``__torch_function__`` --
    with the same outputs."""
    from monai.data import MetaTensor

    from medsam3_monai.engines.batch import PrepareFindBatch, collate_find_queries
    from medsam3_monai.networks import network_pixels
    from medsam3_monai.transforms.targets import empty_target

    levels = torch.randint(0, 256, (2, 3, tiny_net.image_size, tiny_net.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    wrapped = MetaTensor(levels.clone(), meta={"filename_or_obj": "a.png"})
    types = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: types.add(type(out[0] if isinstance(out, tuple) else out)))
             for m in tiny_net.modules()]
    try:
        with torch.no_grad():
            from_meta = tiny_net(wrapped, ["polyp", "liver"])
            assert types and all(t is not MetaTensor for t in types)
            plain = tiny_net(levels, ["polyp", "liver"])
    finally:
        for hook in hooks:
            hook.remove()
    for name in ("pred_logits", "pred_masks", "all_pred_boxes", "semantic_seg"):
        value = getattr(from_meta, name)
        assert type(value) is torch.Tensor and torch.equal(value, getattr(plain, name)), name
    assert type(network_pixels(wrapped, "cpu")) is torch.Tensor
    size = (tiny_net.image_size,) * 2
    items = [{"image": MetaTensor(levels[i]), "targets": [empty_target("polyp", size)]} for i in range(2)]
    batch = collate_find_queries(items)
    assert type(batch["images"]) is torch.Tensor and torch.equal(batch["images"], levels)
    assert type(PrepareFindBatch()(batch, "cpu")[0]) is torch.Tensor
