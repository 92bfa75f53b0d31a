"""Convert Meta's original SAM3 image-model (detector) state dict to the transformers ``Sam3Model`` layout.

The mapping is an ordered list of rules. A rule pairs a key template of the original layout with the
template(s) of the transformers (HF) keys it becomes and a transform that knows how to change both a
shape and a tensor (rename, split a fused q/k/v projection, transpose, drop the class-token position).
Templates use slots ``{i}``/``{j}`` (a layer index, ``{i+1}`` for an offset) and ``{p}`` (``weight``
or ``bias``), so the same rules serve the full model and tiny test configurations. The first rule
whose original template matches a key wins.

Original tensors with no HF counterpart (intentionally dropped, see ``DroppedRule.reason``):

* ``...trunk.pos_embed`` position 0 -- the pretraining class token, unused by SAM3 (HF keeps 576 of 577).
* ``...trunk.blocks.{i}.attn.freqs_cis`` -- complex RoPE tables; HF recomputes identical ones.
* ``geometry_encoder.points_*`` -- point-prompt projections; the HF detector takes box prompts only.

The inverse (:func:`convert_hf_to_original`) fills the class-token position with zeros, the point
projections with zeros, and computes ``freqs_cis`` exactly as the original model does when given the
config (without a config those buffers are omitted: their size depends on the attention layout).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "DroppedRule",
    "KeyMappingError",
    "RULES",
    "Rule",
    "TRACKER_NECK_PREFIX",
    "VIT_TRUNK_PREFIX",
    "convert_hf_to_original",
    "convert_original_to_hf",
    "dropped_original_keys",
    "map_hf_shapes",
    "map_original_shapes",
    "split_sam3_checkpoint",
]


class KeyMappingError(ValueError):
    """Keys that no rule covers (or that cannot be converted); ``keys`` lists all of them."""

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        self.message, self.keys = message, sorted(keys)
        super().__init__(self.naming())

    def naming(self, prefix: str = "") -> str:
        """The message with its keys, each as ``prefix`` + key (a file's own prefix of them, ``detector.``)."""
        return self.message + "".join(f"\n  {prefix}{k}" for k in self.keys)


# ------------------------------------------------------------------------------------------- templates
_SLOT = re.compile(r"\{([a-z])([+-]\d+)?\}")
_SLOT_REGEX = {"i": r"\d+", "j": r"\d+", "p": r"weight|bias"}


class _Template:
    """A key pattern with slots; matches keys to slot values and formats values back into keys."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.offsets: dict[str, int] = {}
        parts, pos = [], 0
        for m in _SLOT.finditer(text):
            name = m.group(1)
            parts += [re.escape(text[pos : m.start()]), f"(?P<{name}>{_SLOT_REGEX[name]})"]
            self.offsets[name] = int(m.group(2) or 0)
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(parts))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        return {n: str(int(v) - self.offsets[n]) if self.offsets[n] else v for n, v in m.groupdict().items()}

    def format(self, values: Mapping[str, str]) -> str:
        def fill(m: re.Match) -> str:
            value = values[m.group(1)]
            return str(int(value) + int(m.group(2))) if m.group(2) else value

        return _SLOT.sub(fill, self.text)

    def __repr__(self) -> str:
        return self.text


# -------------------------------------------------------------------------------------------- transforms
Shape = list[int]


class _Rename:
    """Same tensor, new name."""

    def shape_to_hf(self, shape: Shape) -> list[Shape]:
        return [list(shape)]

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return [t]

    def shape_to_original(self, shapes: list[Shape]) -> Shape:
        return list(shapes[0])

    def to_original(self, ts: list[Tensor]) -> Tensor:
        return ts[0]


class _SplitQKV(_Rename):
    """Fused ``[3D, ...]`` in-projection <-> separate q, k, v ``[D, ...]`` (rows stacked q, k, v)."""

    def shape_to_hf(self, shape: Shape) -> list[Shape]:
        if shape[0] % 3:
            raise KeyMappingError(f"fused qkv first dim {shape[0]} is not divisible by 3")
        return [[shape[0] // 3, *shape[1:]]] * 3

    def to_hf(self, t: Tensor) -> list[Tensor]:
        self.shape_to_hf(list(t.shape))
        return [part.clone() for part in t.chunk(3, dim=0)]  # clone: no shared storage (safetensors)

    def shape_to_original(self, shapes: list[Shape]) -> Shape:
        return [sum(s[0] for s in shapes), *shapes[0][1:]]

    def to_original(self, ts: list[Tensor]) -> Tensor:
        return torch.cat(ts, dim=0)


class _Transpose(_Rename):
    """Original ``x @ P`` parameter ``[in, out]`` <-> ``nn.Linear`` weight ``[out, in]``."""

    def shape_to_hf(self, shape: Shape) -> list[Shape]:
        return [list(reversed(shape))]

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return [t.t().contiguous()]

    def shape_to_original(self, shapes: list[Shape]) -> Shape:
        return list(reversed(shapes[0]))

    def to_original(self, ts: list[Tensor]) -> Tensor:
        return ts[0].t().contiguous()


class _DropClassToken(_Rename):
    """``[1, 1 + G*G, D]`` with the class token first <-> ``[1, G*G, D]``; the inverse puts zeros there."""

    def shape_to_hf(self, shape: Shape) -> list[Shape]:
        grid = math.isqrt(max(shape[1] - 1, 0)) if len(shape) == 3 else -1
        if grid < 0 or grid * grid != shape[1] - 1:
            raise KeyMappingError(f"position embedding of shape {shape} is not [1, 1 + G*G, D]")
        return [[shape[0], shape[1] - 1, shape[2]]]

    def to_hf(self, t: Tensor) -> list[Tensor]:
        self.shape_to_hf(list(t.shape))
        return [t[:, 1:].clone()]

    def shape_to_original(self, shapes: list[Shape]) -> Shape:
        b, n, d = shapes[0]
        return [b, n + 1, d]

    def to_original(self, ts: list[Tensor]) -> Tensor:
        return torch.cat([torch.zeros_like(ts[0][:, :1]), ts[0]], dim=1)


RENAME, SPLIT_QKV, TRANSPOSE, DROP_CLS = _Rename(), _SplitQKV(), _Transpose(), _DropClassToken()


# ----------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """Original key template -> HF key template(s) via ``op``.

    ``hf_if``/``hf_unless`` (inverse only) disambiguate rules that share HF templates: the rule applies
    only if that HF key is (not) present.
    """

    original: _Template
    hf: tuple[_Template, ...]
    op: _Rename = RENAME
    hf_if: _Template | None = None
    hf_unless: _Template | None = None


Fill = Callable[[Shape, Mapping[str, str], Any], "Tensor | None"]


@dataclass(frozen=True)
class DroppedRule:
    """An original key with no HF counterpart. The inverse recreates it for every HF key matching
    ``anchor`` via ``fill(anchor_shape, slot_values, config)`` (``None``: cannot, key omitted)."""

    original: _Template
    anchor: _Template
    fill: Fill
    reason: str


def _rule(original: str, *hf: str, op: _Rename = RENAME, hf_if: str = "", hf_unless: str = "") -> Rule:
    return Rule(
        _Template(original),
        tuple(_Template(h) for h in hf),
        op,
        _Template(hf_if) if hf_if else None,
        _Template(hf_unless) if hf_unless else None,
    )


def _same(prefix: str, hf_prefix: str, *names: str) -> list[Rule]:
    """``prefix + name + .{p}`` -> ``hf_prefix + name + .{p}`` for each name (``name=new`` renames)."""
    rules = []
    for name in names:
        old, _, new = name.partition("=")
        rules.append(_rule(f"{prefix}{old}.{{p}}", f"{hf_prefix}{new or old}.{{p}}"))
    return rules


def _mha(original: str, hf: str, out: str = "o_proj") -> list[Rule]:
    """``nn.MultiheadAttention`` (fused in-projection) -> separate q/k/v projections + output."""
    return [
        _rule(f"{original}.in_proj_weight", *(f"{hf}.{x}_proj.weight" for x in "qkv"), op=SPLIT_QKV),
        _rule(f"{original}.in_proj_bias", *(f"{hf}.{x}_proj.bias" for x in "qkv"), op=SPLIT_QKV),
        _rule(f"{original}.out_proj.{{p}}", f"{hf}.{out}.{{p}}"),
    ]


def _pre_norm_layer(original: str, hf: str) -> list[Rule]:
    """Original pre-norm ``TransformerEncoderLayer`` (geometry encoder, DETR encoder)."""
    return [
        *_mha(f"{original}.self_attn", f"{hf}.self_attn"),
        *_mha(f"{original}.cross_attn_image", f"{hf}.cross_attn"),
        *_same(f"{original}.", f"{hf}.", "linear1=mlp.fc1", "linear2=mlp.fc2"),
        *_same(f"{original}.", f"{hf}.", "norm1=layer_norm1", "norm2=layer_norm2", "norm3=layer_norm3"),
    ]


def _mlp(original: str, hf: str) -> Rule:
    """Original ``MLP.layers.{i}`` -> HF ``Sam3DecoderMLP.layer{i+1}``."""
    return _rule(f"{original}.layers.{{i}}.{{p}}", f"{hf}.layer{{i+1}}.{{p}}")


def _config_part(config: Any, name: str) -> Any:
    return getattr(config, name, None) or config


def _rope_freqs_cis(shape: Shape, values: Mapping[str, str], config: Any) -> Tensor | None:
    """The original ViT's RoPE table for block ``i``: complex ``[grid*grid, head_dim/2]`` (axial x|y)."""
    if config is None:
        return None
    vit = _config_part(_config_part(config, "vision_config"), "backbone_config")
    layer = int(values["i"])
    window = vit.window_size if layer not in vit.global_attn_indexes else 0
    if window > 0:
        grid_h = grid_w = window
    else:
        size, patch = vit.image_size, vit.patch_size
        size = size if isinstance(size, (list, tuple)) else (size, size)
        patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        grid_h, grid_w = size[0] // patch[0], size[1] // patch[1]
    head_dim = getattr(vit, "head_dim", None) or vit.hidden_size // vit.num_attention_heads
    theta = float((vit.rope_parameters or {}).get("rope_theta", 10000.0))
    scale = vit.window_size / grid_w  # positions interpolated to the window (pretraining) grid
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    index = torch.arange(grid_h * grid_w, dtype=torch.float32)
    x, y = (index % grid_w) * scale, torch.div(index, grid_w, rounding_mode="floor") * scale
    angles = torch.cat([torch.outer(x, inv_freq), torch.outer(y, inv_freq)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def _zeros(*dims: int | str) -> Fill:
    """Zeros; ``"d"`` stands for the anchor's first dim (the model width)."""

    def fill(shape: Shape, values: Mapping[str, str], config: Any) -> Tensor:
        return torch.zeros([shape[0] if d == "d" else int(d) for d in dims])

    return fill


#: the ViT trunk's keys in an original checkpoint (SAM3's one trunk: the detector's and the tracker's)
VIT_TRUNK_PREFIX = "backbone.vision_backbone.trunk."
_VIT, _NECK, _TXT = VIT_TRUNK_PREFIX, "backbone.vision_backbone.convs.", "backbone.language_backbone."
_HVIT, _HNECK, _HTXT = "vision_encoder.backbone.", "vision_encoder.neck.fpn_layers.", "text_encoder.text_model."
_DEC, _HDEC = "transformer.decoder.", "detr_decoder."
_GEO = "geometry_encoder."

RULES: tuple[Rule | DroppedRule, ...] = (
    # ---- ViT trunk
    _rule(f"{_VIT}pos_embed", f"{_HVIT}embeddings.position_embeddings", op=DROP_CLS),
    _rule(f"{_VIT}patch_embed.proj.weight", f"{_HVIT}embeddings.patch_embeddings.projection.weight"),
    *_same(_VIT, _HVIT, "ln_pre=layer_norm"),
    *_same(f"{_VIT}blocks.{{i}}.", f"{_HVIT}layers.{{i}}.", "norm1=layer_norm1", "norm2=layer_norm2"),
    _rule(f"{_VIT}blocks.{{i}}.attn.qkv.{{p}}", *(f"{_HVIT}layers.{{i}}.attention.{x}_proj.{{p}}" for x in "qkv"),
          op=SPLIT_QKV),
    *_same(f"{_VIT}blocks.{{i}}.", f"{_HVIT}layers.{{i}}.", "attn.proj=attention.o_proj", "mlp.fc{j}"),
    DroppedRule(_Template(f"{_VIT}blocks.{{i}}.attn.freqs_cis"), _Template(f"{_HVIT}layers.{{i}}.layer_norm1.weight"),
                _rope_freqs_cis, "RoPE buffer; transformers recomputes it from the config"),
    # ---- FPN neck: 4x = deconv, GELU, deconv (HF indices 0, 2); 2x = deconv; 1x / 0.5x have none
    _rule(f"{_NECK}{{i}}.dconv_2x2_0.{{p}}", f"{_HNECK}{{i}}.scale_layers.0.{{p}}",
          hf_if=f"{_HNECK}{{i}}.scale_layers.2.weight"),
    _rule(f"{_NECK}{{i}}.dconv_2x2_1.{{p}}", f"{_HNECK}{{i}}.scale_layers.2.{{p}}"),
    _rule(f"{_NECK}{{i}}.dconv_2x2.{{p}}", f"{_HNECK}{{i}}.scale_layers.0.{{p}}",
          hf_unless=f"{_HNECK}{{i}}.scale_layers.2.weight"),
    *_same(f"{_NECK}{{i}}.", f"{_HNECK}{{i}}.", "conv_1x1=proj1", "conv_3x3=proj2"),
    # ---- CLIP-like text encoder and its 1024 -> 256 resizer
    _rule(f"{_TXT}encoder.token_embedding.weight", f"{_HTXT}embeddings.token_embedding.weight"),
    _rule(f"{_TXT}encoder.positional_embedding", f"{_HTXT}embeddings.position_embedding.weight"),
    *_mha(f"{_TXT}encoder.transformer.resblocks.{{i}}.attn", f"{_HTXT}encoder.layers.{{i}}.self_attn", "out_proj"),
    *_same(f"{_TXT}encoder.transformer.resblocks.{{i}}.", f"{_HTXT}encoder.layers.{{i}}.",
           "ln_1=layer_norm1", "ln_2=layer_norm2", "mlp.c_fc=mlp.fc1", "mlp.c_proj=mlp.fc2"),
    *_same(f"{_TXT}encoder.", _HTXT, "ln_final=final_layer_norm"),
    _rule(f"{_TXT}encoder.text_projection", "text_encoder.text_projection.weight", op=TRANSPOSE),
    *_same(_TXT, "", "resizer=text_projection"),
    # ---- geometry (prompt) encoder
    _rule(f"{_GEO}label_embed.weight", f"{_GEO}label_embed.weight"),
    _rule(f"{_GEO}cls_embed.weight", f"{_GEO}cls_embed.weight"),
    *_same(_GEO, _GEO, "boxes_direct_project", "boxes_pool_project", "boxes_pos_enc_project", "final_proj",
           "norm=prompt_layer_norm", "img_pre_norm=vision_layer_norm", "encode_norm=output_layer_norm"),
    *_pre_norm_layer(f"{_GEO}encode.{{i}}", f"{_GEO}layers.{{i}}"),
    *(
        DroppedRule(_Template(f"{_GEO}{name}.{p}"), _Template(f"{_GEO}final_proj.weight"),
                    _zeros("d", *in_dims) if p == "weight" else _zeros("d"),
                    "point-prompt projection; the transformers detector takes box prompts only")
        for name, in_dims in (("points_direct_project", (2,)), ("points_pool_project", ("d",)),
                              ("points_pos_enc_project", ("d",)))
        for p in ("weight", "bias")
    ),
    # ---- DETR encoder
    *_pre_norm_layer("transformer.encoder.layers.{i}", "detr_encoder.layers.{i}"),
    # ---- DETR decoder (post-norm: norm2 after self-attn, catext_norm after text, norm1 after image)
    *_mha(f"{_DEC}layers.{{i}}.self_attn", f"{_HDEC}layers.{{i}}.self_attn"),
    *_mha(f"{_DEC}layers.{{i}}.ca_text", f"{_HDEC}layers.{{i}}.text_cross_attn"),
    *_mha(f"{_DEC}layers.{{i}}.cross_attn", f"{_HDEC}layers.{{i}}.vision_cross_attn"),
    *_same(f"{_DEC}layers.{{i}}.", f"{_HDEC}layers.{{i}}.", "norm2=self_attn_layer_norm",
           "catext_norm=text_cross_attn_layer_norm", "norm1=vision_cross_attn_layer_norm",
           "linear1=mlp.fc1", "linear2=mlp.fc2", "norm3=mlp_layer_norm"),
    *_same(_DEC, _HDEC, "norm=output_layer_norm", "presence_token_out_norm=presence_layer_norm"),
    _rule(f"{_DEC}query_embed.weight", f"{_HDEC}query_embed.weight"),
    _rule(f"{_DEC}reference_points.weight", f"{_HDEC}reference_points.weight"),
    _rule(f"{_DEC}presence_token.weight", f"{_HDEC}presence_token.weight"),
    _mlp(f"{_DEC}bbox_embed", f"{_HDEC}box_head"),
    _mlp(f"{_DEC}presence_token_head", f"{_HDEC}presence_head"),
    _mlp(f"{_DEC}ref_point_head", f"{_HDEC}ref_point_head"),
    _mlp(f"{_DEC}boxRPB_embed_x", f"{_HDEC}box_rpb_embed_x"),
    _mlp(f"{_DEC}boxRPB_embed_y", f"{_HDEC}box_rpb_embed_y"),
    # ---- mask decoder (segmentation head)
    *_same("segmentation_head.pixel_decoder.", "mask_decoder.pixel_decoder.", "conv_layers.{i}", "norms.{i}"),
    *_same("segmentation_head.", "mask_decoder.", "mask_predictor.mask_embed.layers.{i}=mask_embedder.layers.{i}",
           "cross_attn_norm=prompt_cross_attn_norm", "semantic_seg_head=semantic_projection",
           "instance_seg_head=instance_projection"),
    *_mha("segmentation_head.cross_attend_prompt", "mask_decoder.prompt_cross_attn"),
    # ---- dot-product scoring
    _mlp("dot_prod_scoring.prompt_mlp", "dot_product_scoring.text_mlp"),
    *_same("dot_prod_scoring.", "dot_product_scoring.", "prompt_mlp.out_norm=text_mlp_out_norm",
           "prompt_proj=text_proj", "hs_proj=query_proj"),
)

_MAPPED = tuple(r for r in RULES if isinstance(r, Rule))
_DROPPED = tuple(r for r in RULES if isinstance(r, DroppedRule))


# ------------------------------------------------------------------------------------------- conversion
def _match_original(key: str) -> tuple[Rule | DroppedRule, dict[str, str]] | None:
    for rule in RULES:
        values = rule.original.match(key)
        if values is not None:
            return rule, values
    return None


def _to_hf(entries: Mapping[str, Any], tensors: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown, clashes = [], []
    for key, value in entries.items():
        hit = _match_original(key)
        if hit is None:
            unknown.append(key)
            continue
        rule, values = hit
        if isinstance(rule, DroppedRule):
            continue
        try:
            converted = rule.op.to_hf(value) if tensors else rule.op.shape_to_hf(list(value))
        except KeyMappingError as err:
            raise KeyMappingError(f"cannot convert {key}: {err}") from err
        for template, item in zip(rule.hf, converted):
            new_key = template.format(values)
            if new_key in out:
                clashes.append(new_key)
            out[new_key] = item
    if unknown:
        raise KeyMappingError(f"{len(unknown)} original SAM3 key(s) match no conversion rule:", unknown)
    if clashes:
        raise KeyMappingError("several original keys map to the same transformers key:", clashes)
    return out


def _to_original(entries: Mapping[str, Any], tensors: bool, config: Any) -> dict[str, Any]:
    keys = set(entries)
    groups: dict[tuple[int, tuple[tuple[str, str], ...]], list[Any]] = {}
    unknown = []
    for key, value in entries.items():
        for index, rule in enumerate(_MAPPED):
            found = False
            for position, template in enumerate(rule.hf):
                values = template.match(key)
                if values is None:
                    continue
                if rule.hf_if is not None and rule.hf_if.format(values) not in keys:
                    continue
                if rule.hf_unless is not None and rule.hf_unless.format(values) in keys:
                    continue
                parts = groups.setdefault((index, tuple(sorted(values.items()))), [None] * len(rule.hf))
                parts[position] = value if tensors else list(value)
                found = True
                break
            if found:
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyMappingError(f"{len(unknown)} transformers SAM3 key(s) match no conversion rule:", unknown)
    out: dict[str, Any] = {}
    missing = []
    for (index, items), parts in groups.items():
        rule, values = _MAPPED[index], dict(items)
        if any(p is None for p in parts):
            missing += [t.format(values) for t, p in zip(rule.hf, parts) if p is None]
            continue
        out[rule.original.format(values)] = rule.op.to_original(parts) if tensors else rule.op.shape_to_original(parts)
    if missing:
        raise KeyMappingError("transformers keys missing (needed to rebuild fused original tensors):", missing)
    for rule in _DROPPED:
        for key, value in entries.items():
            values = rule.anchor.match(key)
            if values is None:
                continue
            shape = list(value.shape) if tensors else list(value)
            filled = rule.fill(shape, values, config)
            if filled is None:
                continue
            if tensors:
                dtype = value.dtype if filled.is_floating_point() else filled.dtype
                out[rule.original.format(values)] = filled.to(device=value.device, dtype=dtype)
            else:
                out[rule.original.format(values)] = list(filled.shape)
    return out


def convert_original_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original image-model state dict (no ``detector.`` prefix) -> ``Sam3Model`` state dict.

    Raises :class:`KeyMappingError` naming every key no rule covers. Dropped tensors are listed by
    :func:`dropped_original_keys`.
    """
    return _to_hf(state_dict, tensors=True)


def convert_hf_to_original(state_dict: Mapping[str, Tensor], config: Any = None) -> dict[str, Tensor]:
    """``Sam3Model`` state dict -> original image-model layout (inverse of :func:`convert_original_to_hf`).

    The class-token position and point projections are zeros. ``freqs_cis`` RoPE buffers are computed
    from ``config`` (a ``Sam3Config``, ``Sam3VisionConfig`` or ``Sam3ViTConfig``) and omitted without one.
    """
    return _to_original(state_dict, tensors=True, config=config)


def map_original_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Shapes-only :func:`convert_original_to_hf` (same rules, nothing allocated)."""
    return _to_hf(shapes, tensors=False)


def map_hf_shapes(shapes: Mapping[str, Sequence[int]], config: Any = None) -> dict[str, list[int]]:
    """Shapes-only :func:`convert_hf_to_original`."""
    return _to_original(shapes, tensors=False, config=config)


def fused_original_key(key: str) -> str | None:
    """The original (``sam3.pt``) key whose fused tensor holds the transformers key ``key`` as one part (the q, k
    or v of a ``qkv`` / ``in_proj_*``); None when ``key`` is not such a part."""
    for rule in _MAPPED:
        if len(rule.hf) < 2:
            continue
        for template in rule.hf:
            values = template.match(key)
            if values is not None:
                return rule.original.format(values)
    return None


def dropped_original_keys(keys: Iterable[str]) -> dict[str, str]:
    """The given original keys that have no HF counterpart, each with the reason."""
    out = {}
    for key in keys:
        hit = _match_original(key)
        if hit is not None and isinstance(hit[0], DroppedRule):
            out[key] = hit[0].reason
    return out


#: the tracker's own FPN neck, which SAM3's video model keeps in its detector's vision backbone (``sam3.pt``:
#: ``detector.backbone.vision_backbone.sam2_convs.*``, 22 tensors; the image model has none)
TRACKER_NECK_PREFIX = "backbone.vision_backbone.sam2_convs."


def split_sam3_checkpoint(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a ``sam3.pt`` state dict into (detector, tracker) parts with the prefixes stripped.

    A dict wrapped as ``{"model": state_dict}`` is unwrapped; keys with neither ``detector.`` nor
    ``tracker.`` prefix are detector keys (the Medical-SAM3 release layout). The tracker's neck, stored among
    the detector's keys (``TRACKER_NECK_PREFIX``), goes to the tracker part under its own name.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    detector: dict[str, Any] = {}
    tracker: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith("tracker."):
            tracker[key[len("tracker.") :]] = value
            continue
        key = key.removeprefix("detector.")
        (tracker if key.startswith(TRACKER_NECK_PREFIX) else detector)[key] = value
    return detector, tracker
