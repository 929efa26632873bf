"""medssl: self-supervised pre-training and fine-tuning for 3D medical imaging."""

__version__ = "0.1.0"
