"""The reference CIFAR-10 CNN as a PreTrainedModel: convs (+ optional batch norm) with 2x2 pools, then dense layers.

Self-contained on purpose: a saved model loads with `trust_remote_code=True` where hf_rlprune is not installed.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

try:  # transformers >= 5 tracks which tensors were initialized; fall back to torch's init on older releases
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

from .configuration_rlprune_cnn import RLPruneCNNConfig


class RLPruneCNNConvBlock(nn.Module):
    """conv -> (batch norm) -> ReLU -> (2x2 max-pool)."""

    def __init__(self, in_channels: int, out_channels: int, config: RLPruneCNNConfig, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, config.kernel_size, padding=config.padding)
        self.norm = nn.BatchNorm2d(out_channels) if config.use_batch_norm else nn.Identity()
        self.activation = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pool(self.activation(self.norm(self.conv(hidden_states))))


class RLPruneCNNPreTrainedModel(PreTrainedModel):
    config_class = RLPruneCNNConfig
    base_model_prefix = "rlprune_cnn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["RLPruneCNNConvBlock"]
    # The loss is a mean over the batch (num_items_in_batch is not used): the Trainer must divide it by the
    # gradient-accumulation steps itself, which it skips for a forward taking **kwargs unless told.
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # torch's own Linear default, as in transformers' ResNet
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)


class RLPruneCNNForImageClassification(RLPruneCNNPreTrainedModel):
    def __init__(self, config: RLPruneCNNConfig):
        super().__init__(config)
        in_channels = [config.num_channels] + config.conv_channels[:-1]
        self.conv_blocks = nn.ModuleList(
            RLPruneCNNConvBlock(c_in, c_out, config, pool=idx in config.pool_after)
            for idx, (c_in, c_out) in enumerate(zip(in_channels, config.conv_channels))
        )
        final_size = config.feature_map_sizes()[-1]
        flat_features = config.conv_channels[-1] * final_size * final_size
        dense_inputs = [flat_features] + config.hidden_sizes[:-1]
        self.hidden_layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dense_inputs, config.hidden_sizes))
        self.dropout = nn.Dropout(config.dropout)
        last_width = config.hidden_sizes[-1] if config.hidden_sizes else flat_features
        self.classifier = nn.Linear(last_width, config.num_labels)
        self.post_init()

    def forward(self, pixel_values=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        if pixel_values is None:
            raise ValueError("pixel_values is required: a float tensor of shape (batch, channels, height, width).")
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        # not while tracing (ONNX export), where the shapes are the example's and the check would only warn
        if not torch.jit.is_tracing() and (pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected):
            # another size would run (or fail deep inside) with the dense layer and the MACs sized for image_size
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model takes (batch, {', '.join(map(str, expected))}) "
                "(its config's num_channels and image_size). Resize the images, as the image processor saved with the model does."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        hidden_states = pixel_values  # (B, C, H, W)
        all_hidden_states = () if output_hidden_states else None
        for block in self.conv_blocks:
            hidden_states = block(hidden_states)  # (B, C_i, H_i, W_i)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = hidden_states.flatten(1)  # (B, C_last * H_last * W_last)
        for index, layer in enumerate(self.hidden_layers):
            if index > 0:  # dropout before each dense layer that follows a hidden layer, the classifier's below
                hidden_states = self.dropout(hidden_states)
            hidden_states = torch.relu(layer(hidden_states))  # (B, hidden_i)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        logits = self.classifier(self.dropout(hidden_states) if self.hidden_layers else hidden_states)  # (B, num_labels)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels.view(-1))
        if not return_dict:
            output = (logits,) + ((all_hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=all_hidden_states)


__all__ = ["RLPruneCNNForImageClassification", "RLPruneCNNPreTrainedModel"]
