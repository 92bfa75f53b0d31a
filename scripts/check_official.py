"""Compare our network with Meta's official SAM3 code (sam3 0.1.4) on random full-size weights.

For each seed, the official side (run with the official package's Python) builds ``Sam3Image`` with random
weights (parameters that are constant at init perturbed, the two uninitialised text tensors initialised), saves
them as the original ``sam3.pt`` and records its outputs on a fixed 1008-px image (``--image-size 504``: the ViT built
at 504 px, the Medical-SAM3 release's 3D size, on both sides; the weights are the same tensors at any size):

* inference: a text-only prompt ("polyp"), text + box (one positive, one negative box) and box-only (SAM3's
  ``"visual"`` text + one box), every decoder layer;
* training (DAC) forward on two text prompts with targets, dropout off: both query sets, every layer, and the
  ``Sam3LossWrapper`` terms (``use_o2m_matcher_on_o2m_aux=False``, SAM3's weights) against our ``SetCriterion``;
  then the gradient of that total loss for every parameter after the backbones (geometry encoder, DETR encoder
  and decoder, scoring, segmentation head; the backbones' features are inputs on both sides, as they are for
  MedSAM3's frozen encoders), mapped to our names by the checkpoint conversion.

Our side (this project's Python) loads the same ``sam3.pt`` three ways: ``MedSAM3Net("sam3.pt")``,
``MedSAM3Net`` on the folder written by ``medsam3 convert-checkpoint``, and plain
``transformers.Sam3Model.from_pretrained`` on that folder (its own forward, last layer only: upstream skips the
geometry token of text-only prompts, so that column shows the difference we fix). It prints the max abs
difference of every output and writes the table as Markdown and JSON.

Build the official environment aside with ``make official`` (``scripts/setup_official_env.sh``: sam3==0.1.4, psutil,
scipy, torchmetrics and open_clip_torch for the CLIP BPE vocabulary; never a dependency of the project)::

    make official
    python scripts/check_official.py --official-python ~/.cache/medsam3-monai/sam3-official-venv/bin/python --seeds 0 1

The tracker is compared with sam3's in the test suite (``tests/test_official_tracker.py``,
``scripts/official_tracker.py``).

Full-size models on the CPU: about 3.4 GB of weights per model on disk and in memory, minutes per seed.
``--tiny``: both sides at a tiny size (``scripts/official_tiny.py``: sam3's own classes assembled as its builder
assembles them, at our tiny preset's sizes; 112 px unless ``--image-size``), seconds per seed; the converted folder is
the one our network saves (``convert-checkpoint`` builds SAM3's architecture). ``tests/test_official_detector.py``
runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE_SIZE = 1008  # --image-size sets it (both stages)
TINY = False  # --tiny (both stages): the tiny architecture of scripts/official_tiny.py instead of SAM3's
TINY_IMAGE_SIZE = 112  # --tiny's default size
TEXT_PROMPT = "polyp"
BOX_ONLY_TEXT = "visual"
# cx, cy, w, h in [0, 1]
POSITIVE_BOX = [0.42, 0.46, 0.30, 0.26]
NEGATIVE_BOX = [0.75, 0.72, 0.16, 0.20]
TRAIN_PROMPTS = ["polyp", "liver", "tumour !/ mass"]  # the second prompt has no target: a negative; the third's target
# is packed after the first's (a non-zero offset); its '!' is a token of id 0, which SAM3's text mask (ids != 0) hides
#: max abs difference allowed per output kind (the measured ones are ~4x below: masks 8.9e-6, the rest 1.3e-6), so
#: that a real deviation, e.g. transformers' ViT LayerNorm eps of 1e-6 (logits +2e-5, masks +1.9e-4), fails
TOLERANCES = {"masks": 2e-5, "semantic": 2e-5}
TOLERANCE = 5e-6  # logits, boxes, presence
LOSS_TOLERANCE = 1e-5  # relative, every loss term and the total 'loss' (measured 4.9e-7)
#: per parameter tensor, ||ours - official|| / ||official|| of its gradient (measured up to 1.7e-4: the decoder's
#: self-attention q / k projections, whose gradients are a few 1e-6 of the whole; the median tensor 4e-6)
GRADIENT_TOLERANCE = 1e-3
#: a tensor whose official gradient norm is below this share of the whole gradient's norm is numerically zero (the
#: attention key biases: softmax ignores a shift shared by every key, so their exact gradient is 0 and both sides
#: hold rounding noise); it is compared to that scale instead: ||ours - official|| / ||whole official gradient||
NEGLIGIBLE_GRADIENT = 1e-6
ZERO_GRADIENT_TOLERANCE = 1e-7  # measured up to 1.0e-9
O2M_WEIGHT = 2.0
SHARED_IMAGE_GLOB = "Kvasir-SEG_sample/images/*.jpg"


# ================================================================================== official side
def _randomise(model, torch, seed: int) -> int:
    """Initialise the uninitialised text tensors and perturb every parameter that is constant at init."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    encoder = model.backbone.language_backbone.encoder
    with torch.no_grad():
        encoder.positional_embedding.normal_(0.0, 0.01, generator=generator)
        encoder.text_projection.normal_(0.0, encoder.text_projection.shape[0] ** -0.5, generator=generator)
        perturbed = 0
        for parameter in model.parameters():
            flat = parameter.flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                scale = 0.1 * max(abs(float(flat[0])), 0.1)
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
                perturbed += 1
    return perturbed


def _image(torch, shared: Path | None, seed: int):
    """(1, 3, S, S) SAM3-normalised pixels of a shared colonoscopy image (or random pixels without it)."""
    import numpy as np

    files = sorted(shared.glob(SHARED_IMAGE_GLOB)) if shared else []
    if files:
        from PIL import Image

        picture = Image.open(files[seed % len(files)]).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)[None]
    else:
        pixels = torch.randint(0, 256, (1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(seed))
    return (pixels.float() * (1.0 / 255.0) - 0.5) / 0.5


def _training_targets(torch):
    """Two 'polyp' instances (an ellipse and a rectangle) for the first prompt, none for the second."""
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    u, v = (xx + 0.5) / IMAGE_SIZE, (yy + 0.5) / IMAGE_SIZE
    ellipse = ((u - 0.40) / 0.15) ** 2 + ((v - 0.45) / 0.12) ** 2 <= 1
    rectangle = (u > 0.65) & (u < 0.80) & (v > 0.60) & (v < 0.80)
    masks = torch.stack([ellipse, rectangle])
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, x1 = xs.min().item() / IMAGE_SIZE, (xs.max().item() + 1) / IMAGE_SIZE
        y0, y1 = ys.min().item() / IMAGE_SIZE, (ys.max().item() + 1) / IMAGE_SIZE
        boxes.append([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
    return torch.tensor(boxes), torch.tensor([1, 0, 1]), masks


def _official_losses(model, torch):
    import functools

    from sam3.train.loss import loss_fns
    from sam3.train.loss.loss_fns import Boxes, IABCEMdetr, Masks, SemanticSegCriterion
    from sam3.train.loss.sam3_loss import Sam3LossWrapper
    from sam3.train.matcher import BinaryOneToManyMatcher

    # its focal loss defaults to a Triton (GPU) kernel; the same formula in plain torch runs on the CPU
    loss_fns.sigmoid_focal_loss = functools.partial(loss_fns.sigmoid_focal_loss, triton=False)

    find_losses = [
        Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
        IABCEMdetr(pos_weight=10.0, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0}, weak_loss=False,
                   alpha=0.25, gamma=2, pad_n_queries=200, use_presence=True, presence_alpha=0.5, presence_gamma=0.0),
        Masks(weight_dict={"loss_mask": 200.0, "loss_dice": 10.0}, focal_alpha=0.25, focal_gamma=2),
    ]
    semantic = SemanticSegCriterion(
        weight_dict={"loss_semantic_seg": 20.0, "loss_semantic_dice": 30.0, "loss_semantic_presence": 1.0},
        focal=True, focal_alpha=0.6, focal_gamma=2.0, downsample=False, presence_head=True, presence_loss=False,
    )
    return Sam3LossWrapper(
        loss_fns_find=find_losses, normalization="local", matcher=model.matcher,
        o2m_matcher=BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4), o2m_weight=2.0,
        use_o2m_matcher_on_o2m_aux=False, loss_fn_semantic_seg=semantic, scale_by_find_batch_size=True,
    )


def _dropout_off(model, torch) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
        if hasattr(module, "drop_prob"):  # timm DropPath
            module.drop_prob = 0.0


def official_stage(seed: int, workdir: Path, shared: Path | None) -> None:
    from official_tracker import official_code_on_cpu  # this folder (run as a script): sam3's CUDA calls on the CPU

    with official_code_on_cpu():
        _official_stage(seed, workdir, shared)


def _official_stage(seed: int, workdir: Path, shared: Path | None) -> None:
    import torch
    from official_tiny import build_official  # this folder (run as a script)
    from sam3.model.box_ops import box_cxcywh_to_xyxy
    from sam3.model.data_misc import BatchedFindTarget, FindStage
    from sam3.model.model_misc import inverse_sigmoid
    from sam3.train.loss.loss_fns import CORE_LOSS_KEY

    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    model = build_official(IMAGE_SIZE, TINY, eval_mode=False)
    perturbed = _randomise(model, torch, seed)
    torch.save({"model": {f"detector.{k}": v for k, v in model.state_dict().items()}}, workdir / "sam3.pt")
    pixels = _image(torch, shared, seed)
    from importlib.metadata import version

    results: dict = {"perturbed_parameters": perturbed, "pixels": pixels,
                     "versions": {"sam3": version("sam3"), "torch (official venv)": torch.__version__}}

    def find_stage(num: int, text_ids: list[int]):
        return FindStage(
            img_ids=torch.zeros(num, dtype=torch.long), text_ids=torch.tensor(text_ids),
            input_boxes=torch.zeros(0, num, 4), input_boxes_mask=torch.zeros(num, 0, dtype=torch.bool),
            input_boxes_label=torch.zeros(0, num, dtype=torch.long), input_points=torch.zeros(0, num, 2),
            input_points_mask=torch.zeros(num, 0, dtype=torch.bool),
        )

    # ---------------------------------------------------------------- inference: every layer through hooks
    model.eval()
    captured: dict = {}
    model.transformer.decoder.register_forward_hook(lambda m, i, out: captured.__setitem__("decoder", out))
    model.dot_prod_scoring.register_forward_hook(lambda m, i, out: captured.__setitem__("scores", out))
    image_out = {"img_batch_all_stages": pixels, **model.backbone.forward_image(pixels)}

    def infer(text: str, boxes: list[list[float]], labels: list[bool]) -> dict:
        backbone_out = {**image_out, **model.backbone.forward_text([text], device="cpu")}
        prompt = model._get_dummy_prompt(num_prompts=1)
        if boxes:
            prompt.append_boxes(torch.tensor(boxes).view(-1, 1, 4), torch.tensor(labels).view(-1, 1))
        out = model.forward_grounding(backbone_out=backbone_out, find_input=find_stage(1, [0]),
                                      find_target=None, geometric_prompt=prompt)
        hs, references, presence, _ = captured["decoder"]
        hs, references = hs.transpose(1, 2), references.transpose(1, 2)  # (L, B, Q, ...)
        boxes_cxcywh = (inverse_sigmoid(references) + model.transformer.decoder.bbox_embed(hs)).sigmoid()
        return {
            "logits": captured["scores"].squeeze(-1), "boxes": box_cxcywh_to_xyxy(boxes_cxcywh),
            "presence": presence.transpose(1, 2).reshape(presence.shape[0], -1),
            "masks": out["pred_masks"], "semantic": out["semantic_seg"],
            "last_logits": out["pred_logits"].squeeze(-1),
        }

    results["text_only"] = infer(TEXT_PROMPT, [], [])
    results["text_box"] = infer(TEXT_PROMPT, [POSITIVE_BOX, NEGATIVE_BOX], [True, False])
    results["box_only"] = infer(BOX_ONLY_TEXT, [POSITIVE_BOX], [True])

    # ---------------------------------------------------------------- training (DAC) forward and loss
    model.train()
    _dropout_off(model, torch)
    boxes, num_boxes, masks = _training_targets(torch)
    padded = torch.zeros(3, 1, 4)
    padded[0, 0], padded[2, 0] = boxes[0], boxes[1]
    target = BatchedFindTarget(
        num_boxes=num_boxes, boxes=boxes, boxes_padded=padded, repeated_boxes=None, segments=masks,
        semantic_segments=None, is_valid_segment=torch.ones(2, dtype=torch.bool),
        is_exhaustive=torch.ones(3, dtype=torch.bool), object_ids=torch.tensor([0, 1]),
        object_ids_padded=torch.tensor([[0], [-1], [1]]),
    )
    backbone_out = {"img_batch_all_stages": pixels, **model.backbone.forward_image(pixels),
                    **model.backbone.forward_text(TRAIN_PROMPTS, device="cpu")}
    torch.set_grad_enabled(True)  # for the gradients after the backbones (their features above have no graph)
    out = model.forward_grounding(backbone_out=backbone_out, find_input=find_stage(3, [0, 1, 2]), find_target=target,
                                  geometric_prompt=model._get_dummy_prompt(num_prompts=3))
    layers = out["aux_outputs"] + [out]
    stack = lambda key: torch.stack([layer[key] for layer in layers])  # noqa: E731
    results["train"] = {
        "logits": stack("pred_logits").squeeze(-1), "boxes": stack("pred_boxes_xyxy"),
        "presence": stack("presence_logit_dec").reshape(len(layers), -1), "masks": out["pred_masks"],
        "semantic": out["semantic_seg"], "o2m_logits": stack("pred_logits_o2m").squeeze(-1),
        "o2m_boxes": stack("pred_boxes_xyxy_o2m"), "o2m_masks": out["pred_masks_o2m"],
    }
    wrapper = _official_losses(model, torch)
    targets = model.back_convert(target)
    losses = wrapper.compute_loss(out, targets)
    semantic = wrapper.loss_fn_semantic_seg(out, targets)
    total = (losses.pop(CORE_LOSS_KEY) + semantic.pop(CORE_LOSS_KEY)) * math.sqrt(len(TRAIN_PROMPTS))
    terms = {k: float(v.detach()) for k, v in {**losses, **semantic}.items()
             if torch.is_tensor(v) and v.numel() == 1}
    results["train_losses"] = {**terms, "loss": float(total)}
    results["train_targets"] = (boxes, num_boxes, masks)
    results["train"] = {key: value.detach() for key, value in results["train"].items()}
    total.backward()  # the backbones' features were made without a graph: gradients of everything after them
    torch.save({name: p.grad for name, p in model.named_parameters() if p.grad is not None},
               workdir / "official_gradients.pt")
    torch.save(results, workdir / "official.pt")


# ================================================================================== our side
def _max_diff(ours, official) -> float:
    ours, official = ours.detach().float(), official.detach().float().reshape(ours.shape)
    return float((ours - official).abs().max())


def _ours_eval(net, pixels, torch) -> dict:
    with torch.no_grad():
        text_only = net(pixels, [TEXT_PROMPT], pixels_normalized=True)
        boxes = torch.tensor([[POSITIVE_BOX, NEGATIVE_BOX], [POSITIVE_BOX, [0.0, 0.0, 0.0, 0.0]]])
        labels = torch.tensor([[1, 0], [1, -10]])
        with_boxes = net(pixels, [TEXT_PROMPT, BOX_ONLY_TEXT], image_ids=[0, 0], boxes=boxes, box_labels=labels,
                         pixels_normalized=True)
    result = {}
    for name, out, row in (("text_only", text_only, 0), ("text_box", with_boxes, 0), ("box_only", with_boxes, 1)):
        result[name] = {
            "logits": out.all_pred_logits[:, row], "boxes": out.all_pred_boxes[:, row],
            "presence": out.all_presence_logits[:, row], "masks": out.pred_masks[row],
            "semantic": out.semantic_seg[row],
        }
    return result


def _plain_sam3model_eval(model, tokenizer, pixels, torch) -> dict:
    """transformers' own Sam3Model.forward (last layer), fed our tokens; boxes as its input_boxes."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    from medsam3_monai.networks.tokenizer import tokenize_prompts

    result = {}
    with torch.no_grad():
        vision = model.vision_encoder(pixels)
        ids, mask = tokenize_prompts(tokenizer, [TEXT_PROMPT])
        out = model(vision_embeds=vision, input_ids=ids, attention_mask=mask)
        result["text_only"] = out
        doubled = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(f.expand(2, -1, -1, -1) for f in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(2, -1, -1, -1) for p in vision.fpn_position_encoding),
        )
        ids, mask = tokenize_prompts(tokenizer, [TEXT_PROMPT, BOX_ONLY_TEXT])
        boxes = torch.tensor([[POSITIVE_BOX, NEGATIVE_BOX], [POSITIVE_BOX, [0.0, 0.0, 0.0, 0.0]]])
        out = model(vision_embeds=doubled, input_ids=ids, attention_mask=mask, input_boxes=boxes,
                    input_boxes_labels=torch.tensor([[1, 0], [1, -10]]))
        result["text_box"], result["box_only"] = out, out
    rows = {"text_only": 0, "text_box": 0, "box_only": 1}
    return {name: {"logits": out.pred_logits[rows[name]], "boxes": out.pred_boxes[rows[name]],
                   "presence": out.presence_logits[rows[name]], "masks": out.pred_masks[rows[name]],
                   "semantic": out.semantic_seg[rows[name]]} for name, out in result.items()}


def _compare_eval(ours: dict, official: dict, last_layer_only: bool = False) -> dict:
    table = {}
    for case, outputs in ours.items():
        reference = official[case]
        for key, value in outputs.items():
            expected = reference[key]
            if last_layer_only:
                expected = expected[-1]
            elif key in ("logits", "boxes", "presence"):
                assert value.shape[0] == expected.shape[0], (case, key, value.shape, expected.shape)
            table[f"{case}/{key}"] = _max_diff(value, expected)
    return table


def _ours_train(net, pixels, official: dict, torch) -> tuple[dict, dict, dict]:
    """The training forward, the loss terms and (after ``backward``) the gradients of every parameter after the
    backbones: ``(forward diffs, loss diffs, our gradients by transformers name)``."""
    from medsam3_monai.losses import CriterionSettings, FindTargets, SetCriterion

    boxes, num_boxes, masks = official["train_targets"]
    sam3 = net.sam3
    backbones = [sam3.vision_encoder, sam3.text_encoder, sam3.text_projection]  # sam3's backbone: ViT + neck, text
    for module in backbones:
        module.requires_grad_(False)
    net.train()
    with torch.enable_grad():
        out = net(pixels, TRAIN_PROMPTS, image_ids=[0, 0, 0], pixels_normalized=True)
        terms = SetCriterion(settings=CriterionSettings(normalization="local"))(out, FindTargets(boxes, num_boxes, masks))
        terms["loss"].backward()
    net.eval()
    gradients = {name: p.grad for name, p in sam3.named_parameters() if p.grad is not None}
    for module in backbones:
        module.requires_grad_(True)
    reference = official["train"]
    o2m = out.one_to_many
    outputs = {
        "logits": out.all_pred_logits, "boxes": out.all_pred_boxes, "presence": out.all_presence_logits,
        "masks": out.pred_masks, "semantic": out.semantic_seg, "o2m_logits": o2m.all_pred_logits,
        "o2m_boxes": o2m.all_pred_boxes, "o2m_masks": o2m.pred_masks,
    }
    forward = {f"train/{k}": _max_diff(v, reference[k]) for k, v in outputs.items()}
    theirs = official["train_losses"]
    losses, missing, matched = {}, [], set()
    for name, value in terms.items():
        if name == "num_instances":
            continue
        official_name = name
        for layer in range(net.num_decoder_layers):
            official_name = official_name.replace(f"_aux{layer}", f"_aux_{layer}")
        if official_name not in theirs:
            missing.append(name)
            continue
        ours = float(value) * (O2M_WEIGHT if name.endswith("_o2m") else 1.0)  # SAM3 reports o2m terms weighted
        losses[name] = abs(ours - theirs[official_name]) / max(abs(theirs[official_name]), 1.0)
        matched.add(official_name)
    losses["(terms without an official counterpart)"] = float(len(missing))
    # an official loss term we lack (its metrics, ce_f1, presence_acc, ..., are not losses) changes the total ('loss',
    # gated like every term) and is named here, and fails the check
    losses["(official loss terms without one of ours)"] = sorted(n for n in set(theirs) - matched
                                                                 if n.startswith("loss"))
    losses["(total: ours, official)"] = (float(terms["loss"]), theirs["loss"])
    return forward, losses, gradients


def compare_gradients(ours: dict, official: dict) -> dict:
    """Our gradients (transformers names) against sam3's (its own names, converted as ``sam3.pt`` is converted:
    fused q/k/v split, transposes): per tensor ``[||official||, ||ours - official||]`` (float64), the worst relative
    difference among the tensors that are not numerically zero (``NEGLIGIBLE_GRADIENT``), the worst difference of
    those that are, relative to the whole gradient's norm, and the tensors with a non-zero gradient on one side
    only."""
    import torch

    from medsam3_monai.networks.key_mapping import convert_original_to_hf

    theirs = convert_original_to_hf(official)
    tensors = {}
    for name in sorted(set(ours) & set(theirs)):
        mine = ours[name].detach().double()
        reference = theirs[name].detach().double().reshape(mine.shape)
        tensors[name] = [float(torch.linalg.vector_norm(reference)), float(torch.linalg.vector_norm(mine - reference))]
    one_side = sorted(n for n in set(ours) ^ set(theirs) if bool((ours.get(n, theirs.get(n)) != 0).any()))
    return {"compared": len(tensors), "only_one_side": one_side, "tensors": tensors, **gradient_summary(tensors)}


def gradient_summary(tensors: dict) -> dict:
    """The gated numbers of :func:`compare_gradients`'s per-tensor norms (recomputed by the report)."""
    import math

    whole = math.sqrt(sum(norm ** 2 for norm, _ in tensors.values()))
    floor = NEGLIGIBLE_GRADIENT * whole
    relative = {n: diff / norm for n, (norm, diff) in tensors.items() if norm > floor}
    negligible = {n: diff / max(whole, 1e-30) for n, (norm, diff) in tensors.items() if norm <= floor}
    worst = max(relative, key=relative.get, default=None)
    worst_negligible = max(negligible, key=negligible.get, default=None)
    return {"max_rel_diff": relative[worst] if worst else 0.0, "worst": worst, "whole_norm": whole,
            "numerically_zero": len(negligible),
            "max_diff_of_zero_ones": negligible[worst_negligible] if worst_negligible else 0.0,
            "worst_zero_one": worst_negligible}


def ours_stage(seed: int, workdir: Path) -> dict:
    import gc
    import warnings

    import torch
    from transformers import Sam3Model

    from medsam3_monai.deploy.cli import main as cli_main
    from medsam3_monai.networks import MedSAM3Net

    torch.set_grad_enabled(False)
    official = torch.load(workdir / "official.pt", weights_only=False)
    pixels = official["pixels"]
    no_dropout = {"dropout": 0.0, "drop_path": 0.0}
    columns: dict[str, dict] = {}
    timings = {}

    start = time.perf_counter()
    config = None
    if TINY:
        from official_tiny import tiny_official_config  # this folder

        config = tiny_official_config(IMAGE_SIZE)
    net = MedSAM3Net(workdir / "sam3.pt", config=config, image_size=IMAGE_SIZE, training_dropout=no_dropout).eval()
    columns["sam3.pt"] = _compare_eval(_ours_eval(net, pixels, torch), official)
    train_forward, train_losses, gradients = _ours_train(net, pixels, official, torch)
    columns["sam3.pt"].update(train_forward)
    official_gradients = torch.load(workdir / "official_gradients.pt", weights_only=True)
    gradient_diffs = compare_gradients(gradients,
                                       {k.removeprefix("detector."): v for k, v in official_gradients.items()})
    del gradients, official_gradients
    timings["sam3.pt"] = time.perf_counter() - start
    folder = workdir / "converted"
    shutil.rmtree(folder, ignore_errors=True)
    if TINY:  # convert-checkpoint builds SAM3's architecture: the folder is written from the loaded network
        MedSAM3Net(workdir / "sam3.pt", config=config, image_size=IMAGE_SIZE).save_pretrained(folder)
    del net
    gc.collect()

    second = "saved folder" if TINY else "convert-checkpoint folder"
    if not TINY and cli_main(["convert-checkpoint", str(workdir / "sam3.pt"), str(folder), "--image-size",
                              str(IMAGE_SIZE)]) != 0:
        raise SystemExit("medsam3 convert-checkpoint failed")
    start = time.perf_counter()
    net = MedSAM3Net(folder, training_dropout=no_dropout).eval()
    columns[second] = _compare_eval(_ours_eval(net, pixels, torch), official)
    tokenizer = net.tokenizer
    timings[second] = time.perf_counter() - start
    del net
    gc.collect()

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = Sam3Model.from_pretrained(folder, local_files_only=True).eval()
    columns["Sam3Model.forward (last layer)"] = _compare_eval(
        _plain_sam3model_eval(plain, tokenizer, pixels, torch), official, last_layer_only=True
    )
    timings["Sam3Model.forward (last layer)"] = time.perf_counter() - start
    del plain
    gc.collect()
    import transformers

    versions = {**official["versions"], "torch": torch.__version__, "transformers": transformers.__version__}
    return {"seed": seed, "perturbed_parameters": official["perturbed_parameters"], "columns": columns,
            "losses": train_losses, "gradients": gradient_diffs, "seconds": timings, "versions": versions}


# ================================================================================== report
def tolerance_of(row: str) -> float:
    """The max abs difference allowed for an output row (``case/output``, ``train/o2m_masks``)."""
    kind = row.rsplit("/", 1)[-1].removeprefix("o2m_")
    return TOLERANCES.get(kind, TOLERANCE)


def markdown(results: list[dict]) -> str:
    """Per seed: max abs diff of every output (case/output rows, one column per loading path) and the loss terms."""
    lines = []
    for result in results:
        columns = result["columns"]
        names = list(columns)
        rows = sorted({row for column in columns.values() for row in column}, key=lambda r: (r.startswith("train"), r))
        lines += [f"### seed {result['seed']} ({result['perturbed_parameters']} constant parameters perturbed)", "",
                  "| output | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for row in rows:
            cells = [f"{columns[n][row]:.2e}" if row in columns[n] else "" for n in names]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", "| loss term (training forward) | relative diff to Sam3LossWrapper |", "|---|---:|"]
        lines += [f"| {k} | {v:.2e} |" if isinstance(v, float) else
                  f"| {k} | {', '.join(v) or 'none'} |" if all(isinstance(x, str) for x in v) else
                  f"| {k} | {v[0]:.4f}, {v[1]:.4f} |"
                  for k, v in result["losses"].items()]
        if "gradients" in result:
            g = result["gradients"]
            lines += ["", "| gradients of the total loss (parameters after the backbones) | |", "|---|---:|",
                      f"| tensors compared (norm of the whole official gradient {g['whole_norm']:.3e}) | "
                      f"{g['compared']} |",
                      f"| max ‖ours − official‖ / ‖official‖ per tensor | {g['max_rel_diff']:.2e} ({g['worst']}) |",
                      f"| numerically zero tensors (official norm ≤ {NEGLIGIBLE_GRADIENT:g} × whole): count, max "
                      f"‖ours − official‖ / whole | {g['numerically_zero']}, {g['max_diff_of_zero_ones']:.2e}"
                      + (f" ({g['worst_zero_one']})" if g.get("worst_zero_one") else "") + " |",
                      f"| non-zero gradients on one side only | {', '.join(g['only_one_side']) or 'none'} |"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global IMAGE_SIZE, TINY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-python", help="python of a virtualenv with sam3==0.1.4 (see the docstring)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="random weights of each seed are compared (default 0 1)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the ViT's input size on both sides (default 1008, 112 with --tiny; 504: the Medical-SAM3 "
                             "3D checkpoint's)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny architecture on both sides (scripts/official_tiny.py; seconds, what CI runs) "
                             "instead of SAM3's")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                        help="the shared samples (a Kvasir-SEG picture is the input; random pixels without them)")
    parser.add_argument("--out", type=Path, default=Path("official_check"), help="writes OUT.md and OUT.json")
    parser.add_argument("--keep", action="store_true", help="keep sam3.pt and the converted folder")
    parser.add_argument("--stage", choices=["official"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shared = args.shared if args.shared.is_dir() else None
    TINY = args.tiny
    IMAGE_SIZE = args.image_size or (TINY_IMAGE_SIZE if TINY else IMAGE_SIZE)

    if args.stage == "official":
        official_stage(args.seed, args.workdir, shared)
        return 0
    from medsam3_monai.networks.presets import check_image_size

    try:  # ours would refuse it only after the official stage's minutes
        check_image_size(IMAGE_SIZE)
    except ValueError:
        parser.error(f"--image-size {IMAGE_SIZE}: give a positive multiple of 14 (the ViT's patch), e.g. 1008 "
                     "or 504")
    out_folder = args.out.expanduser().resolve().parent
    if not out_folder.is_dir() or not os.access(out_folder, os.W_OK):
        parser.error(f"--out {args.out}: {out_folder} is not a folder this user can write to; the report is written "
                     "there after the comparison")
    if not args.official_python or not Path(args.official_python).is_file():
        parser.error("--official-python must point to the python of a virtualenv with sam3==0.1.4: build one with "
                     "`make official` (scripts/setup_official_env.sh) and pass "
                     "~/.cache/medsam3-monai/sam3-official-venv/bin/python")
    found = subprocess.run([args.official_python, "-c", "import importlib.metadata as m; print(m.version('sam3'))"],
                           capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() != "0.1.4":
        parser.error(f"--official-python {args.official_python}: its environment has "
                     f"{'sam3 ' + found.stdout.strip() if found.returncode == 0 else 'no sam3'}, not sam3==0.1.4; "
                     "build it with `make official`")
    if shared is None:
        print(f"note: {args.shared} is not there: both sides see random pixels instead of a shared Kvasir-SEG "
              "image (the numbers will differ from official_check.md's)", file=sys.stderr)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="medsam3-official-"))
    try:
        results = _check_seeds(args, root)
    finally:  # a temporary scratch folder goes, also when a stage fails (each seed's sam3.pt is gigabytes)
        if args.workdir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = write_report(results, args.seeds, shared is not None, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    return 0 if summary["within_tolerance"] else 1


def _check_seeds(args: argparse.Namespace, root: Path) -> list[dict]:
    """Both stages for each of ``args.seeds`` in ``root/seedN``: the results (each seed's folder removed unless
    ``--keep``)."""
    results = []
    for seed in args.seeds:
        workdir = root / f"seed{seed}"
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"[seed {seed}] official sam3: build, save sam3.pt, forward", flush=True)
        start = time.perf_counter()
        subprocess.run([args.official_python, __file__, "--stage", "official", "--seed", str(seed),
                        "--workdir", str(workdir), "--shared", str(args.shared), "--image-size", str(IMAGE_SIZE),
                        *(["--tiny"] if TINY else [])], check=True)
        official_seconds = time.perf_counter() - start
        print(f"[seed {seed}] ours: sam3.pt, {'saved' if TINY else 'convert-checkpoint'} folder, plain Sam3Model",
              flush=True)
        result = ours_stage(seed, workdir)
        result["seconds"]["official"] = official_seconds
        results.append(result)
        print(markdown([result]), flush=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def write_report(results: list[dict], seeds: list[int], shared_image: bool, out: Path) -> dict:
    """The verdict over every seed, written as ``out``.json and ``out``.md; returns the summary."""
    ours = [(row, v) for r in results for name, column in r["columns"].items() if not name.startswith("Sam3Model")
            for row, v in column.items()]
    worst = max(v for _, v in ours)
    over = sorted({row for row, v in ours if v > tolerance_of(row)})
    worst_loss = max(v for r in results for k, v in r["losses"].items() if not k.startswith("("))
    missing = sum(r["losses"]["(terms without an official counterpart)"] for r in results)
    missing += sum(len(r["losses"].get("(official loss terms without one of ours)", [])) for r in results)
    for r in results:  # the gate's numbers from the stored norms, at this script's thresholds
        r["gradients"].update(gradient_summary(r["gradients"]["tensors"]))
    worst_gradient = max(r["gradients"]["max_rel_diff"] for r in results)
    worst_zero = max(r["gradients"]["max_diff_of_zero_ones"] for r in results)
    one_side = sorted({name for r in results for name in r["gradients"]["only_one_side"]})
    gradients_ok = (worst_gradient <= GRADIENT_TOLERANCE and worst_zero <= ZERO_GRADIENT_TOLERANCE and not one_side
                    and all(r["gradients"]["compared"] for r in results))
    summary = {"tolerances": {**TOLERANCES, "other outputs": TOLERANCE, "loss terms (relative)": LOSS_TOLERANCE,
                              "gradients (relative, per tensor)": GRADIENT_TOLERANCE,
                              "numerically zero gradients (relative to the whole)": ZERO_GRADIENT_TOLERANCE},
               "max_abs_diff_ours": worst, "max_rel_diff_losses": worst_loss, "max_rel_diff_gradients": worst_gradient,
               "max_diff_zero_gradients": worst_zero,
               "outputs_over_tolerance": over,
               "within_tolerance": not over and worst_loss <= LOSS_TOLERANCE and missing == 0 and gradients_ok,
               "shared_image": shared_image, "image_size": IMAGE_SIZE, "tiny": TINY, "results": results}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    failures = over + (["loss terms"] if worst_loss > LOSS_TOLERANCE else []) + (
        [f"{int(missing)} loss term(s) on one side only"] if missing else []) + (
        [] if gradients_ok else [f"gradients ({worst_gradient:.2e}, numerically zero ones {worst_zero:.2e}; one side "
                                 f"only: {', '.join(one_side) or 'none'})"])
    header = [
        f"# Our network vs Meta's official SAM3 (random {'tiny' if TINY else 'full-size'} weights, {IMAGE_SIZE} px, "
        "fp32, CPU)", "",
        f"Written by `python scripts/check_official.py --official-python PYTHON --seeds "
        f"{' '.join(map(str, seeds))}{' --tiny' if TINY else ''}"
        f"{'' if IMAGE_SIZE == (TINY_IMAGE_SIZE if TINY else 1008) else f' --image-size {IMAGE_SIZE}'}` "
        f"({'a shared Kvasir-SEG image' if shared_image else 'random pixels'}); "
        "versions: " + ", ".join(f"{k} {v}" for k, v in results[0]["versions"].items()) + ".",
        f"Max abs diff over our two loading paths: {worst:.2e}; max relative diff of the loss terms (total included): "
        f"{worst_loss:.2e}; of the gradients of the total loss after the backbones, ‖ours − official‖ / ‖official‖ "
        f"per tensor: {worst_gradient:.2e} (the numerically zero ones, official norm ≤ {NEGLIGIBLE_GRADIENT:g} of the "
        f"whole gradient's: {worst_zero:.2e} of the whole). Tolerances: masks and semantic "
        f"{TOLERANCES['masks']:g}, logits, boxes and presence {TOLERANCE:g}, loss terms {LOSS_TOLERANCE:g} (relative), "
        f"gradients {GRADIENT_TOLERANCE:g} per tensor and {ZERO_GRADIENT_TOLERANCE:g} for the numerically zero ones: "
        f"{'all within' if summary['within_tolerance'] else 'EXCEEDED: ' + ', '.join(failures)}. The "
        "`Sam3Model.forward` column is transformers' own forward (last decoder layer), not gated: its text-only "
        "rows show the missing geometry token that our forward adds.", "", "",
    ]
    out.with_suffix(".md").write_text("\n".join(header) + markdown(results))
    return summary


if __name__ == "__main__":
    sys.exit(main())
