"""The Medical SAM3 set-prediction objective (§3.4, Table 2) with the semantics of Meta's SAM3 training code.

Total = sum over decoder layers of [L_find(one-to-one queries) + w_o2m * L_find(one-to-many queries)] + mask and
semantic terms on the last layer, times sqrt(B) (B find-queries). The one-to-many queries are the second (DAC)
query set of the training forward (``MedSAM3Output.one_to_many``), as in ``Sam3LossWrapper``. Box and mask terms are normalised by N, the number of target
instances in the batch (averaged over ranks, at least 1). See ``SetCriterion`` for each term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..boxes import elementwise_giou, elementwise_iou
from ..bundle import flag, number_in
from ..networks.outputs import MedSAM3Output, upsample_logits
from .functional import dice_loss_per_row, sigmoid_focal_loss
from .matchers import HungarianMatcher, Matches, OneToManyMatcher, pairs_per_row
from .targets import FindTargets


@dataclass
class LossWeights:
    """Weights of every term (SAM3 / Medical SAM3 defaults)."""

    bbox: float = 5.0
    giou: float = 2.0
    ce: float = 20.0
    presence: float = 20.0
    mask: float = 200.0
    dice: float = 10.0
    semantic_seg: float = 20.0
    semantic_dice: float = 30.0
    semantic_presence: float = 1.0
    o2m: float = 2.0

    def __post_init__(self) -> None:
        for field in fields(self):  # a negative weight would turn its term into a reward; NaN poisons the total
            if not number_in(getattr(self, field.name), 0):
                raise ValueError(f"loss weight {field.name} must be a number >= 0, got {getattr(self, field.name)!r}")


@dataclass
class CriterionSettings:
    """Switches and shape parameters of the terms."""

    pos_weight: float = 10.0  # positive weight of the soft-target classification BCE
    soft_target_alpha: float = 0.25  # t = p^alpha * IoU^(1 - alpha)
    negative_gamma: float = 2.0  # unmatched queries: BCE(logit, 0) * p^gamma
    pad_num_queries: int = 200  # classification normalised by max(Q, 200) * B
    presence_alpha: float = 0.5
    presence_gamma: float = 0.0
    mask_focal_alpha: float = 0.25
    mask_focal_gamma: float = 2.0
    semantic_focal_alpha: float = 0.6
    semantic_focal_gamma: float = 2.0
    instance_masks: bool = True  # last-layer instance mask focal + dice
    semantic: bool = True  # L_seg on the semantic head
    one_to_many: bool = True  # score the one-to-many query set when the outputs carry it (training forwards)
    # the o2m queries on auxiliary layers: "hungarian" (SAM3: use_o2m_matcher_on_o2m_aux=False), "one_to_many",
    # or "none"
    o2m_aux_matcher: str = "hungarian"
    o2m_masks: bool = True  # SAM3 predicts masks for o2m queries too (pred_masks_o2m, last layer)
    scale_by_find_batch_size: bool = True  # multiply the total by sqrt(B)
    normalization: str = "global"  # "global" (average N over ranks), "local", or "none" (N = 1)

    def __post_init__(self) -> None:
        # a bundle override (--loss_settings#semantic false) arrives as text: 'false' must not count as true
        for field in fields(self):
            if field.type == "bool":
                setattr(self, field.name, flag(getattr(self, field.name), f"loss_settings#{field.name}"))
            elif field.name.endswith("_alpha"):  # a weight between two terms (or an exponent pair summing to 1)
                if not number_in(getattr(self, field.name), 0, 1):
                    raise ValueError(f"{field.name} must be a number in [0, 1], got {getattr(self, field.name)!r}")
            elif field.type in ("float", "int") and not number_in(getattr(self, field.name), 0):
                # a negative pos_weight or gamma would flip or invert a term
                raise ValueError(f"{field.name} must be a number >= 0, got {getattr(self, field.name)!r}")


class SetCriterion(nn.Module):
    """Set-prediction loss over every decoder layer of a :class:`MedSAM3Output`.

    Terms (per layer l; suffix ``_aux{l}`` for auxiliary layers, ``_o2m`` for the one-to-many branch):
      * ``loss_ce``: matched queries BCE(logit, t) * pos_weight with soft target t = max(p^0.25 IoU^0.75, 0.01)
        (detached); unmatched BCE(logit, 0) * p^2; rows of find-queries without targets are zeroed; divided by
        max(Q, 200) * B.
      * ``presence_loss``: focal (alpha 0.5, gamma 0) on the presence logit vs "prompt has a target", mean over B.
      * ``loss_bbox`` (L1 on cxcywh) and ``loss_giou`` (1 - GIoU on xyxy), summed over matches / N.
      * last layer: ``loss_mask`` (focal 0.25 / 2, per-mask pixel mean) and ``loss_dice`` on matched instance
        masks with valid masks, logits upsampled bilinearly to the target size, summed / N.
      * ``loss_semantic_seg`` (focal 0.6 / 2) and ``loss_semantic_dice`` on the semantic head vs the union of
        the prompt's instance masks, averaged over find-queries whose union is non-empty;
        ``loss_semantic_presence`` is inert: the released segmentation head has no presence logit (weight kept).

    The one-to-many branch scores the second (DAC) query set of a training forward, ``outputs.one_to_many``: its
    last layer is matched one-to-many, auxiliary layers by ``o2m_aux_matcher`` (Hungarian, as in SAM3); it has
    no presence term and every one of its terms is multiplied by ``weights.o2m``. Outputs without that set
    (eval forwards, ``dac=False``) get no one-to-many terms, as in SAM3.
    """

    def __init__(
        self,
        weights: LossWeights | dict | None = None,
        settings: CriterionSettings | dict | None = None,
        matcher: HungarianMatcher | None = None,
        o2m_matcher: OneToManyMatcher | None = None,
    ) -> None:
        super().__init__()
        self.weights = weights if isinstance(weights, LossWeights) else LossWeights(**(weights or {}))
        self.settings = settings if isinstance(settings, CriterionSettings) else CriterionSettings(**(settings or {}))
        if self.settings.o2m_aux_matcher not in ("hungarian", "one_to_many", "none"):
            raise ValueError(f"o2m_aux_matcher must be hungarian, one_to_many or none; got {self.settings.o2m_aux_matcher!r}")
        if self.settings.normalization not in ("global", "local", "none"):
            raise ValueError(f"normalization must be global, local or none; got {self.settings.normalization!r}")
        self.matcher = matcher or HungarianMatcher()
        self.o2m_matcher = o2m_matcher or OneToManyMatcher()

    # ------------------------------------------------------------------ normalisation
    def num_instances(self, targets: FindTargets) -> torch.Tensor:
        """N: target instances in the batch, averaged over ranks for "global", at least 1."""
        if self.settings.normalization == "none":
            return torch.tensor(1.0, device=targets.boxes.device)
        num = targets.num_boxes.sum().float().to(targets.boxes.device)
        if self.settings.normalization == "global" and dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return num.clamp(min=1)

    # ------------------------------------------------------------------ terms
    def layer_classification_terms(
        self,
        logits: torch.Tensor,
        boxes_xyxy: torch.Tensor,
        presence_logits: torch.Tensor | None,
        has_target: torch.Tensor,
        targets: FindTargets,
        matches: Matches,
    ) -> dict[str, torch.Tensor]:
        """``loss_ce`` and (when presence logits are given) ``presence_loss`` of L decoder layers at once, each (L,):
        logits (L, B, Q), boxes (L, B, Q, 4), presence logits (L, B, 1) or None, ``has_target`` (B,), ``matches``
        over rows ``l * B + b``."""
        s = self.settings
        layers, batch, num_queries = logits.shape
        logits = logits.reshape(layers * batch, num_queries).float()
        boxes_xyxy = boxes_xyxy.reshape(layers * batch, num_queries, 4).float()
        has_target = has_target.repeat(layers)
        prob = logits.sigmoid()
        b, q, t = matches.batch_idx, matches.query_idx, matches.target_idx
        with torch.no_grad():
            is_matched = torch.zeros_like(logits)
            is_matched[b, q] = 1.0
            iou, _ = elementwise_iou(boxes_xyxy[b, q].float(), targets.boxes_xyxy[t].float())
            soft = (prob[b, q] ** s.soft_target_alpha * iou ** (1 - s.soft_target_alpha)).clamp(min=0.01)
            soft_targets = is_matched.clone()
            flat = b * logits.shape[1] + q
            last = _last_occurrence(flat)  # a query matched twice keeps its last pair's target
            soft_targets.view(-1)[flat[last]] = soft[last].to(soft_targets.dtype)
        positive = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none") * is_matched * s.pos_weight
        negative = F.binary_cross_entropy_with_logits(logits, is_matched, reduction="none") * (1 - is_matched)
        rows = (positive + negative * prob**s.negative_gamma).sum(1) * has_target.to(logits.dtype)  # (L * B,)
        terms = {"loss_ce": rows.view(layers, batch).sum(1) / (max(num_queries, s.pad_num_queries) * batch)}
        if presence_logits is not None:
            presence = sigmoid_focal_loss(presence_logits.reshape(-1).float(), has_target.float(), s.presence_alpha,
                                          s.presence_gamma)
            terms["presence_loss"] = presence.view(layers, batch).sum(1) / batch
        return terms

    def classification_terms(
        self,
        logits: torch.Tensor,
        boxes_xyxy: torch.Tensor,
        presence_logits: torch.Tensor | None,
        targets: FindTargets,
        matches: Matches,
    ) -> dict[str, torch.Tensor]:
        """``loss_ce`` and (when presence logits are given) ``presence_loss`` for logits (B, Q) of one layer."""
        terms = self.layer_classification_terms(logits[None], boxes_xyxy[None],
                                                None if presence_logits is None else presence_logits[None],
                                                targets.has_target(), targets, matches)
        return {name: value[0] for name, value in terms.items()}

    @staticmethod
    def layer_box_terms(boxes_cxcywh: torch.Tensor, boxes_xyxy: torch.Tensor, targets: FindTargets, matches: Matches,
                        num: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_bbox`` (L1 cxcywh) and ``loss_giou`` (1 - GIoU, xyxy) of L decoder layers at once, each (L,): the
        matched pairs of boxes (L, B, Q, 4) (``matches`` over rows ``l * B + b``) summed per layer / N."""
        layers, batch, num_queries = boxes_cxcywh.shape[:3]
        b, q, t = matches.batch_idx, matches.query_idx, matches.target_idx
        cxcywh = boxes_cxcywh.reshape(layers * batch, num_queries, 4)[b, q].float()
        xyxy = boxes_xyxy.reshape(layers * batch, num_queries, 4)[b, q].float()
        l1 = F.l1_loss(cxcywh, targets.boxes[t].float(), reduction="none").sum(-1)
        giou = 1 - elementwise_giou(xyxy, targets.boxes_xyxy[t].float())
        pairs = torch.stack([l1, giou])  # (2, K)
        layer = torch.div(b, batch, rounding_mode="floor")
        sums = pairs.new_zeros(2, layers).index_add_(1, layer, pairs) / num
        return dict(zip(("loss_bbox", "loss_giou"), sums.unbind(0)))

    @staticmethod
    def box_terms(boxes_cxcywh: torch.Tensor, boxes_xyxy: torch.Tensor, targets: FindTargets, matches: Matches,
                  num: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_bbox`` (L1 cxcywh) and ``loss_giou`` over matched pairs of boxes (B, Q, 4) of one layer, each
        summed / N."""
        terms = SetCriterion.layer_box_terms(boxes_cxcywh[None], boxes_xyxy[None], targets, matches, num)
        return {name: value[0] for name, value in terms.items()}

    def layer_terms(self, logits: torch.Tensor, boxes_cxcywh: torch.Tensor, boxes_xyxy: torch.Tensor,
                    presence_logits: torch.Tensor | None, has_target: torch.Tensor, targets: FindTargets,
                    matches: Matches, num: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`layer_classification_terms` and :meth:`layer_box_terms`: every term of L decoder layers (the same
        numbers as layer by layer, in a few operations for all layers: a training step launches fewer kernels)."""
        return (self.layer_classification_terms(logits, boxes_xyxy, presence_logits, has_target, targets, matches)
                | self.layer_box_terms(boxes_cxcywh, boxes_xyxy, targets, matches, num))

    def mask_terms(self, pred_masks: torch.Tensor, targets: FindTargets, matches: Matches,
                   num: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_mask`` (focal) and ``loss_dice`` on matched instances with valid masks, each summed / N."""
        keep = targets.is_valid_mask[matches.target_idx]
        src = pred_masks[matches.batch_idx[keep], matches.query_idx[keep]]
        tgt = targets.dense_masks()[matches.target_idx[keep]]
        src = upsample_logits(src[:, None], tuple(tgt.shape[-2:]))[:, 0].flatten(1)
        tgt = tgt.flatten(1).to(src.dtype)
        s = self.settings
        focal = sigmoid_focal_loss(src, tgt, s.mask_focal_alpha, s.mask_focal_gamma).mean(1)
        return {"loss_mask": focal.sum() / num, "loss_dice": dice_loss_per_row(src, tgt).sum() / num}

    def semantic_terms(self, semantic_seg: torch.Tensor, targets: FindTargets) -> dict[str, torch.Tensor]:
        """L_seg: focal + dice of the semantic head vs the per-query union of instance masks."""
        union = targets.semantic_masks()
        logits = upsample_logits(semantic_seg, tuple(union.shape[-2:]))[:, 0].flatten(1)
        union = union.flatten(1).to(logits.dtype)
        s = self.settings
        focal = sigmoid_focal_loss(logits, union, s.semantic_focal_alpha, s.semantic_focal_gamma).mean(1)
        dice = dice_loss_per_row(logits, union)
        present = union.any(-1).to(logits.dtype)
        denominator = present.sum() + 1e-6
        return {
            "loss_semantic_seg": (focal * present).sum() / denominator,
            "loss_semantic_dice": (dice * present).sum() / denominator,
            # the released head has no presence logit: the term exists (weight 1) but is identically zero
            "loss_semantic_presence": logits.new_zeros(()),
        }

    # ------------------------------------------------------------------ forward
    def _weighted(self, terms: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        """The weighted sum of ``terms`` (each a number, or one per layer: summed), times ``scale``."""
        w = self.weights
        weight_of = {
            "loss_ce": w.ce, "presence_loss": w.presence, "loss_bbox": w.bbox, "loss_giou": w.giou,
            "loss_mask": w.mask, "loss_dice": w.dice, "loss_semantic_seg": w.semantic_seg,
            "loss_semantic_dice": w.semantic_dice, "loss_semantic_presence": w.semantic_presence,
        }
        return sum(weight_of[k] * (v if v.ndim == 0 else v.sum()) for k, v in terms.items()) * scale

    def forward(self, outputs: MedSAM3Output, targets: FindTargets) -> dict[str, torch.Tensor]:
        """All terms (unweighted, per layer and branch) plus ``loss``, the weighted total to back-propagate.

        Every layer's classification and box terms of a query set are computed together (:meth:`layer_terms`), and
        the one-to-one queries of every layer are matched with one cost matrix (one copy to the host)."""
        s = self.settings
        if not isinstance(targets, FindTargets):
            raise TypeError(f"targets must be a FindTargets (boxes, num_boxes, masks), not {type(targets).__name__}: "
                            "build it with FindTargets(...) or FindTargets.from_instances(...)")
        targets = targets.to(outputs.all_pred_logits.device)
        if targets.batch_size != outputs.all_pred_logits.shape[1]:
            raise ValueError(f"{targets.batch_size} targets for {outputs.all_pred_logits.shape[1]} find-queries")
        num = self.num_instances(targets)
        num_layers, batch = outputs.num_layers, targets.batch_size
        has_target = targets.has_target()
        with_instance_masks = s.instance_masks and targets.masks is not None
        terms: dict[str, torch.Tensor] = {}
        last = num_layers - 1
        # one-to-one queries: Hungarian on every layer
        logits, cxcywh = outputs.all_pred_logits, outputs.all_pred_boxes_cxcywh
        matches = self.matcher(logits, cxcywh, targets)
        last_matches = matches.tail(sum(pairs_per_row(targets, logits.shape[-1])), last * batch)
        layered = self.layer_terms(logits, cxcywh, outputs.all_pred_boxes, outputs.all_presence_logits, has_target,
                                   targets, matches, num)
        masks = self.mask_terms(outputs.pred_masks, targets, last_matches, num) if with_instance_masks else {}
        total = self._weighted(layered) + self._weighted(masks)
        terms |= self._per_layer(layered, masks, range(num_layers), "")
        # one-to-many queries (training forwards): the last layer matched one-to-many, the others by o2m_aux_matcher
        o2m = outputs.one_to_many
        if s.one_to_many and o2m is not None:
            first = last if s.o2m_aux_matcher == "none" else 0
            aux_matcher = self.o2m_matcher if s.o2m_aux_matcher == "one_to_many" else self.matcher
            logits, cxcywh = o2m.all_pred_logits, o2m.all_pred_boxes_cxcywh
            last_matches = self.o2m_matcher(logits[last], cxcywh[last], targets)
            aux = slice(first, last)
            matches = Matches.stacked([aux_matcher(logits[aux], cxcywh[aux], targets), last_matches],
                                      [(last - first) * batch, batch]) if last > first else last_matches
            layers = slice(first, num_layers)
            layered = self.layer_terms(logits[layers], cxcywh[layers], o2m.all_pred_boxes[layers], None, has_target,
                                       targets, matches, num)
            masks = (self.mask_terms(o2m.pred_masks, targets, last_matches, num)
                     if with_instance_masks and s.o2m_masks else {})
            total = total + self._weighted(layered, self.weights.o2m) + self._weighted(masks, self.weights.o2m)
            terms |= self._per_layer(layered, masks, range(first, num_layers), "_o2m")
        if s.semantic and targets.masks is not None:
            semantic = self.semantic_terms(outputs.semantic_seg, targets)
            total = total + self._weighted(semantic)
            terms |= {k: v.detach() for k, v in semantic.items()}
        if s.scale_by_find_batch_size:
            total = total * batch**0.5
        terms["num_instances"] = num.detach()
        terms["loss"] = total
        return terms

    @staticmethod
    def _per_layer(layered: dict[str, torch.Tensor], last_layer: dict[str, torch.Tensor], layers: range, branch: str
                   ) -> dict[str, torch.Tensor]:
        """Reported (detached) terms: ``name_aux{l}`` + ``branch`` for the auxiliary layers' values of ``layered``
        ((len(layers),) each, ``layers`` ending with the last decoder layer), ``name`` + ``branch`` for the last
        layer's and for ``last_layer``'s."""
        last = layers.stop - 1
        out = {}
        for name, values in layered.items():
            for layer, value in zip(layers, values.detach().unbind(0)):
                out[f"{name}{'' if layer == last else f'_aux{layer}'}{branch}"] = value
        return out | {f"{name}{branch}": value.detach() for name, value in last_layer.items()}

    def config(self) -> dict:
        """Every weight, switch and matcher cost, for logging as run parameters."""
        return {**{f"weight_{k}": v for k, v in asdict(self.weights).items()}, **asdict(self.settings),
                **{f"matcher_{k}": v for k, v in self.matcher.settings().items()},
                **{f"o2m_matcher_{k}": v for k, v in self.o2m_matcher.settings().items()}}


def _last_occurrence(values: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct value in a 1-D tensor."""
    if values.numel() == 0:
        return values
    positions = torch.arange(values.numel(), device=values.device)
    order = torch.argsort(values * values.numel() + positions)  # sort by value, then position
    sorted_values = values[order]
    is_last = torch.ones_like(sorted_values, dtype=torch.bool)
    is_last[:-1] = sorted_values[1:] != sorted_values[:-1]
    return order[is_last]
