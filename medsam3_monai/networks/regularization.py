"""SAM3's training-time regularisation on transformers' modules: dropout where the official model drops.

The official detector (``sam3/model_builder.py``) trains with

* dropout 0.1 on the **attention weights** of every attention in the geometry encoder, the DETR encoder and the
  DETR decoder (``nn.MultiheadAttention(dropout=0.1)``); transformers' ``Sam3Attention`` passes 0;
* dropout 0.1 on each **residual branch** of those layers (transformers has these, ``config.dropout``);
* dropout 0.1 **inside the feed-forward network**, after the ReLU; transformers' ``Sam3MLP`` drops before the
  activation with ``hidden_dropout`` 0. For ReLU both places give the same result (ReLU commutes with the
  positive rescaling and keeps zeros), so setting that dropout to the rate is exact;
* dropout 0.1 on the hidden layer of the scoring head's prompt MLP (after its ReLU), where transformers drops
  the MLP's output instead;
* **stochastic depth** in the ViT, rising linearly from 0 in the first block to 0.1 in the last, on both
  residual branches of each block (transformers has none).

The mask decoder's prompt cross-attention and the text encoder have no dropout in either implementation.
Everything acts in training mode only; eval outputs are untouched. Attention-weight dropout goes through
transformers' own attention dispatch (a registered ``AttentionInterface``); the rest sets dropout rates and
adds forward hooks, so no transformers layer is re-implemented.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, Sam3Model
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam3.modeling_sam3 import Sam3Attention, eager_attention_forward

ATTENTION_PREFIX = "medsam3_weight_dropout_"
_DETECTOR_PARTS = ("geometry_encoder", "detr_encoder", "detr_decoder")


@dataclass
class TrainingDropout:
    """Training-time regularisation rates; the defaults are SAM3's (``model_builder.py``).

    Attributes:
        dropout: attention weights, residual branches and feed-forward hidden layers of the geometry encoder,
            DETR encoder and decoder, and the scoring head's prompt MLP.
        drop_path: stochastic depth of the last ViT block (0 for the first, linear in between).
    """

    dropout: float = 0.1
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"TrainingDropout.{name} must lie in [0, 1); got {value!r}")

    @classmethod
    def of(cls, value: "TrainingDropout | dict | None") -> "TrainingDropout":
        return value if isinstance(value, cls) else cls(**(value or {}))


def _with_weight_dropout(base: str) -> str:
    """Register (once) an attention implementation: ``base`` plus attention-weight dropout; returns its name.

    The rate is the module's ``attention_weight_dropout`` in training mode (0 in eval); masks are built as for
    ``base``.
    """
    name = f"{ATTENTION_PREFIX}{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        function = eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]

        def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs: Any):
            rate = getattr(module, "attention_weight_dropout", 0.0) if module.training else 0.0
            return function(module, query, key, value, attention_mask, dropout=max(dropout, rate), **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def register_weight_dropout(model: Sam3Model) -> None:
    """Register the attention implementations ``model``'s detector parts name (after unpickling in a new process:
    the registry is per process, the name travels in the configs)."""
    for part in _DETECTOR_PARTS:
        name = getattr(model, part).config._attn_implementation or ""
        if name.startswith(ATTENTION_PREFIX):
            _with_weight_dropout(name[len(ATTENTION_PREFIX):])


class _RememberImages:
    """Forward pre-hook on a ViT layer: records how many images it is called with (``(B, H, W, C)`` input)."""

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        layer.medsam3_num_images = hidden.shape[0]


class _DropPath:
    """Forward hook on a ViT block's attention or MLP: stochastic depth of that residual branch.

    Zeroes the branch for a random subset of images and rescales the rest by 1 / (1 - rate), independently per
    call. Windowed attention batches the windows of an image together, so one image's mask covers its windows.
    """

    def __init__(self, layer: nn.Module, rate: float) -> None:
        self.layer = layer
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: tuple, output):
        if not module.training or self.rate == 0.0:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        images = self.layer.medsam3_num_images
        keep = 1.0 - self.rate
        mask = hidden.new_empty((images,)).bernoulli_(keep).div_(keep)
        mask = mask.repeat_interleave(hidden.shape[0] // images).view(-1, *([1] * (hidden.ndim - 1)))
        hidden = hidden * mask
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _OutputDropout:
    """Forward hook: dropout on a module's output (training mode only). A class, not a closure, so that a network
    carrying it pickles (``torch.save(net)``, ``multiprocessing`` spawn)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(output, self.rate, training=module.training)


def apply_training_dropout(model: Sam3Model, settings: TrainingDropout | dict | None = None) -> list:
    """Give ``model`` SAM3's training regularisation (in place); returns the hook handles it installed.

    Call once per model. The rates are also written into the sub-configs that hold them (``dropout``,
    ``hidden_dropout``), so a saved model records them.
    """
    settings = TrainingDropout.of(settings)
    handles = []
    for part in _DETECTOR_PARTS:
        module = getattr(model, part)
        module.config.dropout = settings.dropout
        module.config.hidden_dropout = settings.dropout
        for child in module.modules():
            if isinstance(child, nn.Dropout):
                child.p = settings.dropout  # residual branches and the feed-forward hidden layers
            elif isinstance(child, Sam3Attention):
                child.attention_weight_dropout = settings.dropout
        base = module.config._attn_implementation or "sdpa"
        if not base.startswith(ATTENTION_PREFIX):
            module.config._attn_implementation = _with_weight_dropout(base)
    scoring = model.dot_product_scoring
    scoring.text_mlp_dropout.p = 0.0  # the official prompt MLP drops its hidden layer, not its output
    # dropout on layer1's output equals dropout after the ReLU that follows it
    handles.append(scoring.text_mlp.layer1.register_forward_hook(_OutputDropout(settings.dropout)))

    layers = model.vision_encoder.backbone.layers
    for layer, rate in zip(layers, torch.linspace(0, settings.drop_path, len(layers)).tolist()):
        handles.append(layer.register_forward_pre_hook(_RememberImages(), with_kwargs=True))
        handles.append(layer.attention.register_forward_hook(_DropPath(layer, rate)))
        handles.append(layer.mlp.register_forward_hook(_DropPath(layer, rate)))
    return handles
