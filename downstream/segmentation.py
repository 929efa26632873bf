"""Segmentation fine-tuning, 3D or 2D: ``python downstream/segmentation.py [key=value ...]``.

Configuration: ``configs/segmentation.yaml`` (``dino_weights=results/dino_demo/backbone.pt``,
``spatial_dims=2``, ``backbone=unet3d``, ``test_ckpt=PATH``, ``predict_csv=PATH``).
"""

import hydra
from omegaconf import DictConfig

from medssl.run import register_configs, run_script

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="segmentation")
def main(cfg: DictConfig) -> None:
    run_script(cfg)


if __name__ == "__main__":
    main()
