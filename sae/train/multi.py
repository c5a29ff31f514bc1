"""K SAEs trained side by side on one activation stream (`sae=multi`): a sweep that extracts once.

    python train.py sae=multi sae.sweep.l1_coefficient=[0.1,0.2,0.4,0.8]
    python train.py sae=multi 'sae.members=[{architecture: topk, k: 16}, {architecture: topk, k: 64}]'

Each member is a complete `SAEModule` (its own input scale, dead-feature counters, resampling, schedules and
export); this module only fans each batch out to them. Their losses are summed into one backward pass: the
members share no parameter and the inputs carry no gradient, so every member receives exactly the gradient
of its own loss, and one Adam with a parameter group per member (Adam's state is per parameter) steps each
exactly as a separate run would. What is shared is the stream: the images are decoded and InceptionV1 runs
once per batch instead of K times.

Each member logs under its own prefix (`<name>/train/loss`, ...) and is exported to
`RUN_DIR/members/<name>/` (sae.safetensors + sae.json), readable by `sae.nn.load_sae` like any run.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from sae.nn import ARCHITECTURES, SAEConfigError
from sae.nn.io import atomic_write_bytes
from sae.train.guards import ResumeMismatchError
from sae.train.module import SAEModule, restore_checkpoint
from sae.train.schedules import lr_factor

log = logging.getLogger(__name__)


class MemberModule(SAEModule):
    """An `SAEModule` whose `self.log` calls are recorded for the parent to log under the member's prefix."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logged: list[tuple[str, Any, dict]] = []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - see class docstring
        if args:
            raise TypeError("pass log() options by keyword")
        self.logged.append((name, value, kwargs))

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)


def member_configs(members: Sequence[Mapping] | None, sweep: Mapping[str, Sequence] | None) -> dict[str, dict]:
    """{name: overrides}: the explicit `members` list, then the Cartesian product of the `sweep` lists.

    A member's name is its `name` key, else its overrides written as `key=value,key=value`.
    """
    configs = [dict(m) for m in members or []]
    swept = {k: list(v) for k, v in (sweep or {}).items() if v is not None}
    for values in itertools.product(*swept.values()) if swept else ():
        configs.append(dict(zip(swept, values)))
    if not configs:
        raise SAEConfigError("sae=multi needs members: sae.sweep.l1_coefficient=[0.1,0.3] (or sae.sweep.k=..., "
                         "+sae.sweep.KEY=[...]) or sae.members='[{l1_coefficient: 0.1}, {l1_coefficient: 0.3}]'.")
    named: dict[str, dict] = {}
    for config in configs:
        name = str(config.pop("name", None) or ",".join(f"{k}={v}" for k, v in config.items()) or "default")
        if name in named or "/" in name:
            raise SAEConfigError(f"sae=multi: member name {name!r} is repeated or contains '/'; give each a distinct `name`.")
        named[name] = config
    return named


def member_kwargs(shared: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The member's SAEModule arguments: `shared` updated by `overrides`, less the shared architecture
    hyperparameters its own architecture does not take (e.g. the default l1_coefficient for a TopK member)."""
    kwargs = {**shared, **overrides}
    architecture = kwargs.get("architecture", "relu")
    if architecture not in ARCHITECTURES:
        return kwargs  # build_sae names the valid choices
    trainer_keys = set(inspect.signature(SAEModule.__init__).parameters)
    accepted = set(inspect.signature(ARCHITECTURES[architecture].__init__).parameters)
    return {k: v for k, v in kwargs.items() if k in trainer_keys or k in accepted or k in overrides}


class MultiSAEModule(L.LightningModule):
    """Trains K `SAEModule`s on the same batches. Keyword arguments are the shared SAE configuration (as for
    `SAEModule`); `members` / `sweep` give each member's overrides of it (see `member_configs`)."""

    def __init__(self, d_in: int, members: Sequence[Mapping] | None = None, sweep: Mapping | None = None,
                 metadata: dict | None = None, **shared: Any):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the logger gets the resolved run config once (train.py)
        configs = member_configs(members, sweep)
        self.names = list(configs)
        self.members = nn.ModuleList(
            MemberModule(d_in=d_in, **member_kwargs(shared, configs[name]), metadata={**(metadata or {}), "member": name})
            for name in self.names
        )

    def named_members(self) -> list[tuple[str, MemberModule]]:
        return list(zip(self.names, self.members))

    # Callbacks written for one SAE (sparsity plots, feature visualization, dataset examples) read these:
    # they see the first member.
    @property
    def sae(self):
        return self.members[0].sae

    @property
    def input_scale(self) -> Tensor:
        return self.members[0].input_scale

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        for member in self.members:
            member.trainer = self.trainer  # members read max_steps, global_step and the datamodule from it
            member.resuming = getattr(self, "resuming", False)
            member.setup(stage)

    def configure_optimizers(self):
        groups = [{"params": list(m.sae.parameters()), "lr": m.lr, "betas": m.betas} for m in self.members]
        fused = all(p.device.type in ("cpu", "cuda") for m in self.members for p in m.sae.parameters()) or None
        optimizer = torch.optim.Adam(groups, fused=fused)  # as SAEModule: one kernel per parameter
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        schedules = [
            (lambda step, m=m: lr_factor(step, m.lr_warmup_steps, total, m.lr_decay_fraction)) for m in self.members
        ]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _relog(self) -> None:
        """Log what each member recorded, under its prefix."""
        for name, member in self.named_members():
            for key, value, options in member.logged:
                if key == "loss":  # the progress-bar loss: one entry per member would crowd the bar
                    continue
                self.log(f"{name}/{key}", value, **options)
            member.logged.clear()

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Any]:
        """Every member's step on the same (B, d_in) batch. Returns the summed loss, each member's outputs
        under "members", and the first member's x, x_hat, f (for callbacks written for one SAE)."""
        outputs = {name: member.training_step(batch, batch_idx) for name, member in self.named_members()}
        self._relog()
        loss = torch.stack([out["loss"] for out in outputs.values()]).sum()
        self.log("loss", loss, prog_bar=True, logger=False)
        first = next(iter(outputs.values()))
        return {"loss": loss, "members": outputs, "x": first["x"], "x_hat": first["x_hat"], "f": first["f"]}

    def on_before_optimizer_step(self, optimizer) -> None:
        for member in self.members:
            member.on_before_optimizer_step(optimizer)

    def on_train_batch_end(self, outputs, batch: Tensor, batch_idx: int) -> None:
        for name, member in self.named_members():
            member.on_train_batch_end(outputs["members"][name], batch, batch_idx)
        self._relog()

    # -- validation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        for member in self.members:
            member.on_validation_epoch_start()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        for member in self.members:
            member.validation_step(batch, batch_idx)
        self._relog()

    def on_validation_epoch_end(self) -> None:
        for member in self.members:
            member.on_validation_epoch_end()
        self._relog()

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.members[0].on_save_checkpoint(checkpoint)  # the global RNG states, as a single run saves them

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_checkpoint(self, checkpoint)

    def check_resumable(self, checkpoint: dict[str, Any], name: str = "the checkpoint") -> None:
        """Raise ResumeMismatchError unless `checkpoint` holds these members, each with the same SAE."""
        saved = checkpoint.get("hyper_parameters", {})
        theirs = list(member_configs(saved.get("members"), saved.get("sweep"))) if "d_in" in saved else None
        if theirs != self.names:
            raise ResumeMismatchError(f"{name} holds the sweep members {theirs}, this run has {self.names}; resume "
                                      "with the original sae.members / sae.sweep.")
        state = checkpoint.get("state_dict", {})
        for i, (member_name, member) in enumerate(self.named_members()):
            prefix = f"members.{i}."
            sub = {"hyper_parameters": {"architecture": member.hparams.architecture, "metadata": saved.get("metadata")},
                   "state_dict": {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}}
            member.check_resumable(sub, name=f"{name} (member {member_name})")

    # -- export ---------------------------------------------------------------------------------------
    def export(self, directory: str | Path, **metadata: Any) -> None:
        """Write each member to `directory/members/<name>/` (sae.safetensors + sae.json) and list them in
        `directory/members.json`."""
        directory = Path(directory)
        for name, member in self.named_members():
            member.export(directory / "members" / name, **metadata)
        index = {"members": {name: f"members/{name}" for name in self.names}}
        atomic_write_bytes(directory / "members.json", json.dumps(index, indent=1).encode())
