import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, pretraining
from hf_rlprune.device_data import task_tensors, tensor_accuracy
from hf_rlprune.pretraining import KeepBestEpoch, plan_then_finetune_optimizer, pretrain, train_on_tensors
from hf_rlprune.tasks import DEFAULT_MAX_LENGTH, build_model, check_images_fit, checkpoint_config, prepare_task, resolve_max_length


def test_keep_best_epoch_restores_the_best_weights_and_stops_after_patience(tmp_path):
    model = torch.nn.Linear(2, 2)
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    keeper = KeepBestEpoch(lambda m: next(scripted), patience=2)
    args, state = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState()
    stopped_after = None
    for epoch in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(epoch)  # "training" leaves a trace of the epoch in the weights
        control, state.epoch = TrainerControl(), float(epoch)
        keeper.on_epoch_end(args, state, control, model=model)
        if control.should_training_stop:
            stopped_after = epoch
            break
    assert stopped_after == 4  # epochs 3 and 4 brought no gain over epoch 2
    assert keeper.accuracies == [0.5, 0.7, 0.6, 0.65] and keeper.epochs == [1.0, 2.0, 3.0, 4.0] and keeper.best_epoch == 2.0
    keeper.on_train_end(args, state, TrainerControl(), model=model)
    assert torch.all(model.weight == 2) and keeper.best_accuracy == 0.7
    assert model.training  # evaluation switched to eval mode and back


def test_keep_best_epoch_rejects_a_patience_below_one():
    with pytest.raises(ValueError, match="patience = 0 must be >= 1"):
        KeepBestEpoch(lambda m: 0.0, patience=0)


def test_pretraining_with_patience_keeps_the_best_epoch_on_the_reward_split(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = prepare_task("imdb", smoke=True, vocab_size=500, max_length=32)
    model = build_model("imdb", task_data=data, max_length=32)
    # the reward split's accuracy per epoch, scripted: best at epoch 2, then 2 epochs without a gain
    accuracies, snapshots = iter([0.6, 0.7, 0.65, 0.69, 0.9, 0.9]), []

    def scripted_accuracy(evaluated, *args, **kwargs):
        snapshots.append({name: value.detach().clone() for name, value in evaluated.state_dict().items()})
        return next(accuracies)

    monkeypatch.setattr(pretraining, "evaluate_accuracy", scripted_accuracy)
    pretrain(model, data, str(tmp_path / "dense"), epochs=6, batch_size=64, use_cpu=True, patience=2)
    assert len(snapshots) == 4  # stopped after epoch 4
    assert not all(torch.equal(snapshots[1][name], snapshots[3][name]) for name in snapshots[1])  # training went on
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in snapshots[1].items())  # epoch 2's weights restored
    saved = load_file(tmp_path / "dense" / "model.safetensors")  # and they are what is saved
    assert saved and all(torch.equal(value, state[name]) for name, value in saved.items())


def test_the_lean_training_loop_keeps_the_best_epoch_and_stops_after_patience():
    torch.manual_seed(0)
    data = prepare_task("imdb", smoke=True, vocab_size=500, max_length=32)
    model = build_model("imdb", task_data=data, max_length=32)
    train, reward = (task_tensors(split, torch.device("cpu")) for split in (data.train, data.reward))
    # lr 0.1: unstable on purpose, so a later epoch is worse than an earlier one
    history = train_on_tensors(model, train, epochs=6, learning_rate=0.1, batch_size=64, eval_tensors=reward, patience=2, log=lambda line: None)
    assert len(history) < 6 and max(history[-2:]) <= max(history[:-2])  # stopped after 2 epochs without a gain
    assert history[-1] < max(history)  # so the best epoch's weights had to be restored
    assert tensor_accuracy(model, reward) == max(history)


def test_plan_then_finetune_schedule_switches_recipes_at_the_end_of_pretraining():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = plan_then_finetune_optimizer(model, pretrain_steps=100, finetune_steps=20, finetune_lr=5e-4,
                                                        learning_rate=1e-3, lr_decay=1e-2)
    rates = []
    for _ in range(121):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3) and rates[99] == pytest.approx(1e-3 / (1 + 1e-2 * 99))  # the plan's decay
    assert rates[100] == pytest.approx(5e-4)  # the fine-tuning recipe starts at its own learning rate ...
    assert rates[110] == pytest.approx(2.5e-4) and rates[120] == pytest.approx(0.0, abs=1e-12)  # ... on a cosine to 0
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))
    with pytest.raises(ValueError, match="finetune_steps = 0 >= 1"):
        plan_then_finetune_optimizer(model, pretrain_steps=10, finetune_steps=0, finetune_lr=1e-3)


def test_max_length_defaults_to_the_checkpoints_own(tmp_path, caplog):
    from hf_rlprune.models import RLPruneCNNConfig, RLPruneLSTMConfig

    RLPruneLSTMConfig(vocab_size=20, max_seq_length=64).save_pretrained(tmp_path / "lstm")
    RLPruneCNNConfig().save_pretrained(tmp_path / "cnn")
    assert resolve_max_length(None, str(tmp_path / "lstm")) == 64  # tokenized as it was trained, not at 256
    assert resolve_max_length(None, None) == resolve_max_length(None, str(tmp_path / "cnn")) == DEFAULT_MAX_LENGTH == 256
    with caplog.at_level(logging.WARNING, logger="hf_rlprune.tasks"):
        assert resolve_max_length(128, str(tmp_path / "lstm")) == 128  # asked for: allowed, but said
    assert "max_length 128 differs from the 64 tokens" in caplog.text
    with pytest.raises(FileNotFoundError, match="No checkpoint folder './missing/dense'"):
        checkpoint_config("./missing/dense")


def test_data_that_cannot_train_the_model_is_refused_before_training(tmp_path):
    # images of another size than the CNN's, and fewer training rows than one pre-training batch (the last partial batch
    # is dropped): each refused with the fix, not at the first step or after the whole pre-training
    task_data = prepare_task("cifar10", smoke=True, max_train_samples=100)
    check_images_fit(task_data, build_model("cifar10", "small"))  # 32x32, as the synthetic data
    with pytest.raises(ValueError, match="The train split's images are 32x32 with 3 channels, but the model takes 16x16 with 3"):
        check_images_fit(task_data, RLPruneCNNForImageClassification(RLPruneCNNConfig(image_size=16, conv_channels=[4], hidden_sizes=[8])))
    with pytest.raises(ValueError, match=r"90 training rows are fewer than one pre-training batch of 128 for each of 1 process\(es\); lower the batch size"):
        pretrain(build_model("cifar10", "small"), task_data, str(tmp_path / "dense"), epochs=1, use_cpu=True)
    assert not (tmp_path / "dense").exists()


def test_a_folder_that_is_no_saved_model_is_named_as_such(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="holds no config.json: it is not a saved model"):
        checkpoint_config(str(tmp_path / "notes"))
