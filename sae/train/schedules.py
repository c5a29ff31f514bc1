"""Learning-rate and sparsity-coefficient schedules, as pure functions of the step.

Following Anthropic's April 2024 update: a linear LR warm-up, a constant phase, and a linear decay to zero
over the last `decay_fraction` of training; the sparsity coefficient warms up linearly from zero, which
keeps early training from killing features before the dictionary has found the data.
"""

from __future__ import annotations


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, decay_fraction: float) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(factor, (step + 1) / warmup_steps)
    if total_steps and total_steps > 0 and decay_fraction > 0:
        decay_start = total_steps * (1 - decay_fraction)
        if step >= decay_start:
            factor = min(factor, max(0.0, (total_steps - step) / (total_steps - decay_start)))
    return factor


def sparsity_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the sparsity coefficient at optimizer step `step` (0-based)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
