"""Meta's official SAM3 tracker (sam3 0.1.4) on random weights: the reference run of ``tests/test_official_tracker.py``.

Run it with the Python of the official environment (``make official``; never a dependency of the project). It
builds the tracker exactly as sam3's ``model_builder.build_tracker(apply_temporal_disambiguation=False)`` does (the
interactive tracker: no memory selection), at a smaller slice size when asked, perturbs the parameters that are
constant at init (so that LayerNorms, layer scales and zero biases take part), raises the object-score bias so that
the objects are present on most slices (``--object-score-bias 0``: random weights' scores near 0, of either sign,
so that some slices have the object and some do not). Each slice's features are what sam3's video model gives its
tracker: a random ViT trunk output (``--trunk-width`` channels; SAM3's ViT has 1024) through the tracker's own neck
(sam3's ``Sam3DualViTDetNeck`` with ``add_sam2_neck``: its ``sam2_convs``), the coarsest (0.5x) level dropped, levels
0 and 1 projected by the mask decoder's ``conv_s0`` / ``conv_s1``.
Then each object, in its own inference state, gets its seed mask on its seed slice (``add_new_mask``) and is
propagated to the last slice and back to slice 0 (``propagate_in_video``), as ``medsam3_monai.inferers.tracking``
propagates a prompt. Writes one ``torch.save`` file: the tracker's state dict (the ``tracker.*`` keys of a
``sam3.pt``, prefix stripped) and its neck's (``backbone.vision_backbone.sam2_convs.*``, as a ``sam3.pt`` keeps it
among the ``detector.*`` keys), the trunk outputs and the features made of them, and per object and slice the
low-resolution mask logits and the object score logit of each pass.

    /path/to/official/bin/python scripts/official_tracker.py OUT.pt [--image-size 112] [--slices 8] [--trunk-width 32]
                                                                [--object-score-bias 15]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

#: (seed slice, centre x, centre y, half-width, half-height) of each object's elliptic seed mask, in slice fractions
OBJECTS = ((3, 0.45, 0.50, 0.20, 0.15), (3, 0.62, 0.40, 0.12, 0.22), (5, 0.40, 0.58, 0.25, 0.12))
#: added to the object-score head's bias: with random weights every slice would otherwise be "no object"
OBJECT_SCORE_BIAS = 15.0


@contextlib.contextmanager
def official_code_on_cpu():
    """sam3 0.1.4 hard-codes CUDA in a few places (``device="cuda"`` in cache constructors, ``.cuda()`` and
    ``pin_memory`` in the tracker's state and box encoding): keep them on the CPU. ``check_official.py`` uses it
    too."""
    names = ("zeros", "arange")
    originals = {name: getattr(torch, name) for name in names}
    cuda, pin_memory = torch.Tensor.cuda, torch.Tensor.pin_memory

    def on_cpu(function):
        def wrapped(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return function(*args, **kwargs)

        return wrapped

    try:
        for name in names:
            setattr(torch, name, on_cpu(originals[name]))
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        torch.Tensor.pin_memory = lambda tensor, *args, **kwargs: tensor
        yield
    finally:
        for name in names:
            setattr(torch, name, originals[name])
        torch.Tensor.cuda, torch.Tensor.pin_memory = cuda, pin_memory


def build_official_tracker(image_size: int):
    """``build_tracker(apply_temporal_disambiguation=False)`` with its slice size (1008) replaced by ``image_size``,
    and the mask downsampler's fixed 1152 px input by the matching ``input_mask_size``."""
    from sam3 import model_builder

    predictor = model_builder.Sam3TrackerPredictor

    class AtSize(predictor):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "image_size": image_size})

    model_builder.Sam3TrackerPredictor = AtSize
    try:
        tracker = model_builder.build_tracker(apply_temporal_disambiguation=False)
    finally:
        model_builder.Sam3TrackerPredictor = predictor
    tracker.maskmem_backbone.mask_downsampler.interpol_size = [tracker.input_mask_size] * 2
    return tracker.eval()


class _TrunkOutput(torch.nn.Module):
    """Stands for the ViT in sam3's neck: its output is set by hand (``channel_list`` is what the neck reads)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.channel_list = [width]
        self.output = None

    def forward(self, _images):
        return [self.output]


def build_official_neck(width: int, image_size: int):
    """sam3's ``_create_vit_neck`` with the tracker's neck (``enable_inst_interactivity``) on a stand-in trunk."""
    from sam3 import model_builder

    neck = model_builder._create_vit_neck(model_builder._create_position_encoding(precompute_resolution=image_size),
                                          _TrunkOutput(width), enable_inst_interactivity=True)
    return neck.eval()


def tracker_features(neck, tracker, trunk_output: torch.Tensor) -> tuple[list, list]:
    """A (1, W, h, h) trunk output -> the tracker's FPN levels and position encodings (sam3's video model: the
    ``sam2_convs`` levels but the last, ``conv_s0`` / ``conv_s1`` on levels 0 and 1)."""
    neck.trunk.output = trunk_output
    _, _, levels, positions = neck([None])
    levels, positions = list(levels[:-1]), list(positions[:-1])
    levels[0] = tracker.sam_mask_decoder.conv_s0(levels[0])
    levels[1] = tracker.sam_mask_decoder.conv_s1(levels[1])
    return levels, positions


def perturb_constants(module: torch.nn.Module, generator: torch.Generator) -> int:
    """Perturb every parameter that is constant at init (LayerNorms, layer scales, zero biases). Returns how many."""
    perturbed = 0
    with torch.no_grad():
        for parameter in module.parameters():
            flat = parameter.flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1 * max(abs(float(flat[0])), 0.1))
                perturbed += 1
    return perturbed


def seed_mask(size: int, cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    """(S, S) bool ellipse."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    u, v = (xx + 0.5) / size, (yy + 0.5) / size
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trunk-width", type=int, default=32, help="channels of the ViT output (SAM3: 1024)")
    parser.add_argument("--object-score-bias", type=float, default=OBJECT_SCORE_BIAS,
                        help=f"added to the object-score head's bias ({OBJECT_SCORE_BIAS:g})")
    args = parser.parse_args(argv)
    seeds = sorted({seed for seed, *_ in OBJECTS})
    if args.slices <= seeds[-1]:
        parser.error(f"--slices must be at least {seeds[-1] + 1}: the objects are seeded on slices "
                     f"{', '.join(map(str, seeds))}")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed)
    with official_code_on_cpu(), torch.inference_mode():
        torch.manual_seed(args.seed)
        tracker = build_official_tracker(args.image_size)
        neck = build_official_neck(args.trunk_width, args.image_size)
        perturbed = perturb_constants(tracker, generator) + perturb_constants(neck, generator)
        with torch.no_grad():
            tracker.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(args.object_score_bias)
        side = args.image_size // tracker.backbone_stride
        trunk = [torch.randn(1, args.trunk_width, side, side, generator=generator) for _ in range(args.slices)]
        features = []
        for output in trunk:
            levels, positions = tracker_features(neck, tracker, output)
            features.append(levels)
        cache = {z: (torch.zeros(3, args.image_size, args.image_size),
                     {"tracker_backbone_out": {"backbone_fpn": list(features[z]), "vision_pos_enc": list(positions)}})
                 for z in range(args.slices)}
        objects = []
        for seed_slice, *ellipse in OBJECTS:
            mask = seed_mask(args.image_size, *ellipse)
            state = tracker.init_state(video_height=args.image_size, video_width=args.image_size,
                                       num_frames=args.slices, cached_features=cache, offload_state_to_cpu=True)
            tracker.add_new_mask(state, frame_idx=seed_slice, obj_id=1, mask=mask)
            tracker.propagate_in_video_preflight(state, run_mem_encoder=True)
            passes = {}
            for reverse in (False, True):
                steps = tracker.propagate_in_video(state, start_frame_idx=seed_slice, reverse=reverse,
                                                   max_frame_num_to_track=args.slices, tqdm_disable=True)
                passes["backward" if reverse else "forward"] = {
                    z: {"logits": low[0, 0].clone(), "score": float(score.reshape(-1)[0])}
                    for z, _, low, _, score in steps}
            objects.append({"seed": seed_slice, "mask": mask, **passes})
    neck_state = {f"backbone.vision_backbone.{k}": v.clone() for k, v in neck.state_dict().items()
                  if k.startswith("sam2_convs.")}
    torch.save({"image_size": args.image_size, "slices": args.slices, "perturbed": perturbed,
                "state_dict": {k: v.clone() for k, v in tracker.state_dict().items()}, "neck_state_dict": neck_state,
                "trunk": trunk, "features": features, "positions": positions, "objects": objects,
                "settings": {"use_memory_selection": tracker.use_memory_selection, "num_maskmem": tracker.num_maskmem,
                             "input_mask_size": tracker.input_mask_size}}, args.out)


if __name__ == "__main__":
    main()
