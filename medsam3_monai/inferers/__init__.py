
from .volume import (
    VolumeSegmentation,
    detect_slices,
    merge_masks,
    segment_volume,
    select_seeds,
    track_from_seed,
)
from .postprocess import ImageOrVolumed, MergePromptsd, RowsFirstPILWriter
from .predict import Prediction, Predictor, PromptInferer, inference_items, predict_file
