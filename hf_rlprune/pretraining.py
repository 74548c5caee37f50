"""Dense training with the plan's recipe (Adam lr 1e-3, Keras-style lr decay 1e-4, batch 128): its optimizers, the
schedule that ends on fine-tuning's cosine, early stopping on the reward split, and two loops: `pretrain` through the
Trainer (scripts/prune.py) and `train_on_tensors` on device-resident data (scripts/benchmark.py on a GPU).
"""

import logging
import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from .atomic import atomic_directory
from .device_data import DeviceBatchCollator, tensor_accuracy
from .tasks import TaskData, evaluate_accuracy

PLAN_LEARNING_RATE, PLAN_LR_DECAY = 1e-3, 1e-4  # the plan's pre-training recipe: Adam lr 1e-3, Keras-style decay 1e-4

logger = logging.getLogger(__name__)


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
    if len(task_data.train) < batch_size * args.world_size:  # each process drops its last partial batch: none would be left
        raise ValueError(f"{len(task_data.train)} training rows are fewer than one pre-training batch of {batch_size} for each "
                         f"of {args.world_size} process(es); lower the batch size (scripts/prune.py: --pretrain_batch_size) "
                         "or give more training data.")
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
