"""SAM3 network wrapper and its loading, checkpoint formats, tokenizer, optimiser parameter groups; the tracker is
``networks.tracker``."""

from .checkpoints import (
    CheckpointError,
    load_extra_state,
    load_sam3,
    read_checkpoint_file,
    save_checkpoint_file,
    save_hf_folder,
)
from .medsam3_net import MedSAM3Net, load_network, network_pixels, normalize_pixels
from .outputs import MedSAM3Output
from .param_groups import LearningRates, sam3_param_groups, vit_layer_id
from .presets import full_sam3_config, tiny_sam3_config
from .tokenizer import PromptError, build_clip_tokenizer, load_tokenizer, tokenize_prompts

__all__ = [
    "CheckpointError",
    "LearningRates",
    "MedSAM3Net",
    "MedSAM3Output",
    "PromptError",
    "build_clip_tokenizer",
    "full_sam3_config",
    "load_extra_state",
    "load_network",
    "load_sam3",
    "load_tokenizer",
    "network_pixels",
    "normalize_pixels",
    "read_checkpoint_file",
    "sam3_param_groups",
    "save_checkpoint_file",
    "save_hf_folder",
    "tiny_sam3_config",
    "tokenize_prompts",
    "vit_layer_id",
]
