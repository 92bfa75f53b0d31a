"""Evaluation metrics: per-case Dice / IoU / NSD / HD95, per-dataset and per-group tables, class merge."""

from .aggregate import (
    METRIC_NAMES,
    ComparisonTable,
    MetricTable,
    aggregate,
    compare,
    read_cases_csv,
    write_cases_csv,
)
from .merge import merge_classes
from .segmentation import (
    DEFAULT_NSD_TOLERANCE_MM,
    as_binary_mask,
    as_label_map,
    case_metrics,
    dice,
    hd95,
    iou,
    label_map_metrics,
    label_overlaps,
    surface_dice,
)

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "METRIC_NAMES",
    "ComparisonTable",
    "MetricTable",
    "aggregate",
    "as_binary_mask",
    "as_label_map",
    "case_metrics",
    "label_map_metrics",
    "label_overlaps",
    "compare",
    "dice",
    "hd95",
    "iou",
    "merge_classes",
    "read_cases_csv",
    "surface_dice",
    "write_cases_csv",
]
