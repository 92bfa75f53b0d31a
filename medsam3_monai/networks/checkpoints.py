"""Load and save SAM3 detector weights in every format users have on disk.

Formats (detected automatically; loading is always strict):

* ``tiny``          -- random-init preset (tests, demo), reproducible by seed.
* ``hf_folder``     -- transformers folder (``config.json`` + safetensors), e.g. facebook/sam3
                       (``model_type: sam3_video``, ``detector_model.*`` keys) or one saved by us.
* ``sam3_original`` -- Meta's ``sam3.pt``: ``{"model": {"detector.*": ..., "tracker.*": ...}}``.
* ``medical_sam3``  -- the Medical-SAM3 release: original image-model keys without prefix, maybe under ``model``.
* ``medsam3_monai`` -- our own ``.pt`` (a bundle's ``models/model.pt``): ``{"format": "medsam3-monai", "config":
  ..., "model": MedSAM3Net state dict}`` (version 1: ``"state_dict"`` of ``Sam3Model`` keys), or a bare
  transformers-layout state dict.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Sam3Config, Sam3Model

from .key_mapping import (
    TRACKER_NECK_PREFIX,
    VIT_TRUNK_PREFIX,
    KeyMappingError,
    convert_original_to_hf,
    split_sam3_checkpoint,
)
from .official_numerics import match_official_numerics
from .outputs import unwrap
from .presets import FULL_IMAGE_SIZE, TINY_IMAGE_SIZE, full_sam3_config, tiny_sam3_config
from .tokenizer import load_tokenizer

OUR_FORMAT = "medsam3-monai"
OUR_FORMAT_VERSION = 2
_WRAPPER_KEYS = ("state_dict", "model", "network", "module")
_HF_PREFIXES = ("module.", "sam3.", "detector_model.")
#: prefixes a training wrapper puts on every key (DDP, Lightning, torch.compile), whatever the layout underneath
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_EMA_KEYS = ("ema", "model_ema", "ema_model", "ema_state_dict", "state_dict_ema")
_ORIGINAL_MARKERS = ("backbone.vision_backbone.", "backbone.language_backbone.", "transformer.decoder.")
_HF_MARKERS = ("vision_encoder.", "text_encoder.", "detr_decoder.")
#: the key prefixes of a facebook/sam3 (``sam3_video``) folder's weights file
_VIDEO_DETECTOR, _VIDEO_TRACKER = "detector_model.", "tracker_model."
_VIDEO_PREFIXES = (_VIDEO_DETECTOR, _VIDEO_TRACKER, "tracker_neck.")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, of another model, or does not match the architecture."""


@dataclass
class LoadedSam3:
    model: Sam3Model
    tokenizer: PreTrainedTokenizerBase
    source_format: str
    #: how the network saw the pictures in training, as its file records it (:func:`described_preprocessing`)
    preprocessing: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- reading
def _read_torch_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, not a torch file
        import zipfile

        if zipfile.is_zipfile(path) and "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds Python objects besides tensors and plain containers, "
                "which are not unpickled (arbitrary code). Save the weights alone, e.g. "
                "torch.save(model.state_dict(), 'weights.pt'), and load that file."
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a readable PyTorch checkpoint ({type(err).__name__}). The file is "
            "corrupt, truncated or another kind of file; copy it again or point to the right file."
        ) from None


def _unwrap(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The innermost name -> tensor mapping of a checkpoint dict, without a prefix that every key carries from a
    wrapper (``module.`` of DDP, ``model.`` of Lightning, ``_orig_mod.`` of ``torch.compile``). EMA weights beside
    the model's are not loaded (a warning says so)."""
    top = obj
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            ema = [k for k in _EMA_KEYS
                   if isinstance(top, Mapping) and top is not obj and isinstance(top.get(k), Mapping)]
            obj, ema_prefix = _without_ema_keys(obj)
            if ema or ema_prefix:
                where = repr(ema[0]) if ema else f"the {ema_prefix}* keys"
                warnings.warn(f"{path} also holds EMA weights ({where}), which are not loaded: the model's are. To "
                              "use the EMA weights, save them alone as a checkpoint of their own", stacklevel=3)
            return _strip_wrapper_prefixes(obj)
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    ema = [k for k in _EMA_KEYS if isinstance(top, Mapping) and k in top]
    held = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path} holds no state dict of tensors (top-level keys: {held}); "
        "expected sam3.pt, a Medical-SAM3 release, an HF folder or a medsam3-monai checkpoint"
        + (f". Its {ema[0]!r} looks like EMA weights: save them alone to load them, "
           f"torch.save(ckpt[{ema[0]!r}], 'ema.pt')" if ema else ".")
    )


def _without_ema_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[Mapping[str, torch.Tensor], str]:
    """A Lightning-style state dict holding the model (``model.*``) and its EMA copy (``ema_model.*`` /
    ``model_ema.*``) side by side: the model's keys, and the EMA prefix found ("" when none)."""
    for prefix in ("ema_model.", "model_ema."):
        if any(k.startswith(prefix) for k in state_dict) and any(k.startswith("model.") for k in state_dict) and all(
                k.startswith((prefix, "model.")) for k in state_dict):
            return {k: v for k, v in state_dict.items() if k.startswith("model.")}, prefix
    return state_dict, ""


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` without the wrapper prefixes (:data:`_WRAPPER_PREFIXES`) that all its keys share."""
    for _ in range(len(_WRAPPER_PREFIXES)):
        prefix = next((p for p in _WRAPPER_PREFIXES if state_dict and all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _HF_PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def _convert_original(state_dict: Mapping[str, torch.Tensor], path: Path,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta's layout -> transformers'; ``prefix``: the file's own prefix of these keys (``detector.`` in a
    ``sam3.pt``), put back on the keys a failure names, so they read as the file has them."""
    try:
        return convert_original_to_hf(state_dict)
    except KeyMappingError as err:
        raise CheckpointError(f"{path} looks like an original SAM3 image model but does not convert; nothing was "
                              f"loaded.\n{err.naming(prefix)}") from err


def _is_safetensors(path: Path) -> bool:
    """Whether a file is laid out as safetensors (an 8-byte header length, then the JSON header), whatever its name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size
    except OSError:
        return False


def read_checkpoint_file(path: str | Path) -> tuple[dict[str, torch.Tensor], Sam3Config | None, str]:
    """Read a ``.pt``/``.pth``/``.safetensors`` file: (transformers-layout state dict, embedded config, format)."""
    state_dict, config, source_format, _preprocessing = _read_checkpoint(Path(path))
    return state_dict, config, source_format


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Sam3Config | None, str, dict[str, Any]]:
    """:func:`read_checkpoint_file`, and the preprocessing the file records (:func:`described_preprocessing`)."""
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    else:
        obj = _read_torch_file(path)
    config = None
    # our model file, or a training checkpoint (checkpoint_iterN.pt) with its network's configuration beside
    described = obj.get("network_config", obj) if isinstance(obj, Mapping) else None
    preprocessing = described_preprocessing(described)
    if isinstance(described, Mapping) and described.get("format") == OUR_FORMAT:
        config = Sam3Config.from_dict(described["config"])
        version = described.get("format_version")
        if isinstance(version, int) and version > OUR_FORMAT_VERSION:
            warnings.warn(f"{path} is format version {version} of medsam3-monai's model file, written by a newer "
                          f"version than this one (which writes {OUR_FORMAT_VERSION}); it is read as version "
                          f"{OUR_FORMAT_VERSION}: update medsam3-monai if it does not load", stacklevel=2)
        if described.get("extra_state"):
            _warn_outside_sam3(path, described["extra_state"],
                               "networks.load_extra_state(net, path) loads the rest into that network")
    state_dict = _unwrap(obj, path)
    keys = list(state_dict)
    if any(k.startswith(("detector.", "tracker.")) for k in keys):
        detector, _tracker = split_sam3_checkpoint(state_dict)
        return _convert_original(detector, path, prefix="detector."), config, "sam3_original", preprocessing
    if any(k.startswith(_ORIGINAL_MARKERS) for k in keys):  # a tracker neck saved along stays out of the detector
        detector, _tracker = split_sam3_checkpoint(state_dict)
        return _convert_original(detector, path), config, "medical_sam3", preprocessing
    video = [k for k in keys if k.startswith(_VIDEO_DETECTOR)]
    if video and all(k.startswith(_VIDEO_PREFIXES) for k in keys):
        # the weights file of a facebook/sam3 (sam3_video) folder given alone: its detector part
        return {k[len(_VIDEO_DETECTOR):]: state_dict[k] for k in video}, config, "sam3_video_weights", preprocessing
    own, outside = [k for k in keys if k.startswith("sam3.")], sorted(k for k in keys if not k.startswith("sam3."))
    if own and outside and not any(k.startswith(_HF_PREFIXES + _HF_MARKERS) for k in outside):
        # a network built on MedSAM3Net (a training checkpoint of a subclass with a head of its own): its SAM3 model
        _warn_outside_sam3(path, outside, "the rest is that network's own")
        state_dict = {k: state_dict[k] for k in own}
    stripped = _strip_prefixes(state_dict)
    if any(k.startswith(_HF_MARKERS) for k in stripped):
        training = isinstance(obj, Mapping) and "network" in obj and ("optimizer" in obj or "trainer" in obj)
        return stripped, config, "training_checkpoint" if training else "medsam3_monai", preprocessing
    raise CheckpointError(
        f"{path} is not a SAM3 checkpoint: none of its {len(keys)} keys look like SAM3 "
        f"(first keys: {keys[:5]}). Expected original keys (backbone.vision_backbone.*, detector.*) "
        "or transformers keys (vision_encoder.*, detector_model.*)."
    )


def _warn_outside_sam3(path: Path, names: Any, rest: str) -> None:
    """Warn that ``path`` holds tensors (``names``) of a network built on MedSAM3Net outside its SAM3 model."""
    names = sorted(names)
    warnings.warn(f"{path} also holds {len(names)} tensors of a network built on MedSAM3Net, outside its SAM3 model "
                  f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): the SAM3 weights are loaded; {rest}",
                  stacklevel=3)


def load_extra_state(network: nn.Module, path: str | Path) -> list[str]:
    """Load the state a model file holds outside the SAM3 model (``extra_state``, written by
    ``engines.handlers.save_model_file`` for a subclass of ``MedSAM3Net`` with modules of its own) into ``network``,
    strictly: a key the file holds that ``network`` lacks, or one of ``network``'s own that the file lacks, raises a
    ``CheckpointError`` naming them. Returns the keys loaded. The SAM3 weights load as ever (``MedSAM3Net(path)``)."""
    payload = _read_torch_file(Path(path))
    saved = payload.get("extra_state") if isinstance(payload, Mapping) else None
    if not saved:
        raise CheckpointError(f"{path} holds no state outside the SAM3 model (no 'extra_state'): it was saved from "
                              "a plain MedSAM3Net, or by another tool")
    own = {name for name in unwrap(network).state_dict() if not name.startswith("sam3.")}
    unexpected, missing = sorted(set(saved) - own), sorted(own - set(saved))
    if unexpected or missing:
        raise CheckpointError(f"{path}'s state outside the SAM3 model does not fit {type(network).__name__}: "
                              f"in the file only: {unexpected or 'none'}; in the network only: {missing or 'none'}")
    unwrap(network).load_state_dict(dict(saved), strict=False)
    return sorted(saved)


def checkpoint_keys(path: str | Path) -> list[str] | None:
    """The tensor names of a ``.pt`` checkpoint file, unwrapped as loading unwraps them, without reading its tensors
    (memory-mapped; a legacy, non-zip file is read whole), or of a safetensors file (its header); None for anything
    that is not such a file."""
    path = Path(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception:
            return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy torch.save file cannot be memory-mapped
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
    try:
        return list(_unwrap(obj, path))
    except CheckpointError:
        return None


def read_sam3_tracker(path: str | Path, origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Meta's ``sam3.pt`` -> the ``Sam3TrackerVideoModel`` state dict of SAM3's tracker: its ``tracker.*`` tensors,
    its neck (``detector.backbone.vision_backbone.sam2_convs.*``) and the detector's ViT, SAM3's one trunk
    (:func:`~.tracker_keys.convert_original_tracker`). A checkpoint without tracker tensors (a Medical-SAM3 detector
    release, an image model) raises :class:`CheckpointError`. ``origins``: receives the tracker keys' names in the
    file (:func:`tracker_key_name` reads them)."""
    from .tracker_keys import convert_original_tracker

    path = Path(path)
    state = _unwrap(_read_torch_file(path), path)
    if any(str(key).startswith(_VIDEO_TRACKER) for key in state):
        raise CheckpointError(f"{path} is the weights file of a facebook/sam3 (transformers) folder: give the folder "
                              "itself as the tracker (its config.json describes the tracker these weights fit)")
    detector, tracker = split_sam3_checkpoint(state)
    if all(key.startswith(TRACKER_NECK_PREFIX) for key in tracker):  # none, or a neck alone (an image model's file)
        raise CheckpointError(
            f"{path} holds no SAM3 tracker weights (no tracker.* keys): it is a detector (image model) checkpoint. "
            "Give the tracker Meta's sam3.pt or a facebook/sam3 folder, or segment volumes without it (--tracker none)."
        )
    try:
        converted = convert_original_tracker(tracker, origins)
    except KeyMappingError as err:
        raise CheckpointError(f"the tracker in {path} does not convert; nothing was loaded.\n{err}") from err
    # SAM3's one trunk is the tracker's ViT too; the rest of the detector is not converted
    trunk = {k: v for k, v in detector.items() if k.startswith(VIT_TRUNK_PREFIX)}
    return {**converted, **_convert_original(trunk, path, prefix="detector.")}


# ---------------------------------------------------------------------------------------- strict load
def original_key_name(key: str, prefix: str = "") -> str:
    """A transformers-layout key with the name it has in Meta's ``sam3.pt``
    (``detr_decoder.box_head.layer1.bias (original name: transformer.decoder.bbox_embed.layers.0.bias)``); a part of a
    fused original tensor (q / k / v of a ``qkv``) names the tensor it is part of. ``prefix``: the file's own
    prefix of the detector's keys (``detector.`` in Meta's ``sam3.pt``)."""
    from .key_mapping import fused_original_key, map_hf_shapes

    try:
        (original,) = map_hf_shapes({key: [1]})
    except (KeyMappingError, ValueError):
        fused = fused_original_key(key)
        return f"{key} (original name: part of {prefix}{fused})" if fused else key
    return f"{key} (original name: {prefix}{original})"


def tracker_key_name(key: str, origins: Mapping[str, str]) -> str:
    """A ``Sam3TrackerVideoModel`` key with its name in the ``sam3.pt`` it was read from (``origins``:
    :func:`read_sam3_tracker`'s); the ViT's keys are the detector's (``detector.backbone.vision_backbone.trunk.*``);
    a key the file does not hold is named as transformers has it."""
    if origins.get(key):
        return f"{key} (original name: {origins[key]})"
    return original_key_name(key, "detector.") if key.startswith("vision_encoder.backbone.") else key


def key_report(model_keys: Mapping[str, tuple], ckpt_keys: Mapping[str, tuple], limit: int = 12,
               name: Callable[[str], str] = str) -> str:
    """Human-readable difference between two key -> shape maps ('' when they match); ``name`` renders a key (e.g.
    :func:`original_key_name` for a file in Meta's layout, converted before the comparison)."""
    missing = sorted(set(model_keys) - set(ckpt_keys))
    unexpected = sorted(set(ckpt_keys) - set(model_keys))
    mismatched = sorted(k for k in set(model_keys) & set(ckpt_keys) if tuple(model_keys[k]) != tuple(ckpt_keys[k]))
    lines = []

    def block(title: str, keys: list[str], render: Callable[[str], str] = name) -> None:
        if keys:
            lines.append(f"  {title}: {len(keys)}")
            lines.extend(f"    {render(key)}" for key in keys[:limit])  # only the keys shown are named
            if len(keys) > limit:
                lines.append(f"    ... and {len(keys) - limit} more")

    block("missing from the checkpoint (the model needs them)", missing)
    block("unexpected in the checkpoint (the model has no such parameter)", unexpected)
    block("shape mismatch (checkpoint vs model)", mismatched,
          lambda k: f"{name(k)}: {tuple(ckpt_keys[k])} vs {tuple(model_keys[k])}")
    return "\n".join(lines)


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                           what: str = "SAM3 image model", original_layout: bool = False,
                           original_prefix: str = "", key_name: Callable[[str], str] | None = None) -> None:
    """Load every tensor or nothing: any missing, unexpected or mis-shaped key raises CheckpointError (keys also
    named as Meta's ``sam3.pt`` has them when ``original_layout``, with the file's ``original_prefix``, or as
    ``key_name`` renders them)."""
    check_state_dict(model, state_dict, source, what, original_layout, original_prefix, key_name)
    model.load_state_dict(state_dict, strict=True)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     what: str = "SAM3 image model", original_layout: bool = False,
                     original_prefix: str = "", key_name: Callable[[str], str] | None = None) -> None:
    """:func:`load_state_dict_strict`'s checks, nothing loaded: ``model`` may be built on the meta device (its
    shapes and dtypes only, no memory)."""
    model_state = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in model_state.items()}
    ckpt_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    name = key_name or ((lambda key: original_key_name(key, original_prefix)) if original_layout else str)
    report = key_report(model_shapes, ckpt_shapes, name=name)
    if report:
        raise CheckpointError(
            f"checkpoint {source} does not match the {what}'s architecture; nothing was loaded.\n{report}\n"
            f"Check that it is a {what} and that the configuration (full vs tiny, image size) matches."
        )
    # floating-point weights stored as integers (or booleans) would be copied in truncated: refused, not loaded
    not_float = sorted(key for key, value in state_dict.items()
                       if model_state[key].is_floating_point() and not value.is_floating_point())
    if not_float:
        listed = ", ".join(f"{name(key)} ({state_dict[key].dtype})" for key in not_float[:8])
        raise CheckpointError(
            f"checkpoint {source} holds {len(not_float)} weight(s) as integers where the model's are floating point "
            f"(e.g. {listed}{', ...' if len(not_float) > 8 else ''}); nothing was loaded. The file was altered "
            "after saving: save the network's own state dict (float32, float16 or bfloat16 load alike)."
        )


# ---------------------------------------------------------------------------------------- build
def _tiny_model(config: Sam3Config | None, image_size: int | None, seed: int) -> Sam3Model:
    config = config or tiny_sam3_config(TINY_IMAGE_SIZE if image_size is None else image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3Model(config)
    return model


def folder_without_config(folder: Path) -> CheckpointError:
    """The error for a checkpoint folder that has no ``config.json``, naming a checkpoint file inside it if any."""
    inside = sorted(p.name for p in folder.glob("*") if p.suffix in (".pt", ".pth", ".safetensors"))
    hint = f"; to load a file inside it, give the file (e.g. {folder / inside[0]})" if inside else ""
    if not inside and (folder / "models" / "model.pt").is_file():  # a training run's --out folder
        hint = f"; it looks like a training run: give its model, {folder / 'models' / 'model.pt'}"
    return CheckpointError(f"{folder} has no config.json: not a transformers checkpoint folder (one holds config.json "
                           f"and *.safetensors, as save_pretrained and `medsam3 convert-checkpoint` write them){hint}")


def _mismatch(entry: Any) -> str:
    """A ``mismatched_keys`` entry of transformers' loading info, ``(key, checkpoint shape, model shape)``, as text."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, stored, built = entry
        return f"{key} {tuple(stored)} vs {tuple(built)}"
    return str(entry)


def load_pretrained_folder(folder: Path, model_class: type, model_types: tuple[str, ...], what: str,
                           wrong_type: str) -> torch.nn.Module:
    """Strictly load ``model_class.from_pretrained(folder)`` from local files, never downloading.

    ``model_types``: accepted ``config.json`` model types (else ``wrong_type``, formatted with ``folder`` and
    ``model_type``, is raised); ``what`` names the model in the errors. Missing, unexpected or mis-shaped keys
    raise :class:`CheckpointError` with a key report.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise folder_without_config(folder)
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    if model_type not in model_types:
        raise CheckpointError(wrong_type.format(folder=folder, model_type=model_type))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder} has config.json but no weights (*.safetensors)")
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report table: ours below names the keys
    try:
        # float32 whatever config.json's dtype says (as every other source loads); mis-shaped tensors are listed in
        # ``info`` rather than raised without names, and refused below (nothing reinitialised is ever returned)
        model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, dtype=torch.float32)
    except Exception as err:
        hint = (": a weights file is truncated or corrupt, copy it again" if type(err).__name__ == "SafetensorError"
                else "")
        raise CheckpointError(f"cannot load the {what} from {folder}: {type(err).__name__}: {str(err)[:300]}{hint}"
                              ) from err
    finally:
        transformers_logging.set_verbosity(verbosity)
    problems = {
        "missing from the checkpoint": info.get("missing_keys") or [],
        "unexpected in the checkpoint": info.get("unexpected_keys") or [],
        "shape mismatch (checkpoint vs model)": [_mismatch(m) for m in info.get("mismatched_keys") or []],
    }
    if any(problems.values()):
        lines = [f"  {title}: {len(keys)}: {sorted(keys)[:12]}" for title, keys in problems.items() if keys]
        raise CheckpointError(f"checkpoint folder {folder} does not match the {what}; nothing was loaded:\n"
                              + "\n".join(lines) + "\nCheck that its config.json (full vs tiny, image size) is the "
                              "one its weights were saved with.")
    return model


def _load_hf_folder(folder: Path) -> Sam3Model:
    return load_pretrained_folder(
        folder, Sam3Model, ("sam3", "sam3_video"), "SAM3 detector",
        "{folder} holds a '{model_type}' model, not SAM3 (config model_type must be sam3 or sam3_video)",
    )


def missing_checkpoint(path: Path) -> CheckpointError:
    """The error for a checkpoint path that does not exist, with what can be given instead."""
    return CheckpointError(f"checkpoint {path} does not exist. Give 'tiny', an HF folder (facebook/sam3 layout), "
                           "sam3.pt, a Medical-SAM3 checkpoint or a medsam3-monai checkpoint.")


def load_sam3(
    source: str | Path,
    config: Sam3Config | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> LoadedSam3:
    """Build transformers' ``Sam3Model`` from ``source`` (see module docstring) plus its tokenizer.

    Every model is set to the official SAM3 numerics (:func:`match_official_numerics`, which warns when the
    source's configuration says otherwise).
    """
    loaded = _load_sam3(source, config, image_size, seed)
    if str(source) != "tiny":
        check_finite_weights(loaded.model, str(source))
    match_official_numerics(loaded.model, str(source))
    return loaded


def check_finite_weights(model: torch.nn.Module, source: str, what: str = "SAM3") -> None:
    """Refuse a loaded model with NaN or infinite weights (:class:`CheckpointError` naming them): every output of
    such a network is NaN (a file saved from an uninitialised or diverged model)."""
    bad = [name for name, value in model.named_parameters()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(
            f"checkpoint {source} holds NaN or infinite values in {len(bad)} {what} weight(s) (e.g. "
            f"{', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}), so every output would be NaN: it was saved from "
            "a model whose weights were never set or whose training diverged; use another checkpoint")


def _folder_tokenizer(folder: Path) -> Any:
    """A checkpoint folder's tokenizer (:func:`load_tokenizer`); files that do not read are a CheckpointError."""
    try:
        return load_tokenizer(folder)
    except Exception as err:  # noqa: BLE001 - a broken tokenizer.json / vocab: name the folder, not the parser
        raise CheckpointError(f"{folder}: its tokenizer files do not read ({type(err).__name__}: {str(err)[:200]}); "
                              "copy them again, or remove them (tokenizer*.json, vocab.json, merges.txt, "
                              "special_tokens_map.json) to use the offline CLIP tokenizer, which is SAM3's") from err


def _load_sam3(source: str | Path, config: Sam3Config | None, image_size: int | None, seed: int) -> LoadedSam3:
    if str(source) == "tiny":
        return LoadedSam3(_tiny_model(config, image_size, seed), load_tokenizer(None), "tiny")
    path = Path(source).expanduser()
    if not path.exists():
        raise missing_checkpoint(path)
    if path.is_dir():
        return LoadedSam3(_load_hf_folder(path), _folder_tokenizer(path), "hf_folder", _folder_preprocessing(path))
    state_dict, embedded_config, source_format, preprocessing = _read_checkpoint(path)
    # a file without a configuration (sam3.pt, a Medical-SAM3 release) fits SAM3's architecture at any multiple of
    # 14: the requested size (the release's 3D checkpoint works at 504), else 1008
    model_config = config or embedded_config or full_sam3_config(image_size or FULL_IMAGE_SIZE)
    layout = {"original_layout": source_format in ("sam3_original", "medical_sam3"),
              "original_prefix": "detector." if source_format == "sam3_original" else ""}
    try:
        with torch.device("meta"):  # the key report first, on shapes alone: a full SAM3 takes GBs and seconds to build
            skeleton = Sam3Model(model_config)
        check_state_dict(skeleton, state_dict, str(path), **layout)
        model = Sam3Model(model_config)
        model.load_state_dict(state_dict, strict=True)
    except CheckpointError as err:
        if config is not None or embedded_config is not None:
            raise
        if source_format == "training_checkpoint":
            raise CheckpointError(
                f"{path} is a training checkpoint written before they stored the network's configuration, so the "
                "full SAM3 architecture was assumed and does not fit. Convert it once with the configuration it was "
                f"trained with: medsam3 convert-checkpoint {path} FOLDER --config tiny --image-size SIZE, then give "
                f"FOLDER (checkpoints written now carry their configuration).\n{err}"
            ) from None
        raise CheckpointError(
            f"{err}\nThe file holds weights without a configuration, so the full SAM3 architecture was assumed. For a "
            "network of another configuration (e.g. the tiny one) convert the file once into a folder that carries "
            f"it: medsam3 convert-checkpoint {path} FOLDER --config tiny --image-size SIZE, then give FOLDER; in "
            "Python, MedSAM3Net(path, config=tiny_sam3_config(SIZE)). The training bundle's models/model.pt, "
            "model_best_val_dice.pt and checkpoint_iterN.pt carry their configuration."
        ) from None
    return LoadedSam3(model, load_tokenizer(None), source_format, preprocessing)


# ---------------------------------------------------------------------------------------- save
def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public_modes(folder: Path) -> None:
    """Give ``folder`` and what is in it the modes ``mkdir`` and ``open`` give under the umask: ``mkdtemp`` makes a
    private (0700) folder and safetensors private (0600) files, which other users could not read."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_dir(directory: Path, write) -> Path:
    """Write into a temporary sibling, then rename: no partial output folder on failure. An existing empty folder
    (made for the output, a link to one, a mount point; its parent may be read-only) is written into instead: the
    files are staged in a hidden folder inside it and moved up, and removed again on failure."""
    directory = directory.expanduser()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"output folder {directory} exists and is not empty; choose a new path")
    if directory.is_dir():
        return _write_into_empty(directory, write)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        _public_modes(tmp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write_into_empty(directory: Path, write) -> Path:
    """:func:`atomic_dir` into an existing empty folder: staged in a hidden folder inside it, then moved up."""
    stage = Path(tempfile.mkdtemp(prefix=".staging.", dir=directory))
    moved: list[Path] = []
    try:
        write(stage)
        _public_modes(stage)
        for entry in sorted(stage.iterdir()):
            os.replace(entry, directory / entry.name)
            moved.append(directory / entry.name)
        stage.rmdir()
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return directory


#: the file of an HF folder of ours that records the training's preprocessing (:func:`described_preprocessing`)
PREPROCESSING_FILE = "medsam3_preprocessing.json"


def _folder_preprocessing(folder: Path) -> dict[str, Any]:
    """The preprocessing an HF folder records in :data:`PREPROCESSING_FILE` (``{}`` when it has none)."""
    path = folder / PREPROCESSING_FILE
    if not path.is_file():
        return {}
    try:
        entry = _preprocessing_entry(json.loads(path.read_text(encoding="utf-8")))
        if "ct_window" in entry:
            from ..transforms.intensity import check_ct_window

            check_ct_window(entry["ct_window"])
        if "resize_kernel" in entry:
            from ..bundle import check_resize_kernel

            check_resize_kernel(entry["resize_kernel"])
        return entry
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} does not read ({err}): it records how the model was trained (resize_kernel, "
                              "ct_window); restore it, or remove it and give --resize-kernel / --ct-window") from None


def save_hf_folder(model: Sam3Model, tokenizer: PreTrainedTokenizerBase | None, directory: str | Path,
                   preprocessing: Mapping[str, Any] | None = None) -> Path:
    """Save ``model`` (and tokenizer) as an HF folder that ``Sam3Model.from_pretrained`` loads; ``preprocessing`` (how
    the network saw the pictures in training) goes to :data:`PREPROCESSING_FILE`, which our loaders read back."""
    entry = _preprocessing_entry(preprocessing)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if entry:
            (tmp / PREPROCESSING_FILE).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")

    return atomic_dir(Path(directory), write)


def model_description(model: Sam3Model, preprocessing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What our files say about a network besides its weights: ``{"format", "format_version", "config"}``, from
    which :func:`read_checkpoint_file` rebuilds the architecture (model files, and training checkpoints'
    ``network_config``), and ``"preprocessing"``: the training's ``resize_kernel`` and ``ct_window`` when given
    (:func:`described_preprocessing`)."""
    described = {"format": OUR_FORMAT, "format_version": OUR_FORMAT_VERSION, "config": model.config.to_dict()}
    entry = _preprocessing_entry(preprocessing)
    return {**described, "preprocessing": entry} if entry else described


#: the preprocessing settings our files record: the training bundle's keys, how the network saw the pictures
PREPROCESSING_KEYS = ("resize_kernel", "ct_window")


def _preprocessing_entry(settings: Any) -> dict[str, Any]:
    """The :data:`PREPROCESSING_KEYS` of ``settings`` that are set, a (width, level) window as a list."""
    if not isinstance(settings, Mapping):
        return {}
    return {key: list(value) if isinstance(value, (list, tuple)) else value
            for key, value in settings.items() if key in PREPROCESSING_KEYS and value is not None}


def described_preprocessing(description: Any) -> dict[str, Any]:
    """The preprocessing a :func:`model_description` records (our model file, a training checkpoint's
    ``network_config``), e.g. ``{"resize_kernel": "sam3", "ct_window": "lung"}``: the training bundle's settings,
    which inference repeats; ``{}`` for files that record none (other formats, files written before)."""
    return _preprocessing_entry(description.get("preprocessing") if isinstance(description, Mapping) else None)


def described_image_size(description: Any) -> int | None:
    """The image size a stored configuration names: a :func:`model_description` (our model file, a training
    checkpoint's ``network_config``) or a transformers ``config.json`` dict; None when it names none."""
    config = description.get("config", description) if isinstance(description, Mapping) else None
    try:
        return int(config["vision_config"]["backbone_config"]["image_size"])
    except (KeyError, TypeError, ValueError):
        return None


def save_checkpoint_file(model: Sam3Model, path: str | Path, extra: Mapping[str, Any] | None = None,
                         extra_state: Mapping[str, torch.Tensor] | None = None,
                         preprocessing: Mapping[str, Any] | None = None) -> Path:
    """Save our single-file format, atomically: ``{"format", "format_version", "config", "model"}``.

    ``model`` holds ``MedSAM3Net``'s state dict (transformers keys under ``sam3.``), the layout MONAI's
    ``CheckpointLoader(load_dict={"model": net})`` and ``ckpt_export --key_in_ckpt model`` read; ``config`` (the
    ``Sam3Config`` as a dict) lets ``MedSAM3Net(path)`` rebuild the architecture. Version 1 files (a
    ``state_dict`` of ``Sam3Model`` keys) still load. ``extra_state``: the state a subclass of ``MedSAM3Net`` holds
    outside its SAM3 model (a head of one's own), stored as ``extra_state`` beside ``model``; ``MedSAM3Net(path)``
    loads the SAM3 weights and notes it, :func:`load_extra_state` loads it into the subclass. ``preprocessing``:
    how the network saw the pictures in training (:func:`model_description`), which inference repeats.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **model_description(model, preprocessing),
        "model": {f"sam3.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        **dict(extra or {}),
    }
    if extra_state:
        payload["extra_state"] = {k: v.detach().cpu() for k, v in extra_state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # a file object, not a path: torch's own C++ writer says a full disk only as "unexpected pos" (no errno); a
        # Python file's write raises the OSError that storage_errors.storage_error recognises
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
