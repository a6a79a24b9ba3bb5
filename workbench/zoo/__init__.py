"""The model zoo: small transformers trained on synthetic tasks whose circuits are known."""

from workbench.zoo.train import ZOO_TASKS, TrainConfig, train_zoo_model

__all__ = ["ZOO_TASKS", "TrainConfig", "train_zoo_model"]
