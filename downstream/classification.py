"""Classification fine-tuning: ``python downstream/classification.py [key=value ...]``.

Configuration: ``configs/classification.yaml`` (``dino_weights=results/dino_demo/checkpoints/
backbone.pt``, ``train_mode=linear``, ``label_fraction=0.1``, ``test_ckpt=PATH``).
"""

import hydra
from omegaconf import DictConfig

from medssl.run import register_configs, run_script

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="classification")
def main(cfg: DictConfig) -> None:
    run_script(cfg)


if __name__ == "__main__":
    main()
