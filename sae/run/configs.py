"""Config groups generated from the project's own data instead of copied into files.

``layer``: one option per layer of ``sae.model.layers.LAYERS`` (``layer=mixed3b``), holding its name and channel
count, stored in Hydra's ConfigStore so the names, the channel counts and the list of choices (tab completion,
the "available options" of an unknown name) come from the one description of the network.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from sae.model.layers import LAYERS, layer_channels


def register_configs() -> None:
    """Store the generated groups; idempotent (ConfigStore replaces an entry of the same name)."""
    store = ConfigStore.instance()
    for name in LAYERS:
        store.store(group="layer", name=name, node={"name": name, "channels": layer_channels(name)},
                    provider="inception-sae")

