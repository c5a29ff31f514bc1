"""The LightningModule that trains 1..K SAEs on the same batches: optimizer, schedules and logging.

Each SAE's training state (input scale, firing counters, resampling, export) is a plain
`sae.train.state.SAETrainingState`; `SAEModule` trains one, `sae.train.multi.MultiSAEModule` several. Both are
`SAETrainer`s: Lightning sees one module, and callbacks iterate `named_members()`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from sae.train.guards import NonFiniteLossError, ResumeMismatchError, kept_checkpoint_hint
from sae.train.state import DEAD_WINDOW_MAX, SAETrainingState, input_scale_of

log = logging.getLogger(__name__)

__all__ = ["SAEModule", "SAETrainer", "input_scale_of"]


class SAETrainer(L.LightningModule):
    """Trains `members` (SAETrainingState) named `names` on every batch. Their losses are summed into one
    backward pass: the members share no parameter and the inputs carry no gradient, so each receives exactly
    the gradient of its own loss, and one Adam with a parameter group per member steps each exactly as a
    separate run would. Member `name` logs under `name/` (the one member of an SAEModule, named "", bare)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.members = nn.ModuleList()
        self.resuming = False  # set by train.py before fit: Lightning reads the checkpoint only after setup

    def named_members(self) -> list[tuple[str, SAETrainingState]]:
        return list(zip(self.names, self.members))

    @staticmethod
    def prefix(name: str) -> str:
        return f"{name}/" if name else ""

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Estimate each input scale and initialize each b_dec before DDP wraps the model.

        DDP then broadcasts rank zero's parameters and buffers, so every rank starts identical. A resumed
        run skips this: the checkpoint restores both, so the saved scale and b_dec are kept, not recomputed.
        """
        if stage != "fit" or self.resuming:
            return
        datamodule = self.trainer.datamodule
        total = max(1, self.trainer.max_steps) * datamodule.batch_size * self.trainer.world_size
        default_window = min(DEAD_WINDOW_MAX, max(datamodule.batch_size, total // 5))
        for member in self.members:
            if not member.prepared():
                member.prepare(datamodule.sample_vectors(member.init_sample).float(), default_window)

    def configure_optimizers(self):
        # torch's fused Adam: the same update in one kernel per parameter instead of a dozen ops (bench/README.md).
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters()) or None
        optimizer = torch.optim.Adam([m.param_group() for m in self.members], fused=fused)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [m.lr_lambda(total) for m in self.members])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Any]:
        """Every member's step on the same (B, d_in) batch. Returns the summed loss and, detached, what
        callbacks read under "members" (one dict per member): x (B, d_in) scaled inputs, x_hat (B, d_in), f (B, d_sae),
        and active (SAEOutput.active: f's non-zero entries, or None)."""
        steps = []
        for name, member in self.named_members():
            step = member.step(batch, self.global_step)
            if step.nonfinite:
                # Before backward on CPU (checked every step there); on an accelerator within HOST_CHECK_EVERY
                # steps. Either way no checkpoint is written with non-finite weights (SafeCheckpointIO refuses them).
                which = f" of {name}" if name else ""
                raise NonFiniteLossError(
                    f"the training loss{which} was found non-finite at step {self.global_step} (on some rank); the "
                    "run stopped. " + kept_checkpoint_hint(self._checkpoint_dir())
                )
            steps.append(step)
        if self._writes_logs_this_step():
            for (name, _), step in zip(self.named_members(), steps):
                self._log_step(self.prefix(name), step)
        loss = torch.stack([step.losses.loss for step in steps]).sum()
        self.log("loss", loss, prog_bar=True, logger=False)
        members = [{"x": s.x.detach(), "x_hat": s.out.x_hat.detach(), "f": s.out.f.detach(),
                    "active": None if s.out.active is None else tuple(t.detach() for t in s.out.active)}
                   for s in steps]
        return {"loss": loss, "members": members}

    def _checkpoint_dir(self) -> Path:
        callback = getattr(self.trainer, "checkpoint_callback", None)
        return Path(getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints")

    def _writes_logs_this_step(self) -> bool:
        """Whether the logger may write this step's on_step values, which Lightning does every
        trainer.log_every_n_steps batches of its own count and when stopping. The train/* values are logged only
        then: each self.log call costs ~1 ms on CPU (Lightning moves the value's whole state), 5 per member per
        step. Lightning's count equals global_step, or after some resumes global_step - 1: both are covered,
        and a value logged at a step that is not written is dropped (on_step values do not carry over)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # driven without a Trainer (bench/throughput.py): nothing is written anyway
            return False
        return (self.global_step + 1) % max(1, trainer.log_every_n_steps) in (0, 1) or trainer.should_stop

    @torch.no_grad()
    def _log_step(self, prefix: str, step) -> None:
        # The loss and its terms on this batch; L0, explained variance and the dead fraction over each logging
        # interval are SparsityMonitor's (sparsity/*), so that each quantity has one key. None costs a pass over
        # the batch (the L1 norm comes with the firing counts, SAETrainingState.step).
        losses = step.losses
        self.log_dict({
            f"{prefix}train/loss": losses.loss,
            f"{prefix}train/mse": losses.mse,
            f"{prefix}train/sparsity_loss": losses.sparsity,
            f"{prefix}train/aux_loss": losses.aux,
            f"{prefix}train/l1": step.l1,
        }, on_step=True, prog_bar=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        for member in self.members:
            member.sae.project_decoder_grad_()

    def on_train_batch_end(self, outputs, batch: Tensor, batch_idx: int) -> None:
        for name, member in self.named_members():
            member.sae.normalize_decoder_()
            # The schedule reads the trainer's step count only when resampling is on: the benchmarks drive the
            # module's step without a Trainer.
            if member.resample is not None and member.resample_due(self.global_step, self.trainer.max_steps):
                n_dead = member.resample_dead(batch.float() * member.input_scale, self.global_step,
                                              self.optimizers().optimizer,
                                              lambda t: self.trainer.strategy.broadcast(t, src=0))
                self.log(f"{self.prefix(name)}train/resampled", float(n_dead), on_step=True)
                log.info("step %d: resampled %d dead features%s", self.global_step, n_dead,
                         f" of {name}" if name else "")

    # -- validation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        for member in self.members:
            member.start_validation()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        for name, member in self.named_members():
            losses = member.validate(batch)
            self.log(f"{self.prefix(name)}val/loss", losses.loss, on_epoch=True, sync_dist=True,
                     batch_size=batch.shape[0])

    def on_validation_epoch_end(self) -> None:
        for name, member in self.named_members():
            # Already reduced over ranks (a collective: every rank calls it); floats, so that Lightning
            # neither reduces them again nor warns that it does not.
            self.log_dict({f"{self.prefix(name)}val/{k}": v for k, v in member.end_validation().items()})

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Nothing in training draws from the global RNGs today (resampling and the data stream are seeded by
        # step), but a resumed run must stay exact if something ever does.
        checkpoint["rng_states"] = rng_states()
        checkpoint["members"] = {name: member.describe() for name, member in self.named_members()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resumable(checkpoint)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def check_resumable(self, checkpoint: dict[str, Any], name: str = "the checkpoint") -> None:
        """Raise ResumeMismatchError if `checkpoint` holds other SAEs (members, layer, widths, architectures)."""
        theirs = checkpoint.get("members")
        ours = {member_name: member.describe() for member_name, member in self.named_members()}
        if theirs == ours:
            return
        if not isinstance(theirs, dict) or list(theirs) != list(ours):
            listed = list(theirs) if isinstance(theirs, dict) else "no list of members (an older format)"
            raise ResumeMismatchError(f"{name} holds the SAEs {listed}, this run has {list(ours)}; resume with the "
                                      "original sae settings (the run directory's config_resolved.yaml lists them).")
        member_name = next(n for n in ours if theirs[n] != ours[n])
        which = f" (member {member_name})" if member_name else ""
        raise ResumeMismatchError(
            f"{name}{which} was trained with {theirs[member_name]} but this run is configured with "
            f"{ours[member_name]}. Resume with the original settings (the run directory's config_resolved.yaml "
            "lists them), or start a new run without ckpt_path."
        )

    # -- export ---------------------------------------------------------------------------------------
    def export(self, directory: str | Path, **metadata: Any) -> Path:
        """Write the members' exports under `directory` (atomic); returns the file a user opens first."""
        raise NotImplementedError


class SAEModule(SAETrainer):
    """Trains one SAE: `SAETrainingState(d_in, **hparams)` (see it for the arguments and their defaults)."""

    def __init__(self, d_in: int, **hparams: Any):
        super().__init__()
        hparams = plain(hparams)
        self.save_hyperparameters(logger=False)  # the logger gets the resolved run config once (train.py)
        self.names = [""]
        self.members.append(SAETrainingState(d_in, **hparams))

    @property
    def member(self) -> SAETrainingState:
        return self.members[0]

    @property
    def sae(self):
        return self.member.sae

    @property
    def input_scale(self) -> Tensor:
        return self.member.input_scale

    @property
    def metadata(self) -> dict:
        return self.member.metadata

    def export(self, directory: str | Path, **metadata: Any) -> Path:
        """Write sae.safetensors + sae.json in the layer's units (atomic); returns the weights' path."""
        self.member.export(directory, self.global_step, **metadata)
        return Path(directory) / "sae.safetensors"


def plain(value: Any) -> Any:
    """`value` with Hydra's config containers made plain dicts and lists, so that the hyperparameters saved in
    a checkpoint load with torch.load(weights_only=True)."""
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, random), as tensors and plain types."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
