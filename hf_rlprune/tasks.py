"""Task wiring shared by scripts/prune.py and scripts/benchmark.py: data -> torch datasets and collators, the
reference models, pre-training with the plan's recipe, and test accuracy.
"""

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from .atomic import atomic_directory
from .data import (
    CachedImageDataset,
    ImageCollator,
    get_task_spec,
    load_task_dataset,
    make_image_processor,
    make_synthetic_cifar,
    make_synthetic_imdb,
    make_text_collator,
    normalize_images,
    random_crop_flip,
    split_reward,
    tokenize_dataset,
    tokenized_to_tensors,
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
PLAN_LEARNING_RATE, PLAN_LR_DECAY = 1e-3, 1e-4  # the plan's pre-training recipe: Adam lr 1e-3, Keras-style decay 1e-4
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
                 vocab_size=20000, max_length=256, tokenizer=None, cache_dir=None) -> TaskData:
    """Load `task`'s data (Hub id, local folder, or synthetic for `smoke`), carve the reward split, and build the
    model-ready datasets and collators."""
    spec = get_task_spec(task)
    if smoke:
        raw = make_synthetic_cifar(1200, 300, seed=seed) if task == "cifar10" else make_synthetic_imdb(1200, 300, seed=seed)
    else:
        raw = load_task_dataset(task, dataset)
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


def inverse_time_decay(optimizer, decay: float):
    """Keras-style `decay`: lr_t = lr / (1 + decay * t), the plan's "lr decay 1e-4"."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + decay * step))


def plan_optimizer(model, learning_rate=PLAN_LEARNING_RATE, lr_decay=PLAN_LR_DECAY):
    """The plan's pre-training optimizer and schedule: Adam, lr / (1 + decay * step)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    return optimizer, inverse_time_decay(optimizer, lr_decay)


def plan_then_finetune_optimizer(model, pretrain_steps: int, finetune_steps: int, finetune_lr: float,
                                 learning_rate=PLAN_LEARNING_RATE, lr_decay=PLAN_LR_DECAY):
    """Pre-training and then fine-tuning in one run: Adam at the plan's lr / (1 + decay * step) for `pretrain_steps`,
    then `finetune_lr` on a cosine to 0 over `finetune_steps`, the Trainer's fine-tuning schedule (Adam's moments carry
    over). A model pruned while it trains gets the same two recipes that pre-training and then fine-tuning get."""
    if pretrain_steps < 0 or finetune_steps < 1 or not finetune_lr > 0:
        raise ValueError(f"pretrain_steps = {pretrain_steps} must be >= 0, finetune_steps = {finetune_steps} >= 1 and "
                         f"finetune_lr = {finetune_lr} > 0.")
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    def factor(step: int) -> float:
        if step < pretrain_steps:
            return 1.0 / (1.0 + lr_decay * step)
        progress = min(1.0, (step - pretrain_steps) / finetune_steps)
        return finetune_lr / learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class KeepBestEpoch(TrainerCallback):
    """Early stopping on held-out accuracy: `evaluate(model)` after each epoch, the best epoch's weights kept in memory
    and restored when training ends, training stopped after `patience` epochs without a gain (None: never).
    `record` is the bookkeeping alone, for loops outside the Trainer.

    transformers' EarlyStoppingCallback would evaluate through the Trainer's data collator, which augments CIFAR-10
    batches, and would need a checkpoint on disk per epoch to load the best one back."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], float], patience: int | None = None):
        if patience is not None and patience < 1:
            raise ValueError(f"patience = {patience} must be >= 1 (or None: keep the best epoch, never stop early).")
        self.evaluate, self.patience = evaluate, patience
        self.best_accuracy, self.best_state, self.best_epoch, self.stale = -1.0, None, None, 0
        self.epochs, self.accuracies = [], []

    def record(self, model, accuracy: float, epoch: float) -> bool:
        """Note one epoch's held-out accuracy (copying the weights if it is the best yet); True once `patience`
        epochs in a row brought no gain."""
        self.epochs.append(epoch)
        self.accuracies.append(accuracy)
        if accuracy > self.best_accuracy:  # ties keep the earlier epoch
            self.best_accuracy, self.best_epoch, self.stale = accuracy, epoch, 0
            self.best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            return False
        self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def restore(self, model) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        accuracy = self.evaluate(model.eval())
        model.train(was_training)
        epoch = round(state.epoch, 3)  # a last partial epoch stays apart
        logger.info("epoch %g: held-out accuracy %.4f", epoch, accuracy)
        if self.record(model, accuracy, epoch):
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.restore(model)


def pretrain(model, task_data: TaskData, output_dir: str, epochs: float, learning_rate=PLAN_LEARNING_RATE, lr_decay=PLAN_LR_DECAY,
             batch_size=128, seed=0, use_cpu=False, bf16=False, max_steps=-1, patience: int | None = None):
    """Train the dense model with the plan's recipe (Adam lr 1e-3, lr decay 1e-4, batch 128) and save it. With
    `patience`, keep the epoch with the best reward-split accuracy and stop after `patience` epochs without a gain
    (IMDB: as many epochs as the reward split says help)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=use_cpu,
        bf16=bf16,
        logging_steps=50,
        dataloader_drop_last=True,
        disable_tqdm=True,
        max_grad_norm=0.0,  # the plan's (Keras) recipe clips nothing, nor does benchmark.py's pre-training loop
    )
    callbacks = []
    if patience is not None:
        callbacks.append(KeepBestEpoch(lambda m: evaluate_accuracy(m, task_data.reward, task_data.eval_collator), patience))
    trainer = Trainer(model=model, args=args, train_dataset=task_data.train, data_collator=task_data.train_collator,
                      optimizers=plan_optimizer(model, learning_rate, lr_decay), callbacks=callbacks)
    trainer.train()
    if trainer.is_world_process_zero():  # one writer; a run cut off mid-save leaves the previous folder, or none
        with atomic_directory(output_dir) as staging:
            model.save_pretrained(staging)
            task_data.processing_class.save_pretrained(staging)
    return model


# ---- data kept on the device (benchmarks on a GPU: no per-batch host work, no transfers) ---------------------------


class IndexDataset(torch.utils.data.Dataset):
    """Rows 0..n-1; a DeviceBatchCollator turns a list of row indices into a batch gathered on the device."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows

    def __len__(self):
        return self.num_rows

    def __getitem__(self, index):
        return index


class DeviceBatchCollator:
    """Gathers rows from tensors already on the device; images get batched crop/flip (train) and normalization.

    Text rows are right-padded (N, T) tensors; each batch is trimmed to its longest row.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], train: bool, seed: int = 0):
        self.tensors = tensors
        self.train = train
        self.is_image = "images" in tensors
        device = next(iter(tensors.values())).device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, indices) -> dict:
        device = self.tensors["labels"].device
        index = torch.as_tensor(indices, device=device)
        if self.is_image:
            images = self.tensors["images"].index_select(0, index)  # (B, 3, H, W) uint8
            if self.train:
                images = random_crop_flip(images, self.generator)
            return {"pixel_values": normalize_images(images), "labels": self.tensors["labels"].index_select(0, index)}
        mask = self.tensors["attention_mask"].index_select(0, index)  # (B, T)
        longest = int(mask.sum(dim=1).max())
        return {
            "input_ids": self.tensors["input_ids"].index_select(0, index)[:, :longest],
            "attention_mask": mask[:, :longest],
            "labels": self.tensors["labels"].index_select(0, index),
        }


def task_tensors(dataset, device, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """A prepared split (CachedImageDataset or tokenized Dataset) as tensors on `device`."""
    if isinstance(dataset, CachedImageDataset):
        return {"images": dataset.images.to(device), "labels": dataset.labels.to(device)}
    tensors = tokenized_to_tensors(dataset.with_format(None), pad_token_id=pad_token_id, label_column="labels")
    return {key: value.to(device) for key, value in tensors.items()}


@torch.no_grad()
def tensor_accuracy(model, tensors: dict, batch_size: int = 1024, autocast_dtype=None) -> float:
    collator = DeviceBatchCollator(tensors, train=False)
    total = tensors["labels"].shape[0]
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=tensors["labels"].device)
    device_type = tensors["labels"].device.type
    for start in range(0, total, batch_size):
        batch = collator(range(start, min(start + batch_size, total)))
        labels = batch.pop("labels")
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            correct += (model(**batch).logits.argmax(-1) == labels).sum()
    model.train(was_training)
    return float(correct) / total


def train_on_tensors(model, tensors: dict, epochs: int, learning_rate=PLAN_LEARNING_RATE, lr_decay=PLAN_LR_DECAY, batch_size=128, seed=0,
                     autocast_dtype=None, eval_tensors: dict | None = None, patience: int | None = None, log=print):
    """A lean training loop for dense pre-training with the plan's recipe (Adam, Keras-style lr decay, batch 128)
    on device-resident data. With `eval_tensors` and `patience`, keeps the best epoch by held-out accuracy and stops
    once `patience` epochs bring no improvement (how many epochs help, read off the reward split)."""
    device = tensors["labels"].device
    collator = DeviceBatchCollator(tensors, train=True, seed=seed)
    optimizer, scheduler = plan_optimizer(model, learning_rate, lr_decay)
    generator = torch.Generator(device=device).manual_seed(seed)
    total = tensors["labels"].shape[0]
    if total < batch_size:
        raise ValueError(f"{total} training rows are fewer than batch_size={batch_size}; lower the batch size.")
    keeper = None
    if eval_tensors is not None:
        keeper = KeepBestEpoch(lambda m: tensor_accuracy(m, eval_tensors, autocast_dtype=autocast_dtype), patience)
    model.train()
    for epoch in range(int(epochs)):
        order = torch.randperm(total, generator=generator, device=device)
        for start in range(0, total - batch_size + 1, batch_size):
            batch = collator(order[start : start + batch_size])
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if keeper is not None:
            accuracy = keeper.evaluate(model)
            log(f"epoch {epoch + 1}: loss {float(loss.detach()):.4f} held-out accuracy {accuracy:.4f}")
            if keeper.record(model, accuracy, epoch + 1):
                break
    if keeper is None:
        return []
    if patience is not None:
        keeper.restore(model)
    return keeper.accuracies
