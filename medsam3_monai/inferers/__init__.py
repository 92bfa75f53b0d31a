
from .volume import (
    VolumeSegmentation,
    build_tracker,
    detect_slices,
    merge_masks,
    segment_volume,
    select_seeds,
    tiny_tracker_config,
    track_from_seed,
)
