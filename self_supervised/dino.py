"""DINO self-supervised pre-training: ``python self_supervised/dino.py [key=value ...]``.

Configuration: ``configs/dino.yaml`` (``batch_size=16 lr=0.001 backbone=unet3d preset=oai``).
"""

import hydra
from omegaconf import DictConfig

from medssl.run import register_configs, run_script

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="dino")
def main(cfg: DictConfig) -> None:
    run_script(cfg)


if __name__ == "__main__":
    main()
