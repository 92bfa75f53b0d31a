
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
from .postprocess import ImageOrVolumed, MergePromptsd, RowsFirstPILWriter, postprocessing_transforms
from .predict import Prediction, Predictor, PromptInferer, inference_items, predict_file, resolve_tracker
