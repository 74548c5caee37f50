"""Configuration of the reference IMDB LSTM: embedding, stacked LSTMs and dense layers, widths as lists."""

from transformers import PretrainedConfig

POOLINGS = ("last", "mean")


class RLPruneLSTMConfig(PretrainedConfig):
    r"""
    Args:
        vocab_size (`int`, defaults to 20000): size of the word vocabulary (the tokenizer's).
        embedding_dim (`int`, defaults to 128): width of the word embeddings.
        lstm_hidden_sizes (`list[int]`, defaults to `[128]`): hidden units of each stacked LSTM layer.
        hidden_sizes (`list[int]`, defaults to `[64]`): widths of the hidden dense layers on the last LSTM state.
        dropout (`float`, defaults to 0.0): dropout on the last LSTM state and after each hidden dense layer.
        embedding_dropout (`float`, defaults to 0.0): dropout on the word embeddings, the first LSTM's inputs.
        max_seq_length (`int`, defaults to 256): the longest input the tokenizer produces; cost figures use it.
        pad_token_id (`int`, defaults to 0): id of the padding token (the embedding keeps it at zero).
        pooling (`str`, defaults to `"last"`): what the dense layers read: the last LSTM's state after the last real
            token (`"last"`, the plan's Keras LSTM) or the mean of its states over the real tokens (`"mean"`).

    The head follows the experiment plan: one output unit read through a sigmoid. The model returns it as two-way
    logits `[0, z]`, whose softmax is `[1 - sigmoid(z), sigmoid(z)]`, so `pipeline("text-classification")` reports
    `neg`/`pos` with the right probability, and the loss (cross-entropy on `[0, z]`) equals binary cross-entropy.
    """

    model_type = "rlprune-lstm"

    def __init__(
        self,
        vocab_size=20000,
        embedding_dim=128,
        lstm_hidden_sizes=None,
        hidden_sizes=None,
        dropout=0.0,
        embedding_dropout=0.0,
        max_seq_length=256,
        pad_token_id=0,
        pooling="last",
        **kwargs,
    ):
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = {0: "neg", 1: "pos"}
            kwargs["label2id"] = {"neg": 0, "pos": 1}
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.lstm_hidden_sizes = list(lstm_hidden_sizes) if lstm_hidden_sizes is not None else [128]
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [64]
        self.dropout = dropout
        self.embedding_dropout = embedding_dropout
        self.max_seq_length = max_seq_length
        self.pooling = pooling
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self._validate()

    def to_diff_dict(self):
        # transformers leaves out an id2label equal to its own default (LABEL_0, LABEL_1), and __init__ would then
        # fill in neg/pos labels on loading: always save the labels
        diff = super().to_diff_dict()
        for name in ("id2label", "label2id"):
            if getattr(self, name) is not None:
                diff.setdefault(name, dict(getattr(self, name)))
        return diff

    def _validate(self):
        if not self.lstm_hidden_sizes:
            raise ValueError("lstm_hidden_sizes must name at least one LSTM layer, e.g. [128].")
        for name in ("lstm_hidden_sizes", "hidden_sizes"):
            for idx, width in enumerate(getattr(self, name)):
                if not isinstance(width, int) or width < 1:
                    raise ValueError(f"{name}[{idx}] = {width!r}: every width must be an integer >= 1.")
        for name in ("vocab_size", "embedding_dim", "max_seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be an integer >= 1.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id = {self.pad_token_id} must be a token id in [0, vocab_size={self.vocab_size}).")
        for name in ("dropout", "embedding_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1).")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling = {self.pooling!r} is unknown; choose one of {POOLINGS}.")
        if self.num_labels != 2:
            raise ValueError(
                f"num_labels = {self.num_labels}: this model is a binary classifier (one sigmoid unit shown as "
                "two-way logits); give exactly two labels."
            )


__all__ = ["RLPruneLSTMConfig"]
