#!/usr/bin/env python
"""Prune a CIFAR-10 CNN or an IMDB LSTM with the RL agent while fine-tuning it with the HF Trainer.

    python scripts/prune.py --smoke --output_dir outputs/smoke                       # a minute on CPU, synthetic data
    accelerate launch scripts/prune.py --task cifar10 --dataset_dir ../shared/data/cifar10 \
        --target 0.25 --num_train_epochs 10 --output_dir outputs/cifar10-25
    python scripts/prune.py args.json                                                # every argument from one file

Arguments come from three dataclasses: ScriptArguments (below), hf_rlprune.RLPruneConfig and TrainingArguments.
The pruned model, its tokenizer/image processor, pruning_report.json and the model card land in --save_dir
(default <output_dir>/pruned).
"""

import copy
import dataclasses
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field, replace

from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_rlprune import DistillationTrainer, RLPruneCallback, RLPruneConfig
from hf_rlprune.callback import build_latency_table
from hf_rlprune.callback import check_budget as check_config_budget
from hf_rlprune.card import check_save_dir, push_pruned_folder, save_pruned_model, update_trade_off
from hf_rlprune.pretraining import PLAN_LEARNING_RATE, PLAN_LR_DECAY, plan_optimizer, pretrain
from hf_rlprune.pruning import compare_latency, export_onnx, latency_hardware
from hf_rlprune.tasks import (
    CNN_PRESETS,
    MODEL_TYPES,
    PRETRAIN_PATIENCE,
    accuracy_metric,
    build_model,
    check_images_fit,
    evaluate_accuracy,
    load_checkpoint_tokenizer,
    load_model,
    prepare_task,
    resolve_max_length,
)

logger = logging.getLogger("hf_rlprune.prune")


@dataclass
class ScriptArguments:
    task: str = field(default="cifar10", metadata={"help": f"Task: one of {sorted(MODEL_TYPES)}."})
    dataset_dir: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the data (default: uoft-cs/cifar10 or stanfordnlp/imdb)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Dense or pruned checkpoint to start from (local or Hub); omit to pre-train one."}
    )
    model_preset: str = field(default="reference", metadata={"help": f"CNN architecture when pre-training: {sorted(CNN_PRESETS)}."})
    pretrain_epochs: float = field(default=50, metadata={"help": "Pre-training epochs when no checkpoint is given (the plan: 50; IMDB: "
                                                                 "the most, early-stopped on the reward split)."})
    pretrain_patience: int | None = field(
        default=None,
        metadata={"help": "Keep the pre-training epoch with the best reward-split accuracy and stop after this many epochs "
                          "without a gain. Default: 2 for IMDB, whose LSTM overfits within a few epochs; none for CIFAR-10."})
    pretrain_learning_rate: float = field(default=PLAN_LEARNING_RATE, metadata={"help": "Pre-training Adam learning rate (the plan: 1e-3)."})
    pretrain_lr_decay: float = field(default=PLAN_LR_DECAY, metadata={"help": "Keras-style lr decay: lr / (1 + decay * step) (the plan: 1e-4)."})
    pretrain_batch_size: int = field(default=128, metadata={"help": "Pre-training batch size (the plan: 128)."})
    reward_size: float = field(default=0.1, metadata={"help": "Fraction (or count, if > 1) of training data held out for the reward."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training examples."})
    input_column: str | None = field(default=None, metadata={"help": "The data's column of images (CIFAR-10) or reviews (IMDB), "
                                                                     "if not named as on the Hub ('img', 'text')."})
    label_column: str | None = field(default=None, metadata={"help": "The data's column of class ids, if not 'label'."})
    vocab_size: int = field(default=20000, metadata={"help": "IMDB: word vocabulary size of the trained tokenizer."})
    max_length: int | None = field(
        default=None, metadata={"help": "IMDB: tokens kept per review (default: a loaded model's max_seq_length, else 256)."})
    lstm_pooling: str = field(default="last", metadata={"help": "IMDB LSTM built here: its dense layers read the last state ('last', the plan's) or the mean over tokens ('mean')."})
    lstm_dropout: float = field(default=0.0, metadata={"help": "IMDB LSTM built here: dropout in [0, 1) on what its dense layers read and after each of them."})
    lstm_embedding_dropout: float = field(default=0.0, metadata={"help": "IMDB LSTM built here: dropout in [0, 1) on the word embeddings."})
    prune_while_pretraining: bool = field(
        default=False,
        metadata={"help": "Train a freshly initialized model from scratch and prune it while it trains, instead of pre-training "
                          "first: the Trainer runs num_train_epochs with the plan's optimizer (Adam at pretrain_learning_rate, "
                          "decay pretrain_lr_decay; TrainingArguments' learning_rate and schedule are not used) and the callback "
                          "prunes on its schedule (default: 4 rounds between 10 and 50 percent of training). There is no dense "
                          "model to report. See the README's Schedules section."})
    export_onnx: bool = field(default=False, metadata={"help": "Also write model.onnx of the pruned model."})
    measure_latency: bool = field(default=True, metadata={"help": "Measure CPU latency (torch and ONNX Runtime) for the report."})
    smoke: bool = field(default=False, metadata={"help": "Whole pipeline in about a minute on CPU with small synthetic data."})
    distill_alpha: float = field(default=0.0, metadata={"help": "Weight in [0, 1] of distillation from the dense model while pruning and "
                                                               "fine-tuning (0: plain fine-tuning)."})
    distill_temperature: float = field(default=4.0, metadata={"help": "Softening temperature of the distillation."})

    def __post_init__(self):
        if self.task not in MODEL_TYPES:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {sorted(MODEL_TYPES)}.")
        if self.model_preset not in CNN_PRESETS:
            raise ValueError(f"Unknown --model_preset {self.model_preset!r}; choose one of {sorted(CNN_PRESETS)}.")
        if self.prune_while_pretraining and (self.model_name_or_path or self.distill_alpha > 0):
            raise ValueError("--prune_while_pretraining trains a fresh model from scratch: drop --model_name_or_path (prune a trained "
                             "model while fine-tuning it instead) and --distill_alpha (there is no trained dense model to distill from).")
        if self.reward_size >= 1 and self.reward_size != int(self.reward_size):
            raise ValueError(f"--reward_size {self.reward_size}: give a fraction in (0, 1) of the training rows or a whole "
                             "number of rows (e.g. 5000).")
        if self.pretrain_patience is not None and self.pretrain_patience < 1:
            raise ValueError(f"--pretrain_patience {self.pretrain_patience} must be >= 1 (omit it for the task's default).")
        if not 0.0 <= self.distill_alpha <= 1.0 or not self.distill_temperature > 0:
            raise ValueError(f"--distill_alpha {self.distill_alpha} must be in [0, 1] and --distill_temperature "
                             f"{self.distill_temperature} > 0 (0 and 4: no distillation, the usual temperature).")


def json_arguments(path: str) -> dict:
    """`prune.py args.json`: one JSON object of argument names and values."""
    with open(path) as handle:
        values = json.load(handle)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold one JSON object of argument names and values, e.g. "
                         '{"task": "cifar10", "target": 0.25, "output_dir": "outputs/cifar10-25"}.')
    return values


def as_command_line(values: dict) -> list[str]:
    """Arguments given as a dict (a JSON file) spelled out as the command line that stands for them, for the card's
    reproduce command: the file is not published with the model."""
    argv = []
    for name, value in values.items():
        if value is None or value == []:  # unset, or an empty list: the command line would leave it out
            continue
        if isinstance(value, list):
            argv += [f"--{name}", *(json.dumps(item) if isinstance(item, (dict, list)) else str(item) for item in value)]
        else:  # --name=value, so values that start with "-" (negative numbers) stay values
            argv.append(f"--{name}={json.dumps(value) if isinstance(value, dict) else str(value).lower() if isinstance(value, bool) else value}")
    return argv


def parse_args(argv=None):
    # no abbreviated options: every option is spelled out, so secrets can be recognised and left out of the card
    parser = HfArgumentParser((ScriptArguments, RLPruneConfig, TrainingArguments), allow_abbrev=False)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        values = json_arguments(argv[0])
        script, prune, training = parser.parse_dict(values)
        output_dir_given = "output_dir" in values
    else:
        script, prune, training = parser.parse_args_into_dataclasses(args=argv)
        output_dir_given = any(arg == "--output_dir" or arg.startswith("--output_dir=") for arg in argv)
    if not output_dir_given:  # the same default folder either way, after parsing (--smoke false is not a smoke run)
        training = replace(training, output_dir="outputs/smoke" if script.smoke else "outputs/prune")
    return script, prune, training


def apply_smoke_settings(script: ScriptArguments, prune: RLPruneConfig, training: TrainingArguments) -> TrainingArguments:
    """Small enough for a CPU minute; the same code path and output folder as a real run. The training arguments are
    rebuilt, not edited: their device (CPU here, even on a GPU host) is fixed when they are constructed."""
    script.pretrain_epochs = 2
    script.model_preset = "small"
    script.pretrain_batch_size = 64
    script.max_length = 64
    script.vocab_size = 2000
    prune.num_rounds = 2
    prune.search_episodes = 6
    prune.ppo_episodes_per_update = 3
    prune.recovery_steps = 4
    return dataclasses.replace(training, num_train_epochs=2, per_device_train_batch_size=64, learning_rate=1e-3, use_cpu=True,
                               report_to=[], save_strategy="no", eval_strategy="no", logging_steps=5)


def hub_target(prune: RLPruneConfig, training: TrainingArguments) -> tuple[bool, str | None]:
    """Whether to push the pruned folder, and where: --push_to_hub --hub_model_id, or the callback's own
    --pruned_hub_model_id (the script saves and pushes the folder itself, so it honours that too)."""
    return training.push_to_hub or bool(prune.pruned_hub_model_id), prune.pruned_hub_model_id or training.hub_model_id


def pruned_save_dir(prune: RLPruneConfig, training: TrainingArguments) -> str:
    """Where the pruned model goes: --save_dir, else <output_dir>/pruned (as the callback saves it)."""
    return prune.save_dir or os.path.join(training.output_dir, "pruned")


def validate(script: ScriptArguments, prune: RLPruneConfig, training: TrainingArguments):
    """Fail before any data loading or training on the rules that join the three argument groups (each group's own
    rules are checked when it is built)."""
    if os.path.exists(training.output_dir) and not os.path.isdir(training.output_dir):
        raise ValueError(f"--output_dir {training.output_dir} is a file; give a folder (new, or one of an earlier run).")
    if training.push_to_hub and not (training.hub_model_id or prune.pruned_hub_model_id):
        raise ValueError("--push_to_hub needs --hub_model_id <org>/<name> naming the Hub repository to push the pruned model to.")
    if not prune.save_on_train_end:
        raise ValueError("--save_on_train_end false: this script's output is the saved pruned model. Drop the flag (it is for "
                         "RLPruneCallback in your own training script).")
    check_save_dir(pruned_save_dir(prune, training), output_dir=training.output_dir)  # refused now, not after the training


def check_budget(model, prune: RLPruneConfig, training: TrainingArguments):
    """An impossible budget is an error now, not after pre-training. Latency needs the dense model's latency table:
    measured and cached here as the callback would (the main process first), so the callback later loads it."""
    table = None
    if prune.uses_latency:
        with training.main_process_first(desc="latency table"):
            table = build_latency_table(model.config, prune)
    check_config_budget(model, prune, table)


def latency_figures(dense_config, pruned_model) -> dict:
    """CPU latency of dense and pruned (compacted) models: torch and ONNX Runtime, batch 1 and 128."""
    runs = [(runtime, "cpu", batch) for runtime in ("onnxruntime", "torch") for batch in (1, 128)]
    return compare_latency(type(pruned_model)(dense_config).eval(), pruned_model.cpu().eval(), runs, repeats=10, warmup=3)


SECRET_ARGUMENTS = ("--hub_token",)


def reproduce_command(argv: list[str]) -> str:
    """The command line for the card, with secrets (the Hub token) left out."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = "--" + arg.split("=", 1)[0][2:].replace("-", "_") if arg.startswith("--") else arg  # --hub-token too
        if any(secret.startswith(name) and len(name) > len("--hub_") for secret in SECRET_ARGUMENTS):
            skip_next = "=" not in arg  # the value is the next argument unless given as --opt=value
            continue
        kept.append(arg)
    return "python scripts/prune.py " + " ".join(shlex.quote(a) for a in kept)


def main(argv=None):
    script, prune, training = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if script.smoke:
        training = apply_smoke_settings(script, prune, training)
    validate(script, prune, training)
    push, hub_model_id = hub_target(prune, training)
    hub_token = training.hub_token
    training.push_to_hub = False  # we push the pruned folder ourselves; the Trainer would push the dense checkpoints
    training.hub_token = None  # keeps the token out of the checkpoints' training_args.bin
    set_seed(training.seed)

    model = load_model(script.task, script.model_name_or_path) if script.model_name_or_path else None
    tokenizer = load_checkpoint_tokenizer(script.model_name_or_path) if model is not None and script.task == "imdb" else None
    script.max_length = resolve_max_length(script.max_length, script.model_name_or_path)
    if model is not None:
        check_budget(model, prune, training)
    task_data = prepare_task(script.task, script.dataset_dir, reward_size=script.reward_size if script.reward_size < 1 else int(script.reward_size),
                             seed=training.seed, smoke=script.smoke, max_train_samples=script.max_train_samples,
                             vocab_size=script.vocab_size, max_length=script.max_length, tokenizer=tokenizer,
                             input_column=script.input_column, label_column=script.label_column)
    if model is None:
        model = build_model(script.task, script.model_preset, task_data, max_length=script.max_length, lstm_pooling=script.lstm_pooling,
                            lstm_dropout=script.lstm_dropout, lstm_embedding_dropout=script.lstm_embedding_dropout)
        check_budget(model, prune, training)
    check_images_fit(task_data, model)  # before any training
    if script.model_name_or_path is None and not script.prune_while_pretraining:
        logger.info("Pre-training the dense model for %s epochs", script.pretrain_epochs)
        patience = script.pretrain_patience if script.pretrain_patience is not None else PRETRAIN_PATIENCE.get(script.task)
        pretrain(model, task_data, os.path.join(training.output_dir, "dense"), script.pretrain_epochs,
                 learning_rate=script.pretrain_learning_rate, lr_decay=script.pretrain_lr_decay,
                 batch_size=script.pretrain_batch_size, seed=training.seed, use_cpu=training.use_cpu, bf16=training.bf16,
                 patience=patience)

    device = training.device
    model.to(device)  # before the optimizer below is built on its parameters
    optimizers = (None, None)
    if script.prune_while_pretraining:
        dense_test_accuracy = None  # nothing was trained dense
        optimizers = plan_optimizer(model, script.pretrain_learning_rate, script.pretrain_lr_decay)
        logger.info("Training from scratch for %s epochs, pruning as it trains", training.num_train_epochs)
    else:
        dense_test_accuracy = evaluate_accuracy(model, task_data.test, task_data.eval_collator)
        logger.info("Dense test accuracy: %.4f", dense_test_accuracy)

    prune.save_on_train_end = False  # saved below, once the test accuracy is known
    callback = RLPruneCallback(prune, reward_dataset=task_data.reward, data_collator=task_data.eval_collator)
    distillation = {}
    if script.distill_alpha > 0:  # the dense model, frozen as it is now, teaches the pruned one
        distillation = dict(teacher=copy.deepcopy(model), alpha=script.distill_alpha, temperature=script.distill_temperature)
    trainer = (DistillationTrainer if distillation else Trainer)(
        model=model,
        args=training,
        train_dataset=task_data.train,
        eval_dataset=task_data.test if training.eval_strategy != "no" else None,
        data_collator=task_data.train_collator,
        processing_class=task_data.processing_class,
        compute_metrics=accuracy_metric,
        callbacks=[callback],
        optimizers=optimizers,
        **distillation,
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    pruned = trainer.model  # compacted in place by the callback

    if trainer.is_world_process_zero():
        report = callback.report
        report["accuracy"] = {
            "split": "test",
            "dense": dense_test_accuracy,
            "pruned": evaluate_accuracy(pruned, task_data.test, task_data.eval_collator),
            "reward_split_pruned": report["accuracy"]["pruned"],
        }
        update_trade_off(report)
        given = sys.argv[1:] if argv is None else argv
        report["command"] = reproduce_command(as_command_line(json_arguments(given[0])) if len(given) == 1 and given[0].endswith(".json") else given)
        if script.measure_latency:
            report["latency_ms"] = latency_figures(callback.dense_config, pruned)
            report["latency_hardware"] = latency_hardware(report["latency_ms"])
        logger.info("Pruned test accuracy: %.4f (dense %s); MACs %d -> %d", report["accuracy"]["pruned"],
                    "not trained" if dense_test_accuracy is None else f"{dense_test_accuracy:.4f}", report["macs"]["dense"], report["macs"]["pruned"])
        save_dir = pruned_save_dir(prune, training)
        save_pruned_model(pruned, save_dir, report, processing_class=task_data.processing_class, repo_id=hub_model_id,
                          reproduce_command=report["command"], dataset_name=prune.dataset_name or (None if script.smoke else script.task))  # smoke data is synthetic
        if script.export_onnx:
            tmp = os.path.join(save_dir, f".model.onnx.tmp-{os.getpid()}")
            export_onnx(pruned, tmp)
            os.replace(tmp, os.path.join(save_dir, "model.onnx"))
        print(json.dumps({"output": save_dir, "accuracy": report["accuracy"], "macs": report["macs"], "params": report["params"]}, indent=2))
        if push:
            push_pruned_folder(save_dir, hub_model_id, hub_token, private=training.hub_private_repo, revision=training.hub_revision)
    return callback.report



if __name__ == "__main__":
    main()
