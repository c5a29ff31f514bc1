"""Lightning callbacks that log what the SAE is learning (to W&B, or to files when W&B is off)."""

from callbacks.dataset_examples import DatasetExamples
from callbacks.feature_visualization import FeatureVisualization
from callbacks.preemption import PreemptionCheckpoint
from callbacks.progress import StepProgress
from callbacks.sparsity import SparsityMonitor
from callbacks.throughput import Throughput

__all__ = ["DatasetExamples", "FeatureVisualization", "PreemptionCheckpoint", "StepProgress", "SparsityMonitor", "Throughput"]
