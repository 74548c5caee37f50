"""The reference IMDB LSTM as a PreTrainedModel: embedding -> stacked LSTMs -> pooling -> dense layers -> one sigmoid unit.

Self-contained on purpose: a saved model loads with `trust_remote_code=True` where hf_rlprune is not installed.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

try:  # transformers >= 5 tracks which tensors were initialized; fall back to torch's init on older releases
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

from .configuration_rlprune_lstm import RLPruneLSTMConfig


def run_lstm(lstm: nn.LSTM, inputs: torch.Tensor) -> torch.Tensor:
    """One batch-first LSTM layer, (B, T, D) -> (B, T, H), with its recurrence in the weights' dtype under autocast.

    cuDNN's half-precision LSTM computes wrong outputs for some hidden sizes: on an H100 (torch 2.11, cuDNN 9.19),
    under bf16 autocast, the multiples of 8 that are not multiples of 32 from 40 to 184 (72, 112, ...) were off by
    0.19-0.90 on outputs bounded by 1 (scripts/cudnn_lstm_check.py), and pruned LSTMs land on such widths. In float32
    (TF32 on the GPU) it agreed with the CPU within 1e-3, and a bf16 training step was no slower. Weights cast to
    float16 bypass cuDNN, whose float16 kernel showed the same fault.
    """
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return run_lstm(lstm, inputs.to(lstm.weight_hh_l0.dtype))  # float16 weights still bypass cuDNN below
    if inputs.is_cuda and lstm.weight_hh_l0.dtype == torch.float16:
        with torch.backends.cudnn.flags(enabled=False):
            return lstm(inputs)[0]
    return lstm(inputs)[0]


class RLPruneLSTMPreTrainedModel(PreTrainedModel):
    config_class = RLPruneLSTMConfig
    base_model_prefix = "rlprune_lstm"
    main_input_name = "input_ids"
    input_modalities = ("text",)
    # The loss is a mean over the batch (num_items_in_batch is not used): the Trainer must divide it by the
    # gradient-accumulation steps itself, which it skips for a forward taking **kwargs unless told.
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.embedding_dim))
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LSTM):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for name, param in module.named_parameters():
                init.uniform_(param, -bound, bound)
                if name.startswith("bias_ih"):
                    # forget-gate bias 1 (Jozefowicz et al. 2015): gates are ordered input, forget, cell, output
                    init.constant_(param[module.hidden_size : 2 * module.hidden_size], 1.0)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)


class RLPruneLSTMForSequenceClassification(RLPruneLSTMPreTrainedModel):
    def __init__(self, config: RLPruneLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        lstm_inputs = [config.embedding_dim] + config.lstm_hidden_sizes[:-1]
        # One nn.LSTM per layer so that each layer can have its own (pruned) width.
        self.lstm_layers = nn.ModuleList(
            nn.LSTM(d_in, d_hidden, batch_first=True) for d_in, d_hidden in zip(lstm_inputs, config.lstm_hidden_sizes)
        )
        dense_inputs = [config.lstm_hidden_sizes[-1]] + config.hidden_sizes[:-1]
        self.hidden_layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dense_inputs, config.hidden_sizes))
        self.dropout = nn.Dropout(config.dropout)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        last_width = config.hidden_sizes[-1] if config.hidden_sizes else config.lstm_hidden_sizes[-1]
        self.classifier = nn.Linear(last_width, 1)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("input_ids is required: an integer tensor of shape (batch, sequence_length).")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id if self.config.pad_token_id is not None else torch.ones_like(input_ids)
        attention_mask = attention_mask.to(torch.long)
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
            # The LSTM reads left to right, so the state at the last real token ignores right padding; left padding would not.
            if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ValueError("attention_mask has padding before real tokens; pad on the right (tokenizer.padding_side='right').")

        hidden_states = self.embedding_dropout(self.embeddings(input_ids))  # (B, T, E)
        all_hidden_states = () if output_hidden_states else None
        for lstm in self.lstm_layers:
            hidden_states = run_lstm(lstm, hidden_states)  # (B, T, H_i)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        # Read over the real tokens only: identical however much right padding the batch adds.
        if self.config.pooling == "mean":
            weights = attention_mask.to(hidden_states.device, hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, H_last)
        else:  # the state after the last real token
            last_index = (attention_mask.sum(dim=1) - 1).clamp(min=0)  # (B,)
            batch_index = torch.arange(hidden_states.shape[0], device=hidden_states.device)
            pooled = hidden_states[batch_index, last_index.to(hidden_states.device)]  # (B, H_last)
        hidden_states = self.dropout(pooled)
        for layer in self.hidden_layers:
            hidden_states = self.dropout(torch.relu(layer(hidden_states)))  # (B, hidden_i)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        positive_logit = self.classifier(hidden_states)  # (B, 1)
        logits = torch.cat([torch.zeros_like(positive_logit), positive_logit], dim=-1)  # (B, 2): softmax = [1-p, p]

        loss = None
        if labels is not None:
            labels = labels.to(positive_logit.device).view(-1).to(positive_logit.dtype)
            loss = nn.functional.binary_cross_entropy_with_logits(positive_logit.squeeze(-1), labels)
        if not return_dict:
            output = (logits,) + ((all_hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=all_hidden_states)


__all__ = ["RLPruneLSTMForSequenceClassification", "RLPruneLSTMPreTrainedModel"]
