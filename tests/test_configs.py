"""Every option of every config group composes, resolves and (for the SAE and the logger) instantiates.

A new option in conf/ is covered here without being listed: the groups and their options are read from Hydra's
own config loader, the generated `layer` group included.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from sae.model.layers import LAYERS, layer_channels
from sae.train import SAETrainingState

REPO = Path(__file__).resolve().parents[1]

# Options that need a value only the user can give (a data set's path), with a stand-in for the test.
REQUIRED = {"data=imagefolder": ["data.root=/nonexistent"], "data=vectors": ["data.path=/nonexistent.npy"],
            "sae=multi": ["sae.sweep.l1_coefficient=[0.1,0.3]"]}


# Groups merged into another node: their override key names the package too.
PACKAGED = {"optim": "optim@sae"}


def _options(config_name: str) -> list[str]:
    """`group=option` for every option of every group reachable from `config_name`'s folder."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = sorted(g for g in loader.list_groups("") if g not in ("hydra",))
        found = [f"{PACKAGED.get(g, g)}={o}" for g in groups for o in loader.get_group_options(g)]
        found += [f"hydra/launcher={o}" for o in loader.get_group_options("hydra/launcher")]
    return found


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a real run
    return cfg


# The layer group is generated from one list (checked whole below); a few kinds of layer are composed here.
LAYER_SAMPLE = {"layer=conv2d0", "layer=mixed3b", "layer=mixed5b", "layer=mixed4a_3x3_pre_relu_conv", "layer=maxpool4"}
TRAIN_OPTIONS = [o for o in _options("config") if not o.startswith(("eval=", "layer=")) or o in LAYER_SAMPLE]


@pytest.mark.parametrize("option", TRAIN_OPTIONS)
def test_train_config__every_option_composes_and_resolves(option):
    cfg = _compose("config", [option, *REQUIRED.get(option, [])])
    cfg_no_hydra = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(cfg_no_hydra, resolve=True, throw_on_missing=False)
    assert cfg.layer.channels == layer_channels(cfg.layer.name)


@pytest.mark.parametrize("option", [o for o in _options("evaluate") if o.split("=")[0] in ("eval", "data", "logger")])
def test_evaluate_config__every_option_composes(option):
    """`data` and `logger` are read as overrides of the evaluated run's own config, so only `eval` resolves alone."""
    cfg = _compose("evaluate", [option, *REQUIRED.get(option, [])])
    OmegaConf.to_container(cfg.eval, resolve=True, throw_on_missing=False)


def test_layer_group__is_generated_from_the_network_description():
    layer_options = [o.split("=")[1] for o in _options("config") if o.startswith("layer=")]
    assert sorted(layer_options) == sorted(LAYERS)
    cfg = _compose("config", ["layer=mixed4a"])
    assert (cfg.layer.name, cfg.layer.channels, cfg.model.layer) == ("mixed4a", 508, "mixed4a")


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "multi"])
def test_sae_options__instantiate_with_their_config(arch):
    cfg = _compose("config", [f"sae={arch}", "sae.d_sae=32", *REQUIRED.get(f"sae={arch}", [])])
    module = hydra.utils.instantiate(cfg.sae, d_in=16)
    assert module is not None


def test_sae_module__python_defaults_equal_the_configs():
    """A notebook user who builds SAEModule(d_in) gets what `python train.py` gets: its one SAETrainingState
    holds the defaults."""
    cfg = _compose("config", ["sae=relu"])
    defaults = {name: p.default for name, p in inspect.signature(SAETrainingState.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for key in ("lr", "betas", "lr_warmup_steps", "lr_decay_fraction", "b_dec_init", "init_sample",
                "sparsity_warmup_steps", "dead_window"):
        assert defaults[key] == (tuple(cfg.sae[key]) if key == "betas" else cfg.sae[key]), key
