"""K SAEs trained side by side on one activation stream (`sae=multi`): a sweep that extracts once.

    python train.py sae=multi sae.sweep.l1_coefficient=[0.1,0.2,0.4,0.8]
    python train.py sae=multi 'sae.members=[{architecture: topk, k: 16}, {architecture: topk, k: 64}]'

Each member is a complete `SAETrainingState` (its own input scale, dead-feature counters, resampling, schedules
and export), trained by `SAETrainer` exactly as `SAEModule` trains its one: every member steps exactly as a
separate run would. What is shared is the stream: the images are decoded and InceptionV1 runs once per batch
instead of K times.

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

from sae.nn import ARCHITECTURES, SAEConfigError
from sae.nn.io import atomic_write_bytes
from sae.train.module import SAETrainer, plain
from sae.train.state import SAETrainingState

log = logging.getLogger(__name__)


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
    trainer_keys = set(inspect.signature(SAETrainingState.__init__).parameters)
    accepted = set(inspect.signature(ARCHITECTURES[architecture].__init__).parameters)
    return {k: v for k, v in kwargs.items() if k in trainer_keys or k in accepted or k in overrides}


class MultiSAEModule(SAETrainer):
    """Trains K SAEs on the same batches. Keyword arguments are the shared SAE configuration (as for
    `SAEModule`); `members` / `sweep` give each member's overrides of it (see `member_configs`)."""

    def __init__(self, d_in: int, members: Sequence[Mapping] | None = None, sweep: Mapping | None = None,
                 metadata: dict | None = None, **shared: Any):
        super().__init__()
        members, sweep, metadata, shared = plain(members), plain(sweep), plain(metadata), plain(shared)
        self.save_hyperparameters(logger=False)  # the logger gets the resolved run config once (train.py)
        configs = member_configs(members, sweep)
        self.names = list(configs)
        for name in self.names:
            self.members.append(SAETrainingState(d_in, **member_kwargs(shared, configs[name]),
                                                 metadata={**(metadata or {}), "member": name}))

    def export(self, directory: str | Path, **metadata: Any) -> Path:
        """Write each member to `directory/members/<name>/` (sae.safetensors + sae.json) and list them in
        `directory/members.json` (returned)."""
        directory = Path(directory)
        for name, member in self.named_members():
            member.export(directory / "members" / name, self.global_step, **metadata)
        index = {"members": {name: f"members/{name}" for name in self.names}}
        atomic_write_bytes(directory / "members.json", json.dumps(index, indent=1).encode())
        return directory / "members.json"
