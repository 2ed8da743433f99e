"""Training: the ELBO loop, evaluation, atomic checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    evaluate,
    finetune_config,
    fit,
    kl_beta,
    lr_at,
    predict,
)

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
    "predict",
    "save_checkpoint",
]
