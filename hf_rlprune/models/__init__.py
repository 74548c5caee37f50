"""The prunable reference models, registered with the Auto classes on import.

Each model lives in its own folder (configuration + modeling file) that imports nothing else from hf_rlprune, so
`save_pretrained` can copy it next to the weights and `trust_remote_code=True` loads it without this package.
"""

from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

from .rlprune_cnn import CIFAR10_LABELS, RLPruneCNNConfig, RLPruneCNNForImageClassification
from .rlprune_lstm import RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification

AutoConfig.register(RLPruneCNNConfig.model_type, RLPruneCNNConfig, exist_ok=True)
AutoConfig.register(RLPruneLSTMConfig.model_type, RLPruneLSTMConfig, exist_ok=True)
AutoModelForImageClassification.register(RLPruneCNNConfig, RLPruneCNNForImageClassification, exist_ok=True)
AutoModelForSequenceClassification.register(RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification, exist_ok=True)
# Writes `auto_map` into saved configs and copies the model files beside the weights.
RLPruneCNNConfig.register_for_auto_class()
RLPruneCNNForImageClassification.register_for_auto_class("AutoModelForImageClassification")
RLPruneLSTMConfig.register_for_auto_class()
RLPruneLSTMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "CIFAR10_LABELS",
    "RLPruneCNNConfig",
    "RLPruneCNNForImageClassification",
    "RLPruneLSTMConfig",
    "RLPruneLSTMForSequenceClassification",
]
