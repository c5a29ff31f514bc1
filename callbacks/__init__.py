"""Lightning callbacks that log what the SAE is learning (to W&B, or to files when W&B is off)."""

from callbacks.throughput import Throughput

__all__ = ["Throughput"]
