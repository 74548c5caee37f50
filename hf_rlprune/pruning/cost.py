"""Analytic cost of our models: MACs and parameters per sample, from the config and the (masked) widths.

What is counted as a MAC: the multiply-adds of convolutions, dense layers and the LSTM's input and recurrent
matrix products (4 gates x (input + hidden) x hidden per time step, times the sequence length). Not counted:
biases, batch norm, activations, pooling, the LSTM's element-wise gate arithmetic and embedding lookups, which
are memory-bound and small. FLOPs = 2 x MACs. The one source of truth for cost: the environment, the callback,
the card and the benchmarks all call these functions.
"""

from torch import nn

from ..models import RLPruneCNNConfig, RLPruneLSTMConfig
from .groups import group_widths, unsupported, width_fields
from .masks import masked_widths


def _layer_widths(model_or_config, widths) -> tuple:
    """(config, widths by config field) with `widths` (group name -> units) substituted.

    The cost functions run in the environment's inner loop, so this avoids building a new config per call.
    """
    if isinstance(model_or_config, nn.Module):
        config = model_or_config.config
        widths = masked_widths(model_or_config) if widths is None else widths
    else:
        config = model_or_config
    fields = width_fields(config, widths)
    return config, fields


def _dense_macs(first_in: int, hidden_sizes: list[int], num_outputs: int) -> int:
    sizes = [first_in] + list(hidden_sizes) + [num_outputs]
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def _dense_params(first_in: int, hidden_sizes: list[int], num_outputs: int) -> int:
    sizes = [first_in] + list(hidden_sizes) + [num_outputs]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _cnn_conv_output_sizes(config: RLPruneCNNConfig) -> list[int]:
    """Spatial size of each conv's output, before its pool."""
    sizes, size = [], config.image_size
    for idx in range(len(config.conv_channels)):
        size = size - (config.kernel_size - 1) if config.padding == "valid" else size
        sizes.append(size)
        if idx in config.pool_after:
            size //= 2
    return sizes


def compute_macs(model_or_config, seq_len: int | None = None, widths: dict[str, int] | None = None) -> int:
    """Multiply-accumulates for one sample (one sequence of `seq_len` tokens for the LSTM, default its max length).

    Takes a model (its masks count: masked units cost nothing) or a config; `widths` overrides group widths.
    """
    config, fields = _layer_widths(model_or_config, widths)
    if isinstance(config, RLPruneCNNConfig):
        channels = fields["conv_channels"]
        k2 = config.kernel_size**2
        in_channels = [config.num_channels] + channels[:-1]
        conv = sum(c_out * size * size * c_in * k2 for c_in, c_out, size in zip(in_channels, channels, _cnn_conv_output_sizes(config)))
        flat = channels[-1] * config.feature_map_sizes()[-1] ** 2
        return conv + _dense_macs(flat, fields["hidden_sizes"], config.num_labels)
    if isinstance(config, RLPruneLSTMConfig):
        seq_len = config.max_seq_length if seq_len is None else seq_len
        if seq_len < 1:
            raise ValueError(f"seq_len = {seq_len} must be >= 1.")
        hidden = fields["lstm_hidden_sizes"]
        inputs = [fields["embedding_dim"]] + hidden[:-1]
        per_step = sum(4 * h * (i + h) for i, h in zip(inputs, hidden))
        return seq_len * per_step + _dense_macs(hidden[-1], fields["hidden_sizes"], 1)
    raise unsupported(config, "count the cost of")


def compute_flops(model_or_config, seq_len: int | None = None, widths: dict[str, int] | None = None) -> int:
    """FLOPs for one sample, counted as 2 x MACs (a multiply and an add)."""
    return 2 * compute_macs(model_or_config, seq_len=seq_len, widths=widths)


def count_parameters(model_or_config, widths: dict[str, int] | None = None) -> int:
    """Trainable parameters of the model as compacted (masked units excluded); BN running stats not counted."""
    config, fields = _layer_widths(model_or_config, widths)
    if isinstance(config, RLPruneCNNConfig):
        channels = fields["conv_channels"]
        k2 = config.kernel_size**2
        in_channels = [config.num_channels] + channels[:-1]
        conv = sum(c_out * c_in * k2 + c_out for c_in, c_out in zip(in_channels, channels))
        norm = 2 * sum(channels) if config.use_batch_norm else 0
        flat = channels[-1] * config.feature_map_sizes()[-1] ** 2
        return conv + norm + _dense_params(flat, fields["hidden_sizes"], config.num_labels)
    if isinstance(config, RLPruneLSTMConfig):
        hidden = fields["lstm_hidden_sizes"]
        inputs = [fields["embedding_dim"]] + hidden[:-1]
        lstm = sum(4 * h * (i + h) + 8 * h for i, h in zip(inputs, hidden))
        embedding = config.vocab_size * fields["embedding_dim"]
        return embedding + lstm + _dense_params(hidden[-1], fields["hidden_sizes"], 1)
    raise unsupported(config, "count the cost of")


def trade_off_score(accuracy: float, flops: int) -> float:
    """The experiment plan's trade-off score: accuracy / FLOPs, reported per GFLOP so it reads as a number."""
    if flops <= 0:
        raise ValueError(f"flops = {flops} must be > 0: the trade-off score divides accuracy by GFLOPs.")
    return accuracy / (flops / 1e9)


def pruning_ratios(dense, pruned_widths: dict[str, int] | None = None, seq_len: int | None = None) -> dict[str, float]:
    """Fractions removed from the dense `dense` (model or config) by `pruned_widths` (default: its masks):
    of prunable units, of MACs and of parameters."""
    dense_config = dense.config if isinstance(dense, nn.Module) else dense
    if pruned_widths is None:
        pruned_widths = masked_widths(dense) if isinstance(dense, nn.Module) else group_widths(dense_config)
    dense_units = sum(group_widths(dense_config).values())
    kept_units = sum(pruned_widths.get(name, width) for name, width in group_widths(dense_config).items())
    return {
        "units_removed": 1.0 - kept_units / dense_units,
        "macs_removed": 1.0 - compute_macs(dense_config, seq_len, pruned_widths) / compute_macs(dense_config, seq_len, {}),
        "params_removed": 1.0 - count_parameters(dense_config, pruned_widths) / count_parameters(dense_config, {}),
    }
