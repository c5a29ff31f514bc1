"""Guards that keep a long run from losing work or going silently wrong.

- `SafeCheckpointIO`: Lightning's checkpoint IO, but every checkpoint is written atomically (temp file in the
  same directory, fsync, rename: a kill mid-write leaves the previous file whole), a state with NaN or inf
  weights is never written (so `last.ckpt` stays the last good state), and a file that cannot be read fails
  with `CheckpointError`, naming the file and the checkpoints that could be used instead.
- `NonFiniteLossError`: raised by the training step when the loss is NaN or inf.
- `ResumeMismatchError`: a checkpoint from a different layer, width or architecture than the config.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sae.nn.io import atomic_save_torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupt."""


class ResumeMismatchError(ValueError):
    """A checkpoint whose SAE does not match the configured one (layer, d_in, d_sae, architecture)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state_dict` that hold NaN or inf."""
    return [
        name for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def sibling_checkpoints(path: str | Path) -> list[Path]:
    """The other `.ckpt` files next to `path`, oldest step first (the candidates to resume from instead)."""
    path = Path(path)
    others = [p for p in path.parent.glob("*.ckpt") if p.name != path.name and not p.name.startswith(".")]
    return sorted(others, key=lambda p: (p.name.startswith("last"), p.name))


def _fix_for(path: Path) -> str:
    earlier = [p for p in sibling_checkpoints(path) if not p.name.startswith("last")]
    if earlier:
        return f"resume from an earlier checkpoint instead: ckpt_path={earlier[-1]}"
    return "no other checkpoint is in that folder: delete it and start the run again"


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, finite-only checkpoint writes and validated reads (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteLossError(
                f"refusing to write {path}: {', '.join(bad[:4])} hold NaN or inf at step "
                f"{checkpoint.get('global_step')}. The previous checkpoints are kept; resume from one with "
                "ckpt_path=last and a lower sae.lr."
            )
        atomic_save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location, weights_only=weights_only)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict:
    """Read a Lightning checkpoint and check it is whole: `CheckpointError` (naming the fix) if not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {_fix_for(path)}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({str(e)[:200]}); {_fix_for(path)}.") from e
        raise CheckpointError(
            f"checkpoint {path} holds Python objects that a safe load refuses ({str(e).splitlines()[-3][:200]}). "
            "Resume only from checkpoints this project wrote; if you trust this file, load it with "
            "torch.load(weights_only=False) and re-save its tensors."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}); "
                              f"{_fix_for(path)}.") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no state_dict/global_step); "
                              f"{_fix_for(path)}.")
    bad = nonfinite_tensors(checkpoint["state_dict"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {', '.join(bad[:4])}; {_fix_for(path)}.")
    return checkpoint
