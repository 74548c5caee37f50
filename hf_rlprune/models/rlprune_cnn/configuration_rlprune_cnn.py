"""Configuration of the reference CIFAR-10 CNN: every per-layer width is a list entry, so a pruned model is a config."""

from transformers import PretrainedConfig

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_PADDINGS = ("same", "valid")


class RLPruneCNNConfig(PretrainedConfig):
    r"""
    Args:
        num_channels (`int`, defaults to 3): channels of the input image.
        image_size (`int`, defaults to 32): height and width of the (square) input image.
        conv_channels (`list[int]`, defaults to `[32, 64]`): output channels of each 3x3 conv, in order.
        kernel_size (`int`, defaults to 3): kernel size of every conv.
        padding (`str`, defaults to `"same"`): `"same"` keeps the spatial size, `"valid"` shrinks it by `kernel_size - 1`.
        use_batch_norm (`bool`, defaults to `False`): batch norm after each conv (before the ReLU).
        pool_after (`list[int]`, defaults to `[len(conv_channels) - 1]`): indices of the convs followed by a 2x2 max-pool.
        hidden_sizes (`list[int]`, defaults to `[512]`): widths of the hidden dense layers after flattening.
        dropout (`float`, defaults to 0.5): dropout before each dense layer that follows a hidden layer.
    """

    model_type = "rlprune-cnn"

    def __init__(
        self,
        num_channels=3,
        image_size=32,
        conv_channels=None,
        kernel_size=3,
        padding="same",
        use_batch_norm=False,
        pool_after=None,
        hidden_sizes=None,
        dropout=0.5,
        **kwargs,
    ):
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(enumerate(CIFAR10_LABELS))
            kwargs["label2id"] = {name: idx for idx, name in enumerate(CIFAR10_LABELS)}
        self.num_channels = num_channels
        self.image_size = image_size
        self.conv_channels = list(conv_channels) if conv_channels is not None else [32, 64]
        self.kernel_size = kernel_size
        self.padding = padding
        self.use_batch_norm = use_batch_norm
        self.pool_after = list(pool_after) if pool_after is not None else [len(self.conv_channels) - 1]
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [512]
        self.dropout = dropout
        super().__init__(**kwargs)
        self._validate()

    def to_diff_dict(self):
        # transformers leaves out an id2label equal to its own default (LABEL_0, LABEL_1), and __init__ would then
        # fill in CIFAR-10's labels on loading: always save the labels
        diff = super().to_diff_dict()
        for name in ("id2label", "label2id"):
            if getattr(self, name) is not None:
                diff.setdefault(name, dict(getattr(self, name)))
        return diff

    def _validate(self):
        if not self.conv_channels:
            raise ValueError("conv_channels must name at least one conv layer, e.g. [32, 64].")
        for name in ("conv_channels", "hidden_sizes"):
            for idx, width in enumerate(getattr(self, name)):
                if not isinstance(width, int) or width < 1:
                    raise ValueError(f"{name}[{idx}] = {width!r}: every width must be an integer >= 1.")
        for name in ("num_channels", "image_size", "kernel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be an integer >= 1.")
        if self.padding not in _PADDINGS:
            raise ValueError(f"padding = {self.padding!r} is unknown; use one of {_PADDINGS}.")
        bad_pools = [idx for idx in self.pool_after if not 0 <= idx < len(self.conv_channels)]
        if bad_pools or len(set(self.pool_after)) != len(self.pool_after):
            raise ValueError(
                f"pool_after = {self.pool_after}: entries must be distinct conv indices in [0, {len(self.conv_channels)})."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1).")
        if self.num_labels < 1:
            raise ValueError(f"num_labels = {self.num_labels} must be >= 1 (one output per class).")
        if min(self.feature_map_sizes()) < 1:
            raise ValueError(
                f"image_size = {self.image_size} is too small for {len(self.conv_channels)} convs with padding "
                f"{self.padding!r} and pools after {self.pool_after}: the feature map shrinks to nothing."
            )

    def feature_map_sizes(self):
        """Spatial size (height = width) of the output of each conv block, after its pool if any."""
        sizes, size = [], self.image_size
        for idx in range(len(self.conv_channels)):
            if self.padding == "valid":
                size -= self.kernel_size - 1
            if idx in self.pool_after:
                size //= 2
            sizes.append(size)
        return sizes


__all__ = ["RLPruneCNNConfig"]
