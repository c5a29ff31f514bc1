"""Training: one SAE's training state, the LightningModules that train 1..K of them, resampling and schedules."""

from sae.train.module import SAEModule, SAETrainer
from sae.train.resampling import ResampleSchedule, draw_replacements, resample_features_
from sae.train.schedules import lr_factor, sparsity_factor
from sae.train.state import SAETrainingState

__all__ = ["ResampleSchedule", "SAEModule", "SAETrainer", "SAETrainingState", "draw_replacements", "lr_factor",
           "resample_features_", "sparsity_factor"]
