"""Training DeCaFA: `TrainConfig` (every setting, checked), `Trainer` (the loop; `train.train(config)` runs it
inside torchrun's process group when there is one), checkpoints with exact resume, and the ablation grid."""
from .config import PRESETS, ConfigError, TrainConfig
from .trainer import Trainer

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "Trainer"]
