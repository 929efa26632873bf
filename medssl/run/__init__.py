"""The run layer every entry script shares: config schema, results folder, weights, trainer.

An entry script composes its config with Hydra and calls ``run_script(cfg)`` (``run``, printing
input errors without a traceback); call ``register_configs()`` once before composing.
"""

from medssl.run.config import compose_config, register_configs
from medssl.run.harness import run, run_script

__all__ = ["compose_config", "register_configs", "run", "run_script"]
