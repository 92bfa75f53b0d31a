"""Ignite engines of Medical SAM3 training and validation, schedules, optimiser and handlers."""

from . import distributed
from .checkpointing import (TrainingCheckpoint, TrainingData, check_resume_checkpoint, check_resume_source,
                            latest_checkpoint)
from .batch import ImageBudgetBatches, PrepareFindBatch, collate_find_queries, flatten_items
from .evaluator import MedSAM3Evaluator, PromptDice, TopQueryDice, pred_and_label
from .handlers import (BestModelCheckpoint, EpochSeedHandler, FinalCheckpoint, LossProgressBar, MLflowRunInfoHandler,
                       OptimizerStepLrSchedule, TrainerIteration, ValidateAtEnd, ValidateAtStart)
from .optim import build_optimizer, check_training_mode, freeze_encoders, freeze_for_mode
from .schedulers import WarmupInverseSqrtLR, inverse_sqrt_factor, optimizer_steps
from .trainer import MedSAM3Trainer, autocast_for

__all__ = [
    "distributed", "BestModelCheckpoint", "EpochSeedHandler", "FinalCheckpoint", "LossProgressBar",
    "MLflowRunInfoHandler", "OptimizerStepLrSchedule", "TrainerIteration", "TrainingCheckpoint", "TrainingData",
    "ValidateAtEnd", "ValidateAtStart", "check_resume_checkpoint", "check_resume_source", "latest_checkpoint",
    "MedSAM3Evaluator", "MedSAM3Trainer", "ImageBudgetBatches", "PrepareFindBatch", "PromptDice", "TopQueryDice",
    "WarmupInverseSqrtLR",
    "autocast_for", "build_optimizer", "check_training_mode", "collate_find_queries", "flatten_items",
    "freeze_encoders", "freeze_for_mode", "inverse_sqrt_factor", "optimizer_steps", "pred_and_label",
]
