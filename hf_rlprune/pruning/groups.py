"""Prunable groups of our models: which parameter slices make up each unit, and what consumes the unit's output.

A *group* is one layer's set of interchangeable units (conv output channels, dense neurons, LSTM hidden units,
embedding dimensions). Each unit owns slices of "producer" tensors (removing the unit removes them; masking
zeroes them) and one input slice of each "consumer" tensor (the next layer's weights that read the unit).
The output layer is never a group.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import (
    RLPruneCNNConfig,
    RLPruneCNNForImageClassification,
    RLPruneLSTMConfig,
    RLPruneLSTMForSequenceClassification,
)

SUPPORTED_MODELS = (RLPruneCNNForImageClassification, RLPruneLSTMForSequenceClassification)


@dataclass(frozen=True)
class TensorSlice:
    """Rows (dim=0) or columns (dim=1) of `name` that belong to the units of a group.

    `unit_stride`/`repeats` describe how one unit maps to several indices: an LSTM unit j owns gate rows
    j, H+j, 2H+j, 3H+j (repeats=4, unit_stride=H); a conv channel c read by a dense layer after flattening owns
    columns c*S .. c*S+S-1 (block=S, the spatial size).
    """

    name: str
    dim: int
    repeats: int = 1
    unit_stride: int = 0
    block: int = 1

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Indices along `dim` covered by `units` (a 1-D long tensor of unit ids), in order."""
        offsets = torch.arange(self.block, device=units.device)
        per_block = (units[:, None] * self.block + offsets[None, :]).reshape(-1)  # (U * block,)
        repeat_offsets = torch.arange(self.repeats, device=units.device) * self.unit_stride * self.block
        return (repeat_offsets[:, None] + per_block[None, :]).reshape(-1)  # (repeats * U * block,)


@dataclass(frozen=True)
class PrunableGroup:
    name: str  # module path of the layer whose units are pruned, e.g. "conv_blocks.1"
    kind: str  # "conv", "dense", "lstm" or "embedding"
    config_field: str  # config list (or int) that records this group's width
    config_index: int | None  # position in that list; None when the field is an int
    width: int
    producers: tuple[TensorSlice, ...] = field(default_factory=tuple)
    consumers: tuple[TensorSlice, ...] = field(default_factory=tuple)
    internal: tuple[TensorSlice, ...] = field(default_factory=tuple)  # e.g. an LSTM's recurrent columns


def unsupported(model_or_config, what: str = "prune") -> TypeError:
    """The error for a model or config hf_rlprune does not know: `what` it cannot do, and the fix."""
    config = getattr(model_or_config, "config", model_or_config)
    name = type(model_or_config).__name__
    if getattr(config, "model_type", None) in (RLPruneCNNConfig.model_type, RLPruneLSTMConfig.model_type):
        # the same model, but the class transformers imported from the checkpoint's own code (trust_remote_code)
        return TypeError(
            f"hf_rlprune cannot {what} this {name}: it is the copy of the class that transformers loaded from the "
            f"checkpoint's code ({type(model_or_config).__module__}), not hf_rlprune's own. Import hf_rlprune before "
            "loading the model, so the Auto classes use its registered classes, and load it again."
        )
    return TypeError(f"hf_rlprune cannot {what} a {name}: it knows RLPruneCNNForImageClassification and "
                     "RLPruneLSTMForSequenceClassification only. Build your model from RLPruneCNNConfig or RLPruneLSTMConfig.")


def check_supported(model: nn.Module) -> None:
    if not isinstance(model, SUPPORTED_MODELS):
        raise unsupported(model)


def get_prunable_groups(model_or_config) -> list[PrunableGroup]:
    """The prunable groups, in forward order, of a model (or of its config)."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    if isinstance(model_or_config, nn.Module):
        check_supported(model_or_config)
    if isinstance(config, RLPruneCNNConfig):
        return _cnn_groups(config)
    if isinstance(config, RLPruneLSTMConfig):
        return _lstm_groups(config)
    raise unsupported(config, "find the prunable layers of")


def _dense_consumers(config, hidden_index: int) -> tuple[TensorSlice, ...]:
    """What reads dense layer `hidden_index` (or the flattened/last features when it is -1)."""
    nxt = hidden_index + 1
    name = f"hidden_layers.{nxt}.weight" if nxt < len(config.hidden_sizes) else "classifier.weight"
    return (TensorSlice(name, dim=1),)


def _dense_groups(config) -> list[PrunableGroup]:
    groups = []
    for idx, width in enumerate(config.hidden_sizes):
        prefix = f"hidden_layers.{idx}"
        groups.append(
            PrunableGroup(
                name=prefix,
                kind="dense",
                config_field="hidden_sizes",
                config_index=idx,
                width=width,
                producers=(TensorSlice(f"{prefix}.weight", 0), TensorSlice(f"{prefix}.bias", 0)),
                consumers=_dense_consumers(config, idx),
            )
        )
    return groups


def _cnn_groups(config: RLPruneCNNConfig) -> list[PrunableGroup]:
    groups = []
    last = len(config.conv_channels) - 1
    final_area = config.feature_map_sizes()[-1] ** 2
    for idx, width in enumerate(config.conv_channels):
        prefix = f"conv_blocks.{idx}"
        producers = [TensorSlice(f"{prefix}.conv.weight", 0), TensorSlice(f"{prefix}.conv.bias", 0)]
        if config.use_batch_norm:
            producers += [TensorSlice(f"{prefix}.norm.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")]
        if idx < last:
            consumers = (TensorSlice(f"conv_blocks.{idx + 1}.conv.weight", 1),)
        else:  # flatten: channel c owns a block of H*W consecutive features
            reader = "hidden_layers.0.weight" if config.hidden_sizes else "classifier.weight"
            consumers = (TensorSlice(reader, 1, block=final_area),)
        groups.append(PrunableGroup(prefix, "conv", "conv_channels", idx, width, tuple(producers), consumers))
    return groups + _dense_groups(config)


def _lstm_groups(config: RLPruneLSTMConfig) -> list[PrunableGroup]:
    groups = [
        PrunableGroup(
            name="embeddings",
            kind="embedding",
            config_field="embedding_dim",
            config_index=None,
            width=config.embedding_dim,
            producers=(TensorSlice("embeddings.weight", 1),),
            consumers=(TensorSlice("lstm_layers.0.weight_ih_l0", 1),),
        )
    ]
    last = len(config.lstm_hidden_sizes) - 1
    for idx, hidden in enumerate(config.lstm_hidden_sizes):
        prefix = f"lstm_layers.{idx}"
        producers = tuple(
            TensorSlice(f"{prefix}.{param}_l0", 0, repeats=4, unit_stride=hidden)
            for param in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        if idx < last:
            consumers = (TensorSlice(f"lstm_layers.{idx + 1}.weight_ih_l0", 1),)
        else:
            reader = "hidden_layers.0.weight" if config.hidden_sizes else "classifier.weight"
            consumers = (TensorSlice(reader, 1),)
        internal = (TensorSlice(f"{prefix}.weight_hh_l0", 1),)
        groups.append(PrunableGroup(prefix, "lstm", "lstm_hidden_sizes", idx, hidden, producers, consumers, internal))
    return groups + _dense_groups(config)


def group_widths(model_or_config) -> dict[str, int]:
    return {group.name: group.width for group in get_prunable_groups(model_or_config)}


WIDTH_FIELDS = ("conv_channels", "hidden_sizes", "lstm_hidden_sizes", "embedding_dim")


def width_fields(config, widths: dict[str, int] | None) -> dict:
    """The config's width fields (lists copied) with `widths` (group name -> kept units) substituted, checked."""
    fields = {
        name: list(getattr(config, name)) if isinstance(getattr(config, name), list) else getattr(config, name)
        for name in WIDTH_FIELDS
        if hasattr(config, name)
    }
    if not widths:
        return fields
    groups = {group.name: group for group in get_prunable_groups(config)}
    unknown = sorted(set(widths) - set(groups))
    if unknown:
        raise KeyError(f"Unknown prunable group(s) {unknown}; this model's groups are {list(groups)}.")
    for name, width in widths.items():
        group = groups[name]
        if not 1 <= int(width) <= group.width:
            raise ValueError(f"Width {width} for group {name!r} must be in [1, {group.width}].")
        if group.config_index is None:
            fields[group.config_field] = int(width)
        else:
            fields[group.config_field][group.config_index] = int(width)
    return fields


def config_with_widths(config, widths: dict[str, int]):
    """A copy of `config` whose per-layer widths are `widths` (group name -> kept units)."""
    values = {**config.to_dict(), **width_fields(config, widths)}
    for key in ("auto_map", "transformers_version"):
        values.pop(key, None)
    return type(config).from_dict(values)
