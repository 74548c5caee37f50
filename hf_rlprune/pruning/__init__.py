"""Structured pruning: prunable groups, importance, masks, physical compaction and cost (MACs, params, latency)."""

from .compact import compact
from .cost import compute_flops, compute_macs, count_parameters, pruning_ratios, trade_off_score
from .groups import (
    PrunableGroup,
    TensorSlice,
    check_supported,
    config_with_widths,
    get_prunable_groups,
    group_widths,
)
from .importance import IMPORTANCE_CRITERIA, TaylorAccumulator, unit_scores
from .latency import compare_latency, LatencyResult, example_inputs, export_module_onnx, export_onnx, measure_latency, time_forward
from .latency_table import LatencyTable, latency_hardware
from .masks import (
    apply_masks,
    mask_multipliers,
    enforce_masks,
    get_masks,
    masked_widths,
    masks_from_widths,
    remove_masks,
    validate_masks,
    widths_from_keep_ratios,
)

__all__ = [
    "IMPORTANCE_CRITERIA",
    "LatencyResult",
    "LatencyTable",
    "PrunableGroup",
    "TaylorAccumulator",
    "TensorSlice",
    "apply_masks",
    "mask_multipliers",
    "check_supported",
    "compact",
    "compare_latency",
    "compute_flops",
    "compute_macs",
    "config_with_widths",
    "count_parameters",
    "enforce_masks",
    "example_inputs",
    "export_module_onnx",
    "export_onnx",
    "get_masks",
    "get_prunable_groups",
    "group_widths",
    "latency_hardware",
    "masked_widths",
    "masks_from_widths",
    "measure_latency",
    "pruning_ratios",
    "remove_masks",
    "time_forward",
    "trade_off_score",
    "unit_scores",
    "validate_masks",
    "widths_from_keep_ratios",
]
