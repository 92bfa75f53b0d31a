"""The one module that touches private or unversioned APIs of Ignite and transformers.

Everything else in the project uses public APIs. What is here, and why:

* Ignite has no public way to list an engine's handlers (we find MONAI's ``MLFlowHandler`` to log into its run)
  nor to skip batches of the running epoch (exact mid-epoch resume): ``Engine._event_handlers`` and
  ``Engine._dataloader_iter``.
* transformers' SAM3 tracker is public only through its processor, which would pre-process every slice again;
  we drive ``Sam3TrackerVideoInferenceSession`` directly (feature cache, mask prompts, frames made on demand).
  That class changes between releases, so the supported transformers versions are pinned
  (``SUPPORTED_TRANSFORMERS``, also in ``pyproject.toml``) and ``tests/test_compat.py`` fails on a version whose
  session differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

#: transformers releases whose SAM3 tracker session this module is tested against (pyproject.toml pins the same)
SUPPORTED_TRANSFORMERS = (">=5.24", "<5.25")


# ---------------------------------------------------------------------------------------- Ignite
def attached_handlers(engine: Any) -> Iterator[Callable]:
    """Every handler attached to an Ignite ``engine``, whatever the event."""
    for handlers in engine._event_handlers.values():
        for handler, _args, _kwargs in handlers:
            yield handler


def skip_batches(engine: Any, count: int) -> None:
    """Draw and drop the next ``count`` batches of the running epoch of an Ignite ``engine``."""
    for _ in range(count):
        next(engine._dataloader_iter)


# ---------------------------------------------------------------------------------------- transformers
def transformers_version_problem() -> str | None:
    """Why the installed transformers is outside ``SUPPORTED_TRANSFORMERS``, or None when it is supported."""
    import transformers
    from packaging.specifiers import SpecifierSet

    wanted = SpecifierSet(",".join(SUPPORTED_TRANSFORMERS))
    if transformers.__version__ in wanted:
        return None
    return (f"transformers {transformers.__version__} is installed; the SAM3 tracker session is tested with "
            f"transformers{','.join(SUPPORTED_TRANSFORMERS)}: `pip install 'transformers{','.join(SUPPORTED_TRANSFORMERS)}'`")


class _FramesOnDemand(Mapping):
    """A session's ``processed_frames`` whose frame ``i`` is made by ``frame(i)`` when asked: with every slice's
    vision features cached the tracker never asks, so no copy of the whole volume in the session's dtype is made
    (a 300-slice volume at 1008 px would be 3.7 GB in float32)."""

    def __init__(self, count: int, frame: Callable[[int], torch.Tensor]) -> None:
        self.count, self.frame = int(count), frame

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= int(index) < self.count:
            raise KeyError(index)
        return self.frame(int(index))

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))


def tracker_session(num_frames: int, size: int, device: torch.device, dtype: torch.dtype, frames: list[Any],
                    positions: Any, frame: Callable[[int], torch.Tensor]) -> Any:
    """A ``Sam3TrackerVideoInferenceSession`` over ``num_frames`` slices of ``size`` x ``size`` with every slice's
    vision features (``frames[i]``, shared ``positions``) already in its cache, so the tracker never runs its ViT;
    ``frame(i)``: slice ``i``'s (3, S, S) pixels in ``dtype`` on ``device``, made only if the tracker asks."""
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
        Sam3TrackerVideoInferenceSession,
    )

    session = Sam3TrackerVideoInferenceSession(
        video=None, video_height=size, video_width=size, inference_device=device,
        inference_state_device=device, video_storage_device=device, dtype=dtype,
        max_vision_features_cache_size=num_frames,
    )
    session.processed_frames = _FramesOnDemand(num_frames, frame)
    for index in range(num_frames):
        session.cache.cache_vision_features(index, {"vision_feats": frames[index], "vision_pos_embeds": positions})
    return session


def add_mask_prompt(session: Any, obj_id: int, frame_idx: int, mask: torch.Tensor) -> None:
    """A binary (S, S) mask as object ``obj_id``'s prompt on ``frame_idx`` (the processor's
    ``add_inputs_to_inference_session(input_masks=...)`` without its image pre-processing)."""
    obj_idx = session.obj_id_to_idx(obj_id)
    session.add_mask_inputs(obj_idx, frame_idx, mask.float()[None, None])
    session.remove_point_inputs(obj_idx, frame_idx)
    session.obj_with_new_inputs = [obj_id]
