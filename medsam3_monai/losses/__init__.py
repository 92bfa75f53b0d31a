"""Matchers and the set-prediction criterion of Medical SAM3 / SAM3 training."""

from .criterion import CriterionSettings, LossWeights, SetCriterion
from .matchers import HungarianMatcher, Matches, OneToManyMatcher
from .targets import FindTargets

__all__ = ["CriterionSettings", "FindTargets", "HungarianMatcher", "LossWeights", "Matches", "OneToManyMatcher", "SetCriterion"]
