
from .bitmasks import BitMasks
from .volume import (
    VolumeSegmentation,
    detect_slices,
    merge_masks,
    segment_volume,
    select_seeds,
)
from .tracking import track_prompts
from .postprocess import ImageOrVolumed, MergePromptsd, RowsFirstPILWriter
from .inputs import inference_items
from .predict import Prediction, Predictor, PromptInferer, predict_file
