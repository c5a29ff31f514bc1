"""Training: the LightningModule, dead-feature resampling and schedules."""

from sae.train.module import SAEModule
from sae.train.resampling import ResampleSchedule, draw_replacements, resample_features_
from sae.train.schedules import lr_factor, sparsity_factor

__all__ = ["ResampleSchedule", "SAEModule", "draw_replacements", "lr_factor", "resample_features_", "sparsity_factor"]
