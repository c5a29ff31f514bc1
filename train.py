"""Train an SAE on an InceptionV1 layer: python train.py layer=mixed3b sae.expansion=8

Outputs, in the run directory: checkpoints/, config_resolved.yaml, sae.safetensors and sae.json.
Returns `optimized_metric` to Hydra sweepers.
"""

from __future__ import annotations

import logging
import sys

import hydra
import lightning as L
import yaml
from omegaconf import DictConfig

from sae.launch import build_callbacks, build_logger, check_writable, close_logger, random_weights, run_config
from sae.nn.io import atomic_write_bytes

log = logging.getLogger("sae")


def train(cfg: DictConfig) -> float | None:
    out_dir = check_writable(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if random_weights(cfg):
        log.warning("model.pretrained=false: InceptionV1 has RANDOM weights; its features mean nothing.")
    datamodule = hydra.utils.instantiate(cfg.data)
    config = run_config(cfg)
    metadata = {"layer": cfg.layer.name, "model_weights": config["model_weights"], "data": cfg.data._target_}
    module = hydra.utils.instantiate(cfg.sae, d_in=datamodule.d_in, metadata=metadata)
    atomic_write_bytes(out_dir / "config_resolved.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    logger = build_logger(cfg)
    try:
        trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, callbacks=build_callbacks(cfg))
        if logger:
            logger.log_hyperparams(config)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if trainer.is_global_zero:
            module.export(out_dir)
            log.info("exported %s", out_dir / "sae.safetensors")
        value = trainer.callback_metrics.get(cfg.optimized_metric)
        return None if value is None else float(value)
    finally:
        close_logger(logger)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from sae.errors import user_error

    try:
        return train(cfg)
    except Exception as e:
        if (bad_input := user_error(e)) is None:
            raise
        log.error("%s: %s", type(bad_input).__name__, bad_input)  # one clear line, no traceback
        sys.exit(2)


if __name__ == "__main__":
    main()
