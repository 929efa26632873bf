"""Masked-autoencoder pre-training on slices: ``python self_supervised/mae2d.py [key=value ...]``.

Configuration: ``configs/mae2d.yaml`` (``batch_size=64 mae_cfg.cuboid_size=[16,16]``).
"""

import hydra
from omegaconf import DictConfig

from medssl.run import register_configs, run_script

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="mae2d")
def main(cfg: DictConfig) -> None:
    run_script(cfg)


if __name__ == "__main__":
    main()
