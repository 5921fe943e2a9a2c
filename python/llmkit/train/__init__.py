"""llmkit.train: the pretraining loop (:class:`Trainer`), its configuration,
checkpoints and torchrun support. ``llmkit pretrain`` is its command line."""
from .config import TrainConfig
from .optim import WarmupCosine, build_adamw, param_groups
from .trainer import ObjectiveModule, SampleOrder, Trainer

__all__ = ["Trainer", "TrainConfig", "ObjectiveModule", "SampleOrder", "WarmupCosine", "build_adamw",
           "param_groups"]
