"""One tiny SAM3 detector architecture on both sides: Meta's official classes (sam3 0.1.4) and our preset.

``scripts/check_official.py --tiny`` compares our network with Meta's code on it in seconds instead of minutes, so
that CI holds the comparison on every change (``tests/test_official_detector.py``); the full-size table stays
``check_official.py``'s default.

* :func:`build_tiny_official` (the official environment's Python): ``Sam3Image`` assembled as sam3's
  ``model_builder.build_sam3_image_model`` assembles it -- the same classes and settings (presence token, DAC,
  box relative position bias, the geometry encoder's CLS token, three pixel-decoder stages, the one-to-one Hungarian
  matcher) -- at the tiny preset's sizes (width 32, 2 heads, 2 ViT layers with the last one global, windows of 4,
  2 text layers, 1 DETR encoder layer, 2 decoder layers, 8 queries, 1 geometry layer) instead of SAM3's (1024 / 256
  wide, 32 ViT layers, 24 text layers, 6 + 6 DETR layers, 200 queries, 3 geometry layers).
* :func:`build_official` (the official environment's Python): that, or SAM3's own architecture through sam3's
  ``build_sam3_image_model`` at any slice size; what ``check_official.py`` and ``official_segment.py`` build.
* :func:`tiny_official_config` (this project's Python): ``networks.tiny_sam3_config`` with the two sizes our preset
  chooses otherwise: the text MLP of CLIP's 4 x width (sam3's ``TextTransformer``) and CLIP's 512-wide text projection
  (unused by SAM3, kept for the key map).
"""

from __future__ import annotations

WIDTH = 32
HEADS = 2
VIT_LAYERS = 2
TEXT_LAYERS = 2
DECODER_LAYERS = 2
QUERIES = 8
WINDOW = 4
#: sam3's TextTransformer: MLP ratio 4 and a 512-wide CLIP projection
TEXT_MLP_RATIO = 4
TEXT_PROJECTION = 512


def tiny_official_config(image_size: int):
    """Our ``Sam3Config`` of the tiny architecture (module docstring)."""
    from medsam3_monai.networks import tiny_sam3_config

    config = tiny_sam3_config(image_size, hidden_size=WIDTH, num_queries=QUERIES, vit_layers=VIT_LAYERS,
                              text_layers=TEXT_LAYERS, decoder_layers=DECODER_LAYERS, window_size=WINDOW)
    config.text_config.intermediate_size = TEXT_MLP_RATIO * WIDTH
    config.text_config.projection_dim = TEXT_PROJECTION
    return config


def build_tiny_official(image_size: int):
    """sam3 0.1.4's ``Sam3Image`` of the tiny architecture, random init, on the CPU (run inside
    ``official_tracker.official_code_on_cpu``: sam3's position encodings are made on CUDA)."""
    import importlib.resources
    from pathlib import Path

    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone
    from sam3.train.matcher import BinaryHungarianMatcherV2
    from torch import nn

    width = WIDTH

    def position_encoding():
        return PositionEmbeddingSine(num_pos_feats=width, normalize=True, scale=None, temperature=10000,
                                     precompute_resolution=image_size)

    def attention(batch_first: bool = True, dropout: float = 0.1):
        return MultiheadAttention(num_heads=HEADS, dropout=dropout, embed_dim=width, batch_first=batch_first)

    vit = ViT(img_size=image_size, pretrain_img_size=image_size, patch_size=14, embed_dim=width, depth=VIT_LAYERS,
              num_heads=HEADS, mlp_ratio=2.0, norm_layer="LayerNorm", drop_path_rate=0.1, qkv_bias=True,
              use_abs_pos=True, tile_abs_pos=True, global_att_blocks=(VIT_LAYERS - 1,), rel_pos_blocks=(),
              use_rope=True, use_interp_rope=True, window_size=WINDOW, pretrain_use_cls_token=True,
              retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False, bias_patch_embed=False)
    neck = Sam3DualViTDetNeck(position_encoding=position_encoding(), d_model=width,
                              scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit, add_sam2_neck=False)
    vocabulary = Path(str(importlib.resources.files("open_clip"))) / "bpe_simple_vocab_16e6.txt.gz"
    text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=str(vocabulary)), d_model=width, width=width,
                         heads=HEADS, layers=TEXT_LAYERS)
    encoder = TransformerEncoderFusion(
        layer=TransformerEncoderLayer(
            activation="relu", d_model=width, dim_feedforward=2 * width, dropout=0.1, pos_enc_at_attn=True,
            pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
            self_attention=attention(), cross_attention=attention()),
        num_layers=1, d_model=width, num_feature_levels=1, frozen=False, use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False, pool_text_with_mask=True)
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(
            activation="relu", d_model=width, dim_feedforward=2 * width, dropout=0.1,
            cross_attention=MultiheadAttention(num_heads=HEADS, dropout=0.1, embed_dim=width), n_heads=HEADS,
            use_text_cross_attention=True),
        num_layers=DECODER_LAYERS, num_queries=QUERIES, return_intermediate=True, box_refine=True, num_o2m_queries=0,
        dac=True, boxRPB="log", d_model=width, frozen=False, interaction_layer=None, dac_use_selfatt_ln=True,
        resolution=image_size, stride=14, use_act_checkpoint=True, presence_token=True)
    scoring = DotProductScoring(d_model=width, d_proj=width, prompt_mlp=MLP(
        input_dim=width, hidden_dim=2 * width, output_dim=width, num_layers=2, dropout=0.1, residual=True,
        out_norm=nn.LayerNorm(width)))
    segmentation = UniversalSegmentationHead(
        hidden_dim=width, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=True, cross_attend_prompt=attention(batch_first=False, dropout=0.0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=width))
    geometry = SequenceGeometryEncoder(
        pos_enc=position_encoding(), encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
        points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=width,
        num_layers=1, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
        layer=TransformerEncoderLayer(
            activation="relu", d_model=width, dim_feedforward=2 * width, dropout=0.1, pos_enc_at_attn=False,
            pre_norm=True, self_attention=attention(batch_first=False), pos_enc_at_cross_attn_queries=False,
            pos_enc_at_cross_attn_keys=True, cross_attention=attention(batch_first=False)))
    matcher = BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2,
                                       stable=False)
    return Sam3Image(backbone=SAM3VLBackbone(visual=neck, text=text, scalp=1),
                     transformer=TransformerWrapper(encoder=encoder, decoder=decoder, d_model=width),
                     input_geometry_encoder=geometry, segmentation_head=segmentation, num_feature_levels=1,
                     o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
                     inst_interactive_predictor=None, matcher=matcher)


def build_official(image_size: int, tiny: bool = False, eval_mode: bool = True):
    """sam3 0.1.4's ``Sam3Image``, random init, on the CPU: the tiny architecture (:func:`build_tiny_official`) or
    SAM3's (``build_sam3_image_model``, its ViT built at ``image_size``: sam3 builds it at 1008 px, the rest reads the
    size from its features); in training mode unless ``eval_mode``, as ``build_sam3_image_model`` leaves it. Run
    inside ``official_tracker.official_code_on_cpu``."""
    if tiny:
        model = build_tiny_official(image_size)
        return model.eval() if eval_mode else model.train()
    import importlib.resources
    from pathlib import Path

    import sam3.model_builder as builder

    vit = builder.ViT
    builder.ViT = lambda *args, **kwargs: vit(*args, **{**kwargs, "img_size": image_size})
    try:
        vocabulary = Path(str(importlib.resources.files("open_clip"))) / "bpe_simple_vocab_16e6.txt.gz"
        return builder.build_sam3_image_model(bpe_path=str(vocabulary), device="cpu", eval_mode=eval_mode,
                                              checkpoint_path=None, load_from_HF=False)
    finally:
        builder.ViT = vit
