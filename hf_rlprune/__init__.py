"""hf_rlprune: structured pruning of Hugging Face models with a PPO agent, as a Trainer callback."""

from .models import (
    RLPruneCNNConfig,
    RLPruneCNNForImageClassification,
    RLPruneLSTMConfig,
    RLPruneLSTMForSequenceClassification,
)

__version__ = "0.1.0"

__all__ = [
    "RLPruneCNNConfig",
    "RLPruneCNNForImageClassification",
    "RLPruneLSTMConfig",
    "RLPruneLSTMForSequenceClassification",
]
