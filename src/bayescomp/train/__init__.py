"""Training: the ELBO loop, evaluation, atomic checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, finetune_config, kl_beta, lr_at, mean_config
from .diverge import TrainingDivergedError
from .loop import TrainResult, evaluate, fit, predict

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "evaluate",
    "finetune_config",
    "fit",
    "kl_beta",
    "lr_at",
    "load_checkpoint",
    "mean_config",
    "predict",
    "save_checkpoint",
]
