"""Masked-autoencoder pre-training on volumes: ``python self_supervised/mae3d.py [key=value ...]``.

Configuration: ``configs/mae3d.yaml`` (``backbone=unet3d mae_cfg.mask_percentage=0.5``).
"""

import hydra
from omegaconf import DictConfig

from medssl.run import register_configs, run_script

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="mae3d")
def main(cfg: DictConfig) -> None:
    run_script(cfg)


if __name__ == "__main__":
    main()
