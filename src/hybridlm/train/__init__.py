"""Training: typed config, the loop, AdamW and schedules, checkpoints, FSDP2 distribution.

    from hybridlm.train import TrainConfig, train
    result = train(TrainConfig.from_yaml("configs/ladder/hybrid-60m.yaml", ["trainer.steps=100"]), "runs/demo")
"""

from hybridlm.train.checkpoint import (
    CheckpointWriteError,
    latest_checkpoint,
    list_checkpoints,
    load_model_from_run_dir,
)
from hybridlm.train.config import (
    ConfigError,
    DataSection,
    ModelSection,
    OptimizerSection,
    ScheduleSection,
    TrainConfig,
    TrainerSection,
)
from hybridlm.train.trainer import TrainingError, TrainResult, train

__all__ = [
    "CheckpointWriteError",
    "ConfigError",
    "DataSection",
    "ModelSection",
    "OptimizerSection",
    "ScheduleSection",
    "TrainConfig",
    "TrainResult",
    "TrainerSection",
    "TrainingError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_from_run_dir",
    "train",
]
