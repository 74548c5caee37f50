"""Task wiring shared by scripts/prune.py and scripts/benchmark.py: data -> torch datasets and collators, the
reference models and checkpoints, and test accuracy. Pre-training is in `pretraining.py`, device-resident data in
`device_data.py`.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer

from .data import (
    CachedImageDataset,
    ImageCollator,
    get_task_spec,
    load_task_dataset,
    make_image_processor,
    make_synthetic_cifar,
    make_synthetic_imdb,
    make_text_collator,
    split_reward,
    tokenize_dataset,
)
from .models import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from .reward import move_to_device
from .tokenization import train_word_tokenizer

# The deeper CNN of the benchmark: six 3x3 convs with batch norm, a pool after every two, dense 512.
CNN_PRESETS = {
    "reference": {},
    "vgg6": dict(conv_channels=[64, 64, 128, 128, 256, 256], pool_after=[1, 3, 5], use_batch_norm=True),
    "small": dict(conv_channels=[16, 32], hidden_sizes=[128]),  # the --smoke run: same structure, CPU-sized
}
MODEL_TYPES = {"cifar10": RLPruneCNNConfig.model_type, "imdb": RLPruneLSTMConfig.model_type}
DEFAULT_MAX_LENGTH = 256  # IMDB tokens per review when neither the user nor a loaded checkpoint says otherwise
PRETRAIN_PATIENCE = {"imdb": 2}  # epochs without a reward-split gain before pre-training stops; the LSTM overfits within a few

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    task: str
    train: torch.utils.data.Dataset  # what the Trainer trains on (reward split removed)
    reward: torch.utils.data.Dataset  # held-out training examples for the agent's reward
    test: torch.utils.data.Dataset
    train_collator: object
    eval_collator: object
    processing_class: object  # tokenizer (IMDB) or image processor (CIFAR-10), saved beside the model


def prepare_task(task: str, dataset=None, reward_size=0.1, seed=0, smoke=False, max_train_samples=None,
                 vocab_size=20000, max_length=256, tokenizer=None, cache_dir=None, input_column=None, label_column=None) -> TaskData:
    """Load `task`'s data (Hub id, local folder, or synthetic for `smoke`), carve the reward split, and build the
    model-ready datasets and collators. `input_column` / `label_column` name the data's columns when they differ
    from the task's."""
    spec = get_task_spec(task)
    if smoke:
        raw = make_synthetic_cifar(1200, 300, seed=seed) if task == "cifar10" else make_synthetic_imdb(1200, 300, seed=seed)
    else:
        raw = load_task_dataset(task, dataset, input_column=input_column, label_column=label_column)
    train_raw = raw["train"]
    if max_train_samples is not None and max_train_samples < len(train_raw):
        train_raw = train_raw.shuffle(seed=seed).select(range(max_train_samples))
    train_raw, reward_raw = split_reward(train_raw, reward_size, seed=seed, label_column=spec.label_column)
    test_raw = raw["test"]
    if spec.modality == "image":
        train = CachedImageDataset.from_dataset(train_raw, spec.input_column, spec.label_column, cache_dir=cache_dir)
        reward = CachedImageDataset.from_dataset(reward_raw, spec.input_column, spec.label_column, cache_dir=cache_dir)
        test = CachedImageDataset.from_dataset(test_raw, spec.input_column, spec.label_column, cache_dir=cache_dir)
        return TaskData(task, train, reward, test, ImageCollator(train=True), ImageCollator(train=False), make_image_processor())
    if tokenizer is None:
        # the tokenizer sees only the training part: the reward split stays held out
        tokenizer = train_word_tokenizer(train_raw[spec.input_column], vocab_size=vocab_size, model_max_length=max_length)

    def encode(split):
        encoded = tokenize_dataset(split, tokenizer, max_length=max_length, text_column=spec.input_column)
        return encoded.rename_column(spec.label_column, "labels").with_format("torch")

    collator = make_text_collator(tokenizer)
    return TaskData(task, encode(train_raw), encode(reward_raw), encode(test_raw), collator, collator, tokenizer)


def check_images_fit(task_data: TaskData, model) -> None:
    """The CNN takes images of its config's size and channels: data of another size is refused before any training,
    not at the first forward (or, for a test split of its own size, after the whole pre-training)."""
    if not isinstance(model.config, RLPruneCNNConfig):
        return
    expected = (model.config.num_channels, model.config.image_size, model.config.image_size)
    for split, dataset in (("train", task_data.train), ("reward", task_data.reward), ("test", task_data.test)):
        if isinstance(dataset, CachedImageDataset) and tuple(dataset.images.shape[1:]) != expected:
            channels, height, width = dataset.images.shape[1:]
            raise ValueError(
                f"The {split} split's images are {height}x{width} with {channels} channels, but the model takes "
                f"{expected[1]}x{expected[2]} with {expected[0]} (its config's image_size and num_channels). Resize the "
                "images to that size first, or prune a CNN built for theirs."
            )


def build_model(task: str, preset: str = "reference", task_data: TaskData | None = None, max_length: int = 256,
                lstm_pooling: str = "last", lstm_dropout: float = 0.0, lstm_embedding_dropout: float = 0.0):
    """A freshly initialized reference model for `task`. For the IMDB LSTM: `lstm_pooling` is what its dense layers
    read, `lstm_dropout` the dropout on that and on each dense layer, `lstm_embedding_dropout` that on the embeddings."""
    if task == "cifar10":
        if preset not in CNN_PRESETS:
            raise ValueError(f"Unknown CNN preset {preset!r}; choose one of {sorted(CNN_PRESETS)}.")
        return RLPruneCNNForImageClassification(RLPruneCNNConfig(**CNN_PRESETS[preset]))
    tokenizer = task_data.processing_class if task_data is not None else None
    vocab_size = len(tokenizer) if tokenizer is not None else 20000
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    return RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=vocab_size, max_seq_length=max_length, pad_token_id=pad_id,
                                                                  pooling=lstm_pooling, dropout=lstm_dropout,
                                                                  embedding_dropout=lstm_embedding_dropout))


def checkpoint_config(model_name_or_path: str, **kwargs):
    """The config of a checkpoint (local folder or Hub id); a missing local folder is named as such, not passed on
    to the Hub as a malformed repo id."""
    path = os.path.expanduser(model_name_or_path)
    looks_local = model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(f"No checkpoint folder {model_name_or_path!r}. Pass the folder a model was saved to "
                                "(save_pretrained, --save_dense_to, <output_dir>/pruned) or a Hub id such as org/name.")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{model_name_or_path!r} holds no config.json: it is not a saved model. Pass the folder a "
                                "model was saved to (save_pretrained, --save_dense_to, <output_dir>/pruned).")
    return AutoConfig.from_pretrained(model_name_or_path, **kwargs)


def load_model(task: str, model_name_or_path: str, **kwargs):
    """A dense or pruned checkpoint (local folder or Hub id) of the right model type for `task`."""
    config = checkpoint_config(model_name_or_path, **kwargs)
    expected = MODEL_TYPES[task]
    if config.model_type != expected:
        raise ValueError(
            f"{model_name_or_path} holds a {config.model_type!r} model, but task {task!r} needs a {expected!r} model. "
            "Point --model_name_or_path at a checkpoint of this task's model, or omit it to pre-train one."
        )
    auto = AutoModelForImageClassification if task == "cifar10" else AutoModelForSequenceClassification
    return auto.from_pretrained(model_name_or_path, **kwargs)


def resolve_max_length(max_length: int | None, model_name_or_path: str | None) -> int:
    """Tokens per review: `max_length` if given, else a loaded LSTM checkpoint's own `max_seq_length` (the length it
    was trained at and its cost figures use), else DEFAULT_MAX_LENGTH. A given length that differs from the
    checkpoint's is allowed (fine-tuning at another length) but logged."""
    trained = None
    if model_name_or_path:
        trained = getattr(checkpoint_config(model_name_or_path), "max_seq_length", None)
    if max_length is None:
        return trained or DEFAULT_MAX_LENGTH
    if trained is not None and trained != max_length:
        logger.warning("max_length %d differs from the %d tokens %s was trained at; its MACs and latency figures count %d.",
                       max_length, trained, model_name_or_path, trained)
    return max_length


def load_checkpoint_tokenizer(model_name_or_path: str):
    """The tokenizer saved with an LSTM checkpoint. Its embedding rows are indexed by that tokenizer's ids, so one
    trained anew here would read them through other ids: a missing tokenizer is an error, never a silent retrain."""
    try:
        return AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load the tokenizer of {model_name_or_path!r} ({error}). An LSTM checkpoint's embedding rows are indexed "
            "by the tokenizer it was trained with: save that tokenizer beside the model (the folders scripts/prune.py and "
            "benchmark.py --save_dense_to write have it), or train the model and its tokenizer here instead of loading them."
        ) from error


@torch.no_grad()
def evaluate_accuracy(model, dataset, collator, batch_size: int = 512, device=None) -> float:
    """Top-1 accuracy of `model` on `dataset` (no Python loop per sample)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator):
        batch = move_to_device(batch, device)
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    return float(correct) / max(total, 1)


def accuracy_metric(eval_prediction) -> dict:
    """compute_metrics for the Trainer (the `evaluate` library's accuracy needs the Hub)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}
