"""hf_rlprune: structured pruning of Hugging Face models with a PPO agent, as a Trainer callback."""

from .models import (
    RLPruneCNNConfig,
    RLPruneCNNForImageClassification,
    RLPruneLSTMConfig,
    RLPruneLSTMForSequenceClassification,
)

from .callback import RLPruneCallback
from .config import RLPruneConfig
from .distillation import DistillationTrainer
from .env import PruningEnv, PruningVectorEnv
from .pruning import (
    LatencyTable,
    apply_masks,
    compact,
    compute_flops,
    compute_macs,
    count_parameters,
    get_prunable_groups,
    masks_from_widths,
    measure_latency,
    widths_from_keep_ratios,
)

__version__ = "0.1.0"

__all__ = [
    "DistillationTrainer",
    "LatencyTable",
    "PruningEnv",
    "PruningVectorEnv",
    "RLPruneCallback",
    "RLPruneConfig",
    "apply_masks",
    "compact",
    "compute_flops",
    "compute_macs",
    "count_parameters",
    "get_prunable_groups",
    "masks_from_widths",
    "measure_latency",
    "widths_from_keep_ratios",
    "RLPruneCNNConfig",
    "RLPruneCNNForImageClassification",
    "RLPruneLSTMConfig",
    "RLPruneLSTMForSequenceClassification",
]
