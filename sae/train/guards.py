"""Guards that keep a long run from losing work or going silently wrong.

- `SafeCheckpointIO`: Lightning's checkpoint IO, but every checkpoint is written atomically (temp file in the
  same directory, fsync, rename: a kill mid-write leaves the previous file whole), a state with NaN or inf
  weights is never written (so `last.ckpt` stays the last good state), and a file that cannot be read fails
  with `CheckpointError`, naming the file and the checkpoints that could be used instead.
- `NonFiniteLossError`: raised by the training step when the loss is NaN or inf.
- `ResumeMismatchError`: a checkpoint from a different layer, width or architecture than the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sae.errors import EXIT_NON_FINITE, UserError
from sae.nn.io import atomic_save_torch
from sae.safeload import load_error_text, refused_by_safe_load, torch_load


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated or corrupt."""


class ResumeMismatchError(UserError, ValueError):
    """A checkpoint whose SAE does not match the configured one (layer, d_in, d_sae, architecture)."""


class DataStatisticsError(UserError, ValueError):
    """Input vectors that cannot be trained on: all zero, non-finite, or of a magnitude float32 cannot scale."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or inf; the run stops and keeps its last good checkpoint."""

    exit_code = EXIT_NON_FINITE


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


def kept_checkpoint_hint(directory: Path) -> str:
    """What a diverged run leaves to continue from: last.ckpt if it was ever written, else nothing (said so)."""
    last = Path(directory) / "last.ckpt"
    if last.is_file():
        return (f"The last good checkpoint is kept ({last}): resume it with ckpt_path=last and a lower sae.lr "
                "(or a longer sae.lr_warmup_steps), or check the inputs.")
    return ("No checkpoint had been written yet, so there is nothing to resume: start again with a lower sae.lr "
            "(or a longer sae.lr_warmup_steps) in a new directory, or here with overwrite=true, or check the inputs.")


def _fix_for(path: Path) -> str:
    earlier = [p for p in sibling_checkpoints(path) if not p.name.startswith("last")]
    if earlier:
        return f"resume from an earlier checkpoint instead: ckpt_path={earlier[-1]}"
    return "no other checkpoint is in that folder: start again in a new directory, or here with overwrite=true"


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, finite-only checkpoint writes and validated reads (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteLossError(
                f"refusing to write {path}: {', '.join(bad[:4])} hold NaN or inf at step "
                f"{checkpoint.get('global_step')}. {kept_checkpoint_hint(Path(path).parent)}"
            )
        try:
            atomic_save_torch(checkpoint, path)
        except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
            if isinstance(e, RuntimeError) and "write" not in str(e).lower():
                raise
            then = (f"the previous {Path(path).name} is kept: free space, then continue with ckpt_path=last"
                    if Path(path).is_file() else "no checkpoint was written: free space, then run the command again")
            raise CheckpointError(f"cannot write the checkpoint {path} ({load_error_text(e)}): is the disk full or "
                                  f"a quota reached? {then}.") from e

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # `weights_only` from the caller is ignored on purpose: a checkpoint is only ever read safely.
        return load_checkpoint_file(path, map_location=map_location)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """Read a Lightning checkpoint safely (tensors and plain values only, whatever the caller or the
    environment asks) and check it is whole: `CheckpointError` (naming the fix) if not."""
    del weights_only  # kept for callers that pass weights_only=True; the load is always weights-only
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {_fix_for(path)}.")
    try:
        checkpoint = torch_load(path, map_location=map_location)
    except Exception as e:  # noqa: BLE001 - unpickling, zip, header and I/O errors come in many types
        if refused_by_safe_load(e):
            raise CheckpointError(f"checkpoint {path} is refused: {load_error_text(e)}. Resume only from checkpoints "
                                  f"this project wrote; {_fix_for(path)}.") from e
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({load_error_text(e)}); "
                              f"{_fix_for(path)}.") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) \
            or not isinstance(checkpoint.get("global_step"), int):
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no state_dict/global_step); "
                              f"{_fix_for(path)}.")
    bad = nonfinite_tensors(checkpoint["state_dict"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {', '.join(bad[:4])}; {_fix_for(path)}.")
    return checkpoint


def check_restorable(checkpoint: dict, ours: dict[str, Any], path: Path) -> None:
    """The parts Lightning restores are there and fit this module (else its KeyError/IndexError would escape)."""
    missing = [key for key in ("optimizer_states", "lr_schedulers", "loops", "hyper_parameters") if key not in checkpoint]
    theirs = checkpoint["state_dict"]
    wrong = [k for k in ours if k not in theirs or getattr(theirs[k], "shape", None) != ours[k].shape]
    if missing or wrong or len(checkpoint.get("optimizer_states") or []) != 1:
        what = ", ".join(missing + [f"state_dict[{k!r}]" for k in wrong[:3]]) or "its optimizer state"
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged ({what} missing or misshapen); "
                              f"{_fix_for(path)}.")
