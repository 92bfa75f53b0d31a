"""Matchers and every criterion term on small hand-computed cases (known answers)."""

from __future__ import annotations

import math

import pytest
import torch

from medsam3_monai.losses import CriterionSettings, FindTargets, HungarianMatcher, Matches, OneToManyMatcher, SetCriterion
from medsam3_monai.boxes import cxcywh_to_xyxy
from medsam3_monai.losses.criterion import _last_occurrence
from medsam3_monai.networks.outputs import MedSAM3Output, OneToManyOutput


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(x: float, t: float) -> float:
    return -(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))


def iou_xyxy(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def giou_xyxy(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def to_xyxy(b):
    return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]


def test_hungarian_cost_is_the_papers_formula():
    logit, box, target = 0.7, [0.5, 0.5, 0.4, 0.2], [0.45, 0.55, 0.3, 0.3]
    p = sig(logit)
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    l1 = sum(abs(x - y) for x, y in zip(box, target))
    expected = 5 * l1 + 2 * focal - 2 * giou_xyxy(to_xyxy(box), to_xyxy(target))
    cost = HungarianMatcher().cost_matrix(torch.tensor([[logit]]), torch.tensor([[box]]), torch.tensor([[target]]))
    assert cost.shape == (1, 1, 1)
    assert cost.item() == pytest.approx(expected, rel=1e-5)


def test_hungarian_is_optimal_not_greedy_and_skips_images_without_targets():
    # query 0 is closest to both targets; greedy would give it target 0 and leave query 1 a poor match
    boxes = torch.tensor([[[0.30, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.52, 0.5, 0.2, 0.2]]])
    targets_b = torch.tensor([[0.32, 0.3, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    logits = torch.zeros(1, 3)
    empty = torch.zeros(0, 4)
    targets = FindTargets.from_instances([empty, targets_b])  # find-query 0 has no target
    both = torch.cat([boxes, boxes])
    matches = HungarianMatcher()(torch.zeros(2, 3), both, targets)
    assert matches.batch_idx.tolist() == [1, 1]
    pairs = sorted(zip(matches.query_idx.tolist(), matches.target_idx.tolist()))
    assert pairs == [(0, 0), (2, 1)], "target indices are packed: find-query 1's targets are 0 and 1"
    assert len(HungarianMatcher()(logits, boxes, FindTargets.from_instances([empty]))) == 0


def test_one_to_many_rule():
    # Q = 8 queries against one target; score = 0.3 p + 0.7 IoU; match above the (1 - 4/8) quantile and 0.4
    target = [0.5, 0.5, 0.4, 0.4]
    widths = [0.4, 0.38, 0.36, 0.3, 0.2, 0.1, 0.05, 0.4]
    boxes = torch.tensor([[[0.5, 0.5, w, w] for w in widths]])
    boxes[0, 7] = torch.tensor([0.1, 0.1, 0.1, 0.1])  # far away: IoU 0
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    scores = [0.3 * sig(l) + 0.7 * iou_xyxy(to_xyxy(b), to_xyxy(target)) for l, b in zip(logits[0].tolist(), boxes[0].tolist())]
    quantile = torch.quantile(torch.tensor(scores), 0.5).item()
    expected = [q for q, s in enumerate(scores) if s > quantile and s > 0.4]
    assert expected == [0, 1, 2, 3]
    matches = OneToManyMatcher()(logits, boxes, FindTargets.from_instances([torch.tensor([target])]))
    assert matches.query_idx.tolist() == expected and matches.target_idx.tolist() == [0] * 4
    # a query may match several targets
    two = FindTargets.from_instances([torch.tensor([target, target])])
    assert len(OneToManyMatcher()(logits, boxes, two)) == 8


def test_one_to_many_quantile_is_1_minus_topk_over_the_queries():
    # Q = 10 (where 1 - 4/Q and 4/Q differ, unlike Q = 8 above): every score above 0.4, so the quantile alone decides
    widths = [0.40 - 0.01 * i for i in range(10)]
    boxes = torch.tensor([[[0.5, 0.5, w, w] for w in widths]])
    scores = [0.3 * 0.5 + 0.7 * (w / 0.4) ** 2 for w in widths]  # IoU with the centred 0.4 box: (w / 0.4)^2
    assert min(scores) > 0.4 and scores == sorted(scores, reverse=True)
    matches = OneToManyMatcher(topk=4)(torch.zeros(1, 10), boxes,
                                       FindTargets.from_instances([torch.tensor([[0.5, 0.5, 0.4, 0.4]])]))
    assert matches.query_idx.tolist() == [0, 1, 2, 3]  # above the 0.6 quantile: the 4 best of 10


def test_a_prompt_whose_boxes_have_no_width_or_height_has_no_target():
    targets = FindTargets.from_instances([torch.tensor([[0.5, 0.5, 0.0, 0.2]]), torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                                          torch.tensor([[0.5, 0.5, 0.2, 0.0]]), torch.zeros(0, 4)])
    assert targets.has_target().tolist() == [False, True, False, False]


def _criterion(**settings) -> SetCriterion:
    return SetCriterion(settings=CriterionSettings(normalization="local", **settings))


def test_classification_term_known_answer():
    logits = torch.tensor([[1.2, -0.4, 0.3], [0.5, 0.1, -2.0]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]] * 2)
    target = [0.52, 0.5, 0.2, 0.2]
    targets = FindTargets.from_instances([torch.tensor([target]), torch.zeros(0, 4)])  # 2nd prompt is negative
    matches = Matches(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    terms = _criterion().classification_terms(logits, cxcywh_to_xyxy(boxes), torch.tensor([[0.3], [-1.0]]), targets, matches)
    p0 = sig(1.2)
    iou = iou_xyxy(to_xyxy(boxes[0, 0].tolist()), to_xyxy(target))
    soft = max(p0**0.25 * iou**0.75, 0.01)
    row0 = 10 * bce(1.2, soft) + bce(-0.4, 0) * sig(-0.4) ** 2 + bce(0.3, 0) * sig(0.3) ** 2
    expected_ce = row0 / (200 * 2)  # row 1 (no target) is zeroed; normalised by 200 * B since Q < 200
    assert terms["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    expected_presence = (0.5 * bce(0.3, 1) + 0.5 * bce(-1.0, 0)) / 2
    assert terms["presence_loss"].item() == pytest.approx(expected_presence, rel=1e-5)


def test_duplicate_matches_keep_the_last_pair():
    assert sorted(_last_occurrence(torch.tensor([5, 3, 5, 7, 3])).tolist()) == [2, 3, 4]
    logits = torch.tensor([[0.8, -1.0]])
    boxes = cxcywh_to_xyxy(torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]]))
    t0, t1 = [0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.3, 0.2]
    targets = FindTargets.from_instances([torch.tensor([t0, t1])])
    matches = Matches(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    loss = _criterion().classification_terms(logits, boxes, None, targets, matches)["loss_ce"].item()
    soft = sig(0.8) ** 0.25 * iou_xyxy([0.4, 0.4, 0.6, 0.6], to_xyxy(t1)) ** 0.75
    expected = (10 * bce(0.8, soft) + bce(-1.0, 0) * sig(-1.0) ** 2) / 200
    assert loss == pytest.approx(expected, rel=1e-5)


def test_box_terms_normalised_by_all_targets():
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4]]])
    tgt = [[0.55, 0.5, 0.2, 0.3], [0.3, 0.35, 0.1, 0.4], [0.9, 0.9, 0.1, 0.1]]
    targets = FindTargets.from_instances([torch.tensor(tgt)])
    matches = Matches(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    num = torch.tensor(3.0)
    terms = SetCriterion.box_terms(pred, cxcywh_to_xyxy(pred), targets, matches, num)
    l1 = sum(abs(a - b) for i in range(2) for a, b in zip(pred[0, i].tolist(), tgt[i]))
    giou = sum(1 - giou_xyxy(to_xyxy(pred[0, i].tolist()), to_xyxy(tgt[i])) for i in range(2))
    assert terms["loss_bbox"].item() == pytest.approx(l1 / 3, rel=1e-5)
    assert terms["loss_giou"].item() == pytest.approx(giou / 3, rel=1e-5)


def _focal(x: float, t: float, alpha: float, gamma: float) -> float:
    p = sig(x)
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * bce(x, t) * (1 - p_t) ** gamma


def test_mask_terms_skip_invalid_masks_but_count_them():
    pred = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (B=1, Q=2, 2, 2)
    masks = torch.tensor([[[1, 0], [1, 1]], [[1, 1], [0, 0]]], dtype=torch.bool)
    targets = FindTargets(torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 2), torch.tensor([2]), masks, torch.tensor([True, False]))
    matches = Matches(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    terms = _criterion().mask_terms(pred, targets, matches, torch.tensor(2.0))
    x, t = [2.0, -1.0, 0.5, -3.0], [1, 0, 1, 1]
    focal = sum(_focal(a, b, 0.25, 2) for a, b in zip(x, t)) / 4
    probs = [sig(a) for a in x]
    dice = 1 - (2 * sum(p * b for p, b in zip(probs, t)) + 1) / (sum(probs) + sum(t) + 1)
    assert terms["loss_mask"].item() == pytest.approx(focal / 2, rel=1e-5)
    assert terms["loss_dice"].item() == pytest.approx(dice / 2, rel=1e-5)


def test_mask_logits_are_upsampled_bilinearly_to_the_target():
    pred = torch.randn(1, 1, 2, 2)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    targets = FindTargets(torch.tensor([[0.25, 0.25, 0.5, 0.5]]), torch.tensor([1]), masks)
    matches = Matches(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    up = torch.nn.functional.interpolate(pred, size=(4, 4), mode="bilinear", align_corners=False)[0, 0].flatten()
    expected = sum(_focal(a, b, 0.25, 2) for a, b in zip(up.tolist(), masks.flatten().float().tolist())) / 16
    assert _criterion().mask_terms(pred, targets, matches, torch.tensor(1.0))["loss_mask"].item() == pytest.approx(expected, rel=1e-5)


def test_semantic_terms_average_over_non_empty_unions():
    seg = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])  # (B=2, 1, 2, 2)
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)  # two instances of query 0
    targets = FindTargets(torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]), torch.tensor([2, 0]), masks)
    terms = _criterion().semantic_terms(seg, targets)
    x, t = [1.0, -1.0, 0.0, 2.0], [1, 0, 0, 1]  # union of query 0; query 1 is empty and excluded
    focal = sum(_focal(a, b, 0.6, 2) for a, b in zip(x, t)) / 4
    probs = [sig(a) for a in x]
    dice = 1 - (2 * sum(p * b for p, b in zip(probs, t)) + 1) / (sum(probs) + 2 + 1)
    assert terms["loss_semantic_seg"].item() == pytest.approx(focal / (1 + 1e-6), rel=1e-5)
    assert terms["loss_semantic_dice"].item() == pytest.approx(dice / (1 + 1e-6), rel=1e-5)
    assert terms["loss_semantic_presence"].item() == 0.0


def _layer_outputs(q: int = 3, b: int = 2, size: int = 4, layers: int = 1, seed: int = 0):
    """Random per-layer logits, boxes (cxcywh, xyxy) and last-layer masks of one query set."""
    generator = torch.Generator().manual_seed(seed)
    cxcywh = torch.rand(layers, b, q, 4, generator=generator) * 0.4 + 0.3
    logits = torch.randn(layers, b, q, generator=generator)
    masks = torch.randn(b, q, size // 2, size // 2, generator=generator)
    return logits, cxcywh, cxcywh_to_xyxy(cxcywh), masks


def _single_layer_output(q: int = 3, b: int = 2, size: int = 4, layers: int = 1,
                         one_to_many: bool = True) -> MedSAM3Output:
    """Outputs of a training forward (with the one-to-many query set) or an eval forward (without)."""
    generator = torch.Generator().manual_seed(0)
    logits, cxcywh, xyxy, masks = _layer_outputs(q, b, size, layers, seed=1)
    o2m = None
    if one_to_many:
        o2m_logits, o2m_cxcywh, o2m_xyxy, o2m_masks = _layer_outputs(q, b, size, layers, seed=2)
        o2m = OneToManyOutput(o2m_logits, o2m_xyxy, o2m_cxcywh, o2m_masks)
    return MedSAM3Output(
        all_pred_logits=logits,
        all_pred_boxes=xyxy,
        all_pred_boxes_cxcywh=cxcywh,
        all_presence_logits=torch.randn(layers, b, 1, generator=generator),
        pred_masks=masks,
        semantic_seg=torch.randn(b, 1, size // 2, size // 2, generator=generator),
        query_hidden_states=torch.zeros(b, q, 8),
        one_to_many=o2m,
    )


def test_total_is_weighted_sum_times_sqrt_batch():
    out = _single_layer_output()
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 2:, 1:] = True
    targets = FindTargets(torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.6, 0.75, 0.75, 0.5]]), torch.tensor([2, 0]), masks)
    criterion = _criterion()
    terms = criterion(out, targets)
    w = criterion.weights
    o2o = (w.ce * terms["loss_ce"] + w.presence * terms["presence_loss"] + w.bbox * terms["loss_bbox"]
           + w.giou * terms["loss_giou"] + w.mask * terms["loss_mask"] + w.dice * terms["loss_dice"])
    o2m = sum(weight * terms.get(f"{name}_o2m", torch.tensor(0.0)) for name, weight in
              [("loss_ce", w.ce), ("loss_bbox", w.bbox), ("loss_giou", w.giou), ("loss_mask", w.mask), ("loss_dice", w.dice)])
    semantic = w.semantic_seg * terms["loss_semantic_seg"] + w.semantic_dice * terms["loss_semantic_dice"]
    expected = (o2o + w.o2m * o2m + semantic) * math.sqrt(2)
    assert "loss_bbox_o2m" in terms and "loss_mask_o2m" in terms
    assert "presence_loss_o2m" not in terms, "the one-to-many branch has no presence term"
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["num_instances"].item() == 2


def test_masks_as_pil_gives_them_train_as_bool_masks_and_soft_or_wrong_targets_are_refused():
    """0/255 uint8 (a PIL mask), 0/255 float, 0/1 integer masks and list boxes: the loss of bool masks; soft masks
    and a dict of targets are refused by name."""
    out = _single_layer_output()
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 2:, 1:] = True
    boxes = [[0.25, 0.25, 0.5, 0.5], [0.6, 0.75, 0.75, 0.5]]
    expected = _criterion()(out, FindTargets(torch.tensor(boxes), torch.tensor([2, 0]), masks))["loss"]
    for encoded in (masks.to(torch.uint8) * 255, masks.float() * 255, masks.long()):
        targets = FindTargets(boxes, [2, 0], encoded)
        assert targets.masks.dtype == torch.bool
        assert _criterion()(out, targets)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="soft masks"):
        FindTargets(boxes, [2, 0], masks.float() * 0.7)
    with pytest.raises(TypeError, match="must be a FindTargets"):
        _criterion()(out, {"boxes": torch.tensor(boxes), "num_boxes": torch.tensor([2, 0])})


def test_negative_prompt_only_trains_presence():
    out = _single_layer_output(b=1)
    targets = FindTargets(torch.zeros(0, 4), torch.tensor([0]), torch.zeros(0, 4, 4, dtype=torch.bool))
    terms = _criterion()(out, targets)
    presence = 0.5 * bce(out.all_presence_logits[0, 0, 0].item(), 0)
    assert terms["loss_ce"].item() == 0 and terms["loss_bbox"].item() == 0
    assert terms["loss"].item() == pytest.approx(20 * presence, rel=1e-5)


def _two_targets() -> FindTargets:
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 2:, 1:] = True
    return FindTargets(torch.tensor([[0.45, 0.5, 0.3, 0.3], [0.55, 0.45, 0.2, 0.3]]), torch.tensor([2, 0]), masks)


def test_one_to_many_terms_score_the_second_query_set_like_sam3():
    """Sam3LossWrapper(use_o2m_matcher_on_o2m_aux=False): o2m rule on the last layer's second query set,
    Hungarian on the auxiliary layers' second set, masks from pred_masks_o2m, every o2m term times 2."""
    out = _single_layer_output(q=6, layers=2)
    targets = _two_targets()
    criterion = _criterion()
    terms = criterion(out, targets)
    o2m, num = out.one_to_many, torch.tensor(2.0)
    last = criterion.o2m_matcher(o2m.all_pred_logits[1], o2m.all_pred_boxes_cxcywh[1], targets)
    aux = criterion.matcher(o2m.all_pred_logits[0], o2m.all_pred_boxes_cxcywh[0], targets)
    expected_last = criterion.box_terms(o2m.all_pred_boxes_cxcywh[1], o2m.all_pred_boxes[1], targets, last, num)
    expected_last |= criterion.mask_terms(o2m.pred_masks, targets, last, num)
    expected_aux = criterion.box_terms(o2m.all_pred_boxes_cxcywh[0], o2m.all_pred_boxes[0], targets, aux, num)
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert terms[f"{name}_o2m"].item() == pytest.approx(expected_last[name].item(), rel=1e-6), name
    for name in ("loss_bbox", "loss_giou"):
        assert terms[f"{name}_aux0_o2m"].item() == pytest.approx(expected_aux[name].item(), rel=1e-6), name
        # the one-to-one queries are scored on their own: the branches are not the same numbers
        assert terms[f"{name}_aux0_o2m"].item() != pytest.approx(terms[f"{name}_aux0"].item(), rel=1e-3), name
    assert "loss_mask_aux0_o2m" not in terms, "o2m masks exist for the last layer only"
    without = _criterion(one_to_many=False)(out, targets)
    extra = sum(getattr(criterion.weights, w) * terms[f"{t}{sfx}_o2m"] for sfx in ("", "_aux0") for t, w in
                [("loss_ce", "ce"), ("loss_bbox", "bbox"), ("loss_giou", "giou")])
    extra = extra + criterion.weights.mask * terms["loss_mask_o2m"] + criterion.weights.dice * terms["loss_dice_o2m"]
    assert terms["loss"].item() == pytest.approx((without["loss"] + 2 * extra * math.sqrt(2)).item(), rel=1e-5)


def test_eval_outputs_have_no_one_to_many_terms():
    terms = _criterion()(_single_layer_output(q=6, layers=2, one_to_many=False), _two_targets())
    assert not [name for name in terms if name.endswith("_o2m")]


def test_aux_layers_get_box_and_class_terms(tiny_images):
    from medsam3_monai.networks import MedSAM3Net

    targets = FindTargets.from_instances(
        [torch.tensor([[0.5, 0.5, 0.3, 0.3]]), torch.tensor([[0.3, 0.3, 0.2, 0.2]])],
        [torch.ones(1, 112, 112, dtype=torch.bool), torch.zeros(1, 112, 112, dtype=torch.bool)],
    )
    net = MedSAM3Net("tiny").train()  # training forward: the one-to-many query set exists
    terms = SetCriterion()(net(tiny_images, ["a", "b"]), targets)
    for name in ("loss_ce_aux0", "presence_loss_aux0", "loss_bbox_aux0", "loss_giou_aux0", "loss_bbox_aux0_o2m",
                 "loss_mask_o2m"):
        assert name in terms
    assert "loss_mask_aux0" not in terms, "instance masks are supervised on the last layer only"
    terms["loss"].backward()
    assert net.sam3.detr_decoder.query_embed.weight.grad.abs().sum() > 0


def test_the_matchers_match_several_layers_at_once_as_layer_by_layer():
    """(L, B, Q) predictions: one call, find-query b of layer l on row l * B + b, the pairs of L separate calls;
    the Hungarian pairs in row order, min(n, Q) per row."""
    from medsam3_monai.losses.matchers import pairs_per_row

    out = _single_layer_output(q=6, layers=3)
    targets = FindTargets.from_instances([torch.tensor([[0.45, 0.5, 0.3, 0.3], [0.55, 0.45, 0.2, 0.3]]),
                                          torch.zeros(0, 4), torch.tensor([[0.3, 0.3, 0.2, 0.2]])])
    logits = torch.cat([out.all_pred_logits, out.all_pred_logits[:, :1]], 1)  # (3 layers, B = 3, Q = 6)
    boxes = torch.cat([out.all_pred_boxes_cxcywh, out.all_pred_boxes_cxcywh[:, :1]], 1)
    def pairs(matches: Matches) -> list:
        return sorted(zip(matches.batch_idx.tolist(), matches.query_idx.tolist(), matches.target_idx.tolist()))

    for matcher in (HungarianMatcher(), OneToManyMatcher(threshold=0.0)):
        together = matcher(logits, boxes, targets)
        apart = Matches.stacked([matcher(logits[layer], boxes[layer], targets) for layer in range(3)], [3, 3, 3])
        assert len(together) > 3 and pairs(together) == pairs(apart)
    hungarian = HungarianMatcher()(logits, boxes, targets)
    assert hungarian.batch_idx.tolist() == sorted(hungarian.batch_idx.tolist())
    assert pairs_per_row(targets, 6) == [2, 0, 1] and len(hungarian) == 3 * 3
    last = hungarian.tail(3, first_row=6)
    reference = HungarianMatcher()(logits[2], boxes[2], targets)
    assert torch.equal(last.batch_idx, reference.batch_idx) and torch.equal(last.query_idx, reference.query_idx)
    assert torch.equal(last.target_idx, reference.target_idx)


def test_every_layer_scored_together_equals_layer_by_layer():
    """The criterion scores all decoder layers of a query set at once: each term is the one of that layer alone --
    its own matches (Hungarian; one-to-many on the last one-to-many layer), classification_terms, box_terms and
    mask_terms -- as SAM3's loss computes it layer by layer."""
    out = _single_layer_output(q=6, layers=3)
    targets = _two_targets()
    criterion = _criterion()
    terms = criterion(out, targets)
    num = torch.tensor(2.0)
    o2m = out.one_to_many
    for layer in range(3):
        suffix = "" if layer == 2 else f"_aux{layer}"
        for branch, logits, cxcywh, xyxy, presence in (
                ("", out.all_pred_logits, out.all_pred_boxes_cxcywh, out.all_pred_boxes, out.all_presence_logits),
                ("_o2m", o2m.all_pred_logits, o2m.all_pred_boxes_cxcywh, o2m.all_pred_boxes, None)):
            matcher = criterion.o2m_matcher if branch and layer == 2 else criterion.matcher
            matches = matcher(logits[layer], cxcywh[layer], targets)
            expected = criterion.classification_terms(logits[layer], xyxy[layer],
                                                      None if presence is None else presence[layer], targets, matches)
            expected |= criterion.box_terms(cxcywh[layer], xyxy[layer], targets, matches, num)
            if layer == 2:
                masks = o2m.pred_masks if branch else out.pred_masks
                expected |= criterion.mask_terms(masks, targets, matches, num)
            for name, value in expected.items():
                assert terms[f"{name}{suffix}{branch}"].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-9), \
                    f"{name}{suffix}{branch}"
    assert len([name for name in terms if "_aux" in name]) == 2 * (4 + 3)  # two aux layers, both query sets


def test_the_criterion_launches_as_many_operators_for_six_decoder_layers_as_for_two():
    """Layers are scored together: SAM3's six decoder layers cost the criterion no more operators (kernel launches
    on a GPU) than two; layer by layer, each layer added about 600."""
    from _script_helpers import load_script

    operator_count = load_script("bench_train").OperatorCount
    counts = []
    for layers in (2, 6):
        out, targets = _single_layer_output(q=6, layers=layers), _two_targets()
        with operator_count() as count:
            _criterion()(out, targets)
        counts.append(count.calls)
    assert counts[1] - counts[0] <= 10, counts


@pytest.mark.parametrize("weights", [{"mask": -1}, {"ce": float("nan")}, {"dice": "abc"}])
def test_a_loss_weight_that_is_not_a_number_at_least_0_is_refused(weights):
    """From Python as from the bundle (``--loss_weights#...``): a negative weight would make its term a reward."""
    name = next(iter(weights))
    with pytest.raises(ValueError, match=f"loss weight {name} must be a number >= 0"):
        SetCriterion(weights=weights)
