import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_rlprune import RLPruneCallback, RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneConfig
from hf_rlprune.callback_state import STATE_FILE, read_state
from hf_rlprune.pruning import compact, compute_macs, get_masks
from hf_rlprune.reward import batched_accuracy

TINY_CNN = dict(conv_channels=[8, 16], hidden_sizes=[32], image_size=8)


def tiny_data(n=192, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 8, 8, generator=generator)
    labels = (pixels[:, 0].mean((1, 2)) > 0).long() + 2 * (pixels[:, 1].mean((1, 2)) > 0).long()  # 4 learnable classes
    dataset = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")
    return dataset.select(range(n - 48)), dataset.select(range(n - 48, n))


def prune_config(**overrides):
    values = dict(target=0.3, num_rounds=2, search_episodes=4, ppo_episodes_per_update=2, recovery_steps=2, show_progress=False,
                  start_fraction=0.2, end_fraction=0.6)
    return RLPruneConfig(**{**values, **overrides})


def train(output_dir, config=None, extra_callbacks=(), resume=None, trailing_callbacks=(), resume_in_args=True, **training_overrides):
    torch.manual_seed(0)
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))
    train_set, reward_set = tiny_data()
    values = dict(max_steps=20, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[], save_strategy="no",
                  logging_steps=5, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
                  resume_from_checkpoint=resume if resume_in_args else None)
    args = TrainingArguments(str(output_dir), **{**values, **training_overrides})
    callback = RLPruneCallback(config or prune_config(), reward_dataset=reward_set)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=reward_set,
                      callbacks=[*extra_callbacks, callback, *trailing_callbacks], compute_metrics=_accuracy)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def _accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


class LogRecorder(TrainerCallback):
    """Sits where report_to integrations sit: before RLPruneCallback in the handler."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callback_prunes_compacts_and_saves(tmp_path):
    recorder = LogRecorder()
    trainer, callback = train(tmp_path, extra_callbacks=[recorder])
    model = trainer.model
    dense_macs = compute_macs(RLPruneCNNConfig(**TINY_CNN))
    assert compute_macs(model.config) <= 0.3 * dense_macs  # physically small, within budget
    assert sum(p.numel() for p in model.parameters()) == callback.report["params"]["pruned"]
    assert len(callback.history) == 2 and callback.history[-1]["target"] == pytest.approx(0.3)
    assert callback.history[0]["target"] == pytest.approx(0.3 + 0.7 * 0.5**3)  # the cubic schedule tightens over rounds
    assert [h["step"] for h in callback.history] == [4, 12]
    # per-round metrics reach integrations that run before us, and the log history
    assert any("rlprune/macs" in logs for logs in recorder.logs)
    assert sum("rlprune/macs" in entry for entry in trainer.state.log_history) == 2
    saved = tmp_path / "pruned"
    for name in ("model.safetensors", "config.json", "pruning_report.json", "README.md", "accuracy_vs_macs.png", "modeling_rlprune_cnn.py"):
        assert (saved / name).exists(), name
    card = (saved / "README.md").read_text()
    assert "{{" not in card and "model-index" in card and "conv_blocks.1" in card
    assert card.count("type: accuracy") == 1  # the model-index holds this model's results, not the dense model's
    assert "of the dense model's\nMACs**" in card  # the unit as written everywhere else, not "MACS"
    # a user's own run: the card names no dataset it was not told about, and no command it does not know
    assert "datasets:" not in card and "cifar10" not in card and "type: custom" in card
    assert "## Reproduce" not in card and "{%" not in card
    assert "2 rounds on a cubic budget schedule," in card and "`pruning_report.json` next to this card" in card
    report = json.loads((saved / "pruning_report.json").read_text())
    assert report["macs"]["pruned"] == compute_macs(model.config)
    assert report["search"]["reward_evaluations"] == 8
    assert report["reward_setup"] == {"refit": True, "refit_ridge": 0.01, "bn_recalibration_batches": 0, "recovery_steps": 2}
    assert "ridge least squares (ridge 0.01), then 2 recovery steps" in card
    # lockstep batches never exceed ppo_episodes_per_update (2): two PPO updates per round, as one at a time
    assert callback.agent.num_updates == 4
    loaded = AutoModelForImageClassification.from_pretrained(saved).eval()
    pixels = torch.randn(4, 3, 8, 8)
    assert loaded.config.conv_channels == model.config.conv_channels
    assert torch.allclose(loaded(pixels).logits, model.eval()(pixels).logits, atol=1e-6)
    assert not list(tmp_path.glob(".pruned.tmp-*"))


def test_save_dir_is_never_a_folder_of_other_files(tmp_path, monkeypatch):
    # Saving replaces the whole folder: only a new or empty one, or an earlier pruned model, may be replaced.
    from hf_rlprune.card import check_save_dir, save_pruned_model

    notes = tmp_path / "mine" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("keep me")
    with pytest.raises(ValueError, match=r"already holds other files \(notes.txt\) and no pruning_report.json"):
        save_pruned_model(torch.nn.Linear(1, 1), notes.parent, report={})
    assert notes.read_text() == "keep me"
    with pytest.raises(ValueError, match="is a file"):
        check_save_dir(notes)
    monkeypatch.chdir(notes.parent)
    with pytest.raises(ValueError, match="current working directory"):
        check_save_dir(".")
    (tmp_path / "empty").mkdir()
    assert check_save_dir(tmp_path / "empty") == (tmp_path / "empty").resolve()
    # through the callback, before one training step: save_dir is the Trainer's output_dir, where checkpoints go
    recorder = LogRecorder()
    with pytest.raises(ValueError, match="holds the output_dir"):
        train(tmp_path / "run", prune_config(save_dir=str(tmp_path / "run")), extra_callbacks=[recorder])
    assert not recorder.logs
    # a pruned model saved before is replaced by the next save (test_callback_prunes_compacts_and_saves saves once)
    train(tmp_path / "twice", save_strategy="no")
    first = (tmp_path / "twice" / "pruned" / "pruning_report.json").stat().st_mtime_ns
    train(tmp_path / "twice", save_strategy="no")
    assert (tmp_path / "twice" / "pruned" / "pruning_report.json").stat().st_mtime_ns > first


class StopAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_card_of_a_run_stopped_before_its_last_round(tmp_path, caplog):
    # rounds at steps 4 and 12; stopped at 6: the model is at round 1's budget, and its card says so
    trainer, callback = train(tmp_path / "one", trailing_callbacks=[StopAtStep(6)])
    assert callback.rounds_done == 1
    first_target = callback.history[0]["target"]
    assert compute_macs(trainer.model.config) <= first_target * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    card = (tmp_path / "one" / "pruned" / "README.md").read_text()
    assert f"budget of **{100 * first_target:.0f}% of the dense model's" in card and "1 of 2 planned rounds" in card
    # stopped at 2, before any round: saved dense, and neither the card nor the log claims a budget
    with caplog.at_level(logging.WARNING, logger="hf_rlprune.callback"):
        trainer, callback = train(tmp_path / "none", trailing_callbacks=[StopAtStep(2)])
    assert callback.rounds_done == 0 and "before the first pruning round" in caplog.text
    card = (tmp_path / "none" / "pruned" / "README.md").read_text()
    assert "budget of **100% of the dense model's" in card and "0 of 2 planned rounds" in card
    # one planned round has no schedule to speak of
    train(tmp_path / "single", prune_config(num_rounds=1, start_fraction=0.2, end_fraction=0.2), trailing_callbacks=[StopAtStep(2)])
    card = (tmp_path / "single" / "pruned" / "README.md").read_text()
    assert "importance, no round (training ended before it),\n" in card and "schedule" not in card


def test_one_callback_prunes_each_new_run_afresh(tmp_path):
    # the Trainer's model_init gives the second train() a new model: the callback must not carry the first run over
    train_set, reward_set = tiny_data()
    callback = RLPruneCallback(prune_config(save_on_train_end=False), reward_dataset=reward_set)

    def init():
        torch.manual_seed(0)
        return RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))

    args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    trainer = Trainer(model_init=init, args=args, train_dataset=train_set, callbacks=[callback])
    trainer.train()
    first = [h["masks_sha1"] for h in callback.history]
    trainer.train()
    assert callback.rounds_done == 2 and [h["masks_sha1"] for h in callback.history] == first  # same seed, same decisions
    assert compute_macs(trainer.model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    assert callback.report["macs"]["dense"] == compute_macs(RLPruneCNNConfig(**TINY_CNN))


def test_round_metrics_reach_the_integrations_of_the_trainer_that_runs(tmp_path):
    # one callback in two live Trainers: each run's per-round metrics go to that Trainer's report_to integrations
    train_set, reward_set = tiny_data()
    callback = RLPruneCallback(prune_config(save_on_train_end=False), reward_dataset=reward_set)
    recorders, trainers = [LogRecorder(), LogRecorder()], []
    for index, recorder in enumerate(recorders):
        torch.manual_seed(0)
        model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))
        args = TrainingArguments(str(tmp_path / str(index)), max_steps=20, per_device_train_batch_size=16, learning_rate=3e-3,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
        trainers.append(Trainer(model=model, args=args, train_dataset=train_set, callbacks=[recorder, callback]))
    for trainer, recorder in zip(trainers, recorders):  # the second run while the first Trainer is still alive
        trainer.train()
        assert sum("rlprune/macs" in logs for logs in recorder.logs) == 2
    assert all(sum("rlprune/macs" in logs for logs in recorder.logs) == 2 for recorder in recorders)  # none got the other's


class OutOfMemoryOnce(TrainerCallback):
    """Raises the CPU allocator's out-of-memory error once, at `step`: auto_find_batch_size retries with a smaller batch."""

    def __init__(self, step):
        self.step, self.fired, self.masks_before_rounds = step, False, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in (1, 3):
            self.masks_before_rounds.append(get_masks(model))
        if state.global_step == self.step and not self.fired:
            self.fired = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")


def test_auto_find_batch_size_retry_starts_the_pruning_afresh(tmp_path):
    # The retry keeps the model: the first attempt's masks must not prune its warm-up, and the rounds' training batches
    # take the retry's batch size
    oom = OutOfMemoryOnce(step=6)  # after round 1 (step 4)
    trainer, callback = train(tmp_path, prune_config(save_on_train_end=False), extra_callbacks=[oom], auto_find_batch_size=True)
    assert oom.fired and oom.masks_before_rounds[-2:] == [{}, {}]  # steps 1 and 3 of the retry: unmasked
    assert callback._batch_size == trainer._train_batch_size < 16
    assert len(callback.history) == 2 and callback.reward_evaluations == 8  # the retry's two rounds, not three
    assert compute_macs(trainer.model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    # resumed, then out of memory: the Trainer loaded the checkpoint's weights once, before the attempt that trained
    # them further, so the retry takes the same checkpoint's state without matching its weights again
    train(tmp_path / "saved", prune_config(save_on_train_end=False), save_strategy="steps", save_steps=8)
    oom = OutOfMemoryOnce(step=10)  # between round 1 (step 4, before the checkpoint) and round 2 (step 12)
    trainer, callback = train(tmp_path / "saved", prune_config(save_on_train_end=False), extra_callbacks=[oom],
                              resume=str(tmp_path / "saved" / "checkpoint-8"), resume_in_args=False, save_strategy="steps",
                              save_steps=8, auto_find_batch_size=True)
    assert oom.fired and [record["step"] for record in callback.history] == [4, 12] and callback.reward_evaluations == 8


def test_hyperparameter_search_trials_keep_their_own_pruning_state_and_model(tmp_path):
    # Each trial checkpoints in a folder of its own (<output_dir>/<hp_name(trial)>): its pruning state and pruned model go
    # there too, not into output_dir, where the trials would overwrite each other's
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_set, reward_set = tiny_data()

    def init(trial=None):
        torch.manual_seed(0)
        return RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))

    args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=16, report_to=[], save_strategy="steps",
                             save_steps=8, eval_strategy="steps", eval_steps=20, use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model_init=init, args=args, train_dataset=train_set, eval_dataset=reward_set, compute_metrics=_accuracy,
                      callbacks=[RLPruneCallback(prune_config(), reward_dataset=reward_set)])

    def space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}

    with pytest.raises(ValueError, match="pass hp_name"):  # unnamed trials: their folders cannot be known
        trainer.hyperparameter_search(direction="maximize", backend="optuna", n_trials=1, hp_space=space)
    trainer.hyperparameter_search(direction="maximize", backend="optuna", n_trials=2, hp_space=space,
                                  hp_name=lambda trial: f"trial-{trial.number}")
    for trial in ("trial-0", "trial-1"):
        assert (tmp_path / trial / "checkpoint-8" / STATE_FILE).exists() and (tmp_path / trial / "pruned" / "model.safetensors").exists()
    assert not (tmp_path / "checkpoint-8").exists() and not (tmp_path / "pruned").exists()


def test_training_again_after_compaction_needs_a_new_optimizer(tmp_path):
    trainer, _ = train(tmp_path, prune_config(save_on_train_end=False))
    trainer.args.max_steps = 4
    with pytest.raises(ValueError, match="optimizer still holds the dense model's parameters"):
        trainer.train()  # the kept optimizer would step parameters the compacted model no longer has
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.train()
    assert any(not torch.equal(trainer.model.state_dict()[name], value) for name, value in before.items())


def test_same_seed_same_decisions_and_other_methods(tmp_path):
    _, first = train(tmp_path / "a")
    _, second = train(tmp_path / "b")
    assert [h["masks_sha1"] for h in first.history] == [h["masks_sha1"] for h in second.history]
    _, uniform = train(tmp_path / "u", prune_config(method="uniform"))
    assert uniform.reward_evaluations == 2  # one evaluation per round
    ratios = list(uniform.history[-1]["keep_ratios"].values())
    # one keep ratio for every layer; the fill then gives the budget's leftover to the layer that can still grow
    # (here the dense one: a conv channel costs far more than a dense unit)
    assert ratios[0] == ratios[1] and ratios[2] >= ratios[0]
    _, random = train(tmp_path / "r", prune_config(method="random"))
    assert random.reward_evaluations == 8
    assert uniform.history[-1]["macs_ratio"] <= 0.3 and random.history[-1]["macs_ratio"] <= 0.3


@pytest.mark.parametrize("importance", ["l1", "taylor"])  # Taylor scores accumulate over steps: they must be resumed too
def test_resumed_run_makes_the_same_decisions(tmp_path, importance):
    _, uninterrupted = train(tmp_path / "full", prune_config(importance=importance), save_strategy="steps", save_steps=8)
    checkpoint = tmp_path / "full" / "checkpoint-8"
    assert (checkpoint / STATE_FILE).exists() and (checkpoint / "rlprune_agent.safetensors").exists()
    # a second run, writing elsewhere, resumes from step 8: after round 1 (step 4), before round 2 (step 12)
    _, resumed = train(tmp_path / "resumed", prune_config(importance=importance), resume=str(checkpoint), save_strategy="steps", save_steps=8)
    assert [h["masks_sha1"] for h in resumed.history] == [h["masks_sha1"] for h in uninterrupted.history]
    assert resumed.history[-1]["widths"] == uninterrupted.history[-1]["widths"]
    assert resumed.reward_evaluations == uninterrupted.reward_evaluations == 8  # the count carried over the resume
    assert resumed.report["search"]["reward_evaluations"] == 8
    if importance == "l1":
        # resumed through train() alone, from outside output_dir, which holds another run's checkpoint of that step:
        # that run's state (saved with other weights) is refused, not taken for this one's
        train(tmp_path / "other", prune_config(prune_seed=1, target=0.5), save_strategy="steps", save_steps=8)
        with pytest.raises(ValueError, match=r"saved with other weights .*\(resume_from_checkpoint=\.\.\.\) too"):
            train(tmp_path / "other", prune_config(), resume=str(checkpoint), resume_in_args=False)
    if importance == "l1":  # a damaged or missing agent state is an error, not a fresh agent deciding otherwise
        agent_file = checkpoint / "rlprune_agent.safetensors"
        agent_file.write_bytes(agent_file.read_bytes()[:100])
        with pytest.raises(ValueError, match="rlprune_agent.safetensors is corrupt or truncated"):
            train(tmp_path / "again", prune_config(), resume=str(checkpoint))
        agent_file.unlink()
        with pytest.raises(FileNotFoundError, match="has no rlprune_agent.safetensors"):
            train(tmp_path / "again", prune_config(), resume=str(checkpoint))
    if importance == "taylor":  # the accumulated scores went through the checkpoint: the same sums at the end
        assert resumed.taylor.steps == uninterrupted.taylor.steps > 0
        assert resumed.taylor.scores.keys() == uninterrupted.taylor.scores.keys()
        for name, scores in uninterrupted.taylor.scores.items():
            assert torch.allclose(resumed.taylor.scores[name], scores, rtol=1e-4, atol=1e-8), name


def test_gradient_accumulation_mixed_precision_eval_and_best_model(tmp_path):
    trainer, callback = train(
        tmp_path, gradient_accumulation_steps=2, bf16=True, eval_strategy="steps", eval_steps=16, save_strategy="steps", save_steps=16,
        load_best_model_at_end=True, metric_for_best_model="accuracy", max_steps=20,
    )
    assert compute_macs(trainer.model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    assert any("eval_accuracy" in entry for entry in trainer.state.log_history)


def test_best_checkpoint_from_before_the_first_round_is_saved_unpruned(tmp_path, monkeypatch):
    # A checkpoint saved before any round holds no masks: the model saved is that checkpoint's, at the dense widths,
    # not its weights cut to the last round's widths without the fine-tuning that followed the cut.
    monkeypatch.setattr(sys.modules[__name__], "_accuracy", lambda prediction: {"accuracy": 0.5})  # a tie keeps the first
    trainer, callback = train(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                              load_best_model_at_end=True, metric_for_best_model="accuracy")
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")  # before the first round, at step 4
    assert compute_macs(trainer.model.config) == compute_macs(RLPruneCNNConfig(**TINY_CNN))
    assert callback.rounds_done == 0 and callback.report["macs"]["pruned"] == callback.report["macs"]["dense"]
    assert callback.report["compaction_check"]["float32"]["agrees"]


def test_a_streaming_training_set_is_refused_at_train_begin_when_the_reward_needs_its_batches(tmp_path):
    train_set, reward_set = tiny_data()
    stream = train_set.to_iterable_dataset()  # valid for the Trainer with max_steps, but has no length to shuffle

    def fit(config):
        torch.manual_seed(0)
        model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))
        args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=16, report_to=[], save_strategy="no",
                                 use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=stream, callbacks=[RLPruneCallback(config, reward_dataset=reward_set)])
        trainer.train()
        return trainer

    with pytest.raises(ValueError, match="iterable \\(streaming\\) dataset.*map-style"):
        fit(prune_config())  # the refit (on by default) needs shuffled training batches
    trainer = fit(prune_config(refit=False, recovery_steps=0, save_on_train_end=False))  # a reward on the reward split alone
    assert compute_macs(trainer.model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))


def test_reward_split_loses_the_columns_the_trainer_drops(tmp_path):
    # A common idiom: the prepared sets keep a raw column (here ragged lists, which no collator can stack). The Trainer
    # drops it from the training batches (remove_unused_columns); the reward split must be batched the same way.
    train_set, reward_set = tiny_data()
    train_set = train_set.add_column("caption", [[1] * (1 + i % 3) for i in range(len(train_set))])
    reward_set = reward_set.add_column("caption", [[1] * (1 + i % 3) for i in range(len(reward_set))])

    def fit(reward, **overrides):
        torch.manual_seed(0)
        model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))
        args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=16, report_to=[], save_strategy="no",
                                 use_cpu=True, disable_tqdm=True, **overrides)
        config = prune_config(save_on_train_end=False)
        trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=[RLPruneCallback(config, reward_dataset=reward)])
        trainer.train()
        return trainer

    assert compute_macs(fit(reward_set).model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    # a list of examples (or a torch Dataset) loses them per example, as the Trainer's own collator wrapper does
    assert compute_macs(fit(list(reward_set)).model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    with pytest.raises(ValueError, match=r"reward_dataset has no column the model takes \(columns \['caption'\]"):
        fit(reward_set.select_columns(["caption"]))


def test_collated_extras_the_model_ignores_and_a_frozen_pruned_layer(tmp_path):
    # A collator may add what the model's forward ignores (ids, a per-batch flag); users freeze layers while fine-tuning.
    # Neither may break a round: the refit merges batches, and masks cut only gradients that exist.
    def collate(rows):
        batch = default_data_collator(rows)
        return {**batch, "sample_ids": [f"id{index}" for index in range(len(rows))], "scale": torch.tensor(1.0)}

    train_set, reward_set = tiny_data()
    torch.manual_seed(0)
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))
    model.conv_blocks[0].requires_grad_(False)
    frozen_before = model.conv_blocks[0].conv.weight.detach().clone()
    args = TrainingArguments(str(tmp_path), max_steps=20, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, remove_unused_columns=False)
    callback = RLPruneCallback(prune_config(), reward_dataset=reward_set)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate, callbacks=[callback])
    trainer.train()
    assert compute_macs(trainer.model.config) <= 0.3 * compute_macs(RLPruneCNNConfig(**TINY_CNN))
    compacted = trainer.model.conv_blocks[0].conv.weight  # frozen: every kept filter is one of the original ones
    assert len(compacted) < len(frozen_before) and all(any(torch.equal(row, original) for original in frozen_before) for row in compacted)


def test_a_streamed_reward_split_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="without a length .*streaming=False"):
        RLPruneCallback(prune_config(), reward_dataset=(example for example in tiny_data()[1]))


def test_impossible_budget_fails_before_training(tmp_path):
    recorder = LogRecorder()
    with pytest.raises(ValueError, match=r"RLPruneConfig\(target=0.001.*cannot be met"):
        train(tmp_path, prune_config(target=0.001, min_keep=0.5), extra_callbacks=[recorder])
    assert not recorder.logs  # not one training step was logged


def test_resume_without_pruning_state_names_the_paths(tmp_path):
    trainer, _ = train(tmp_path / "plain", save_strategy="steps", save_steps=8)
    (tmp_path / "plain" / "checkpoint-8" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        train(tmp_path / "other", resume=str(tmp_path / "plain" / "checkpoint-8"))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="reward_dataset"):
        RLPruneCallback(prune_config())
    with pytest.raises(ValueError, match="target"):
        RLPruneConfig(target=0.0)
    with pytest.raises(ValueError, match="method"):
        RLPruneConfig(method="greedy")
    with pytest.raises(ValueError, match="leaves the PPO agent no choice"):
        RLPruneConfig(min_keep=1.0)
    with pytest.raises(ValueError, match="candidates_per_pass"):
        RLPruneConfig(candidates_per_pass=0)
    with pytest.raises(ValueError, match="refit_applied = True needs refit = True"):
        RLPruneConfig(refit_applied=True, refit=False)
    with pytest.raises(ValueError, match="set refit = False"):
        RLPruneConfig(refit_ridge=None)
    _, reward = tiny_data()
    callback = RLPruneCallback(prune_config(), reward_dataset=reward)
    regression = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN, num_labels=1))
    with pytest.raises(ValueError, match="num_labels = 1 \\(a regression head\\)"):
        callback.on_train_begin(None, None, None, model=regression)
    same_repo = RLPruneCallback(prune_config(pruned_hub_model_id="org/model"), reward_dataset=reward)
    args = TrainingArguments(str(tmp_path), push_to_hub=True, hub_model_id="org/model", report_to=[])
    with pytest.raises(ValueError, match="would delete the Trainer's pushed checkpoints there"):
        same_repo.on_train_begin(args, None, None, model=RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN)))
    with pytest.raises(FileNotFoundError, match="not written by RLPruneCallback"):
        read_state(str(tmp_path))
    (tmp_path / STATE_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        read_state(str(tmp_path))
    save_file({"x": torch.zeros(1)}, str(tmp_path / STATE_FILE), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an hf_rlprune callback state"):
        read_state(str(tmp_path))


def test_pruning_state_round_trips_through_its_file(tmp_path):
    from hf_rlprune.callback_state import PruningState, write_state

    state = PruningState(dense_config=json.loads(RLPruneCNNConfig(**TINY_CNN).to_json_string()), rounds_done=2, history=[{"round": 1, "widths": {"a": 3}}],
                         search_seconds=1.25, reward_evaluations=8, masks={"conv_blocks.0": torch.tensor([True, False, True])},
                         taylor_scores={"conv_blocks.0": torch.tensor([0.5, 0.0, 2.0])}, taylor_steps=7, weights_sha1="ab12")
    write_state(str(tmp_path), state)
    loaded = read_state(str(tmp_path))
    assert loaded.masks["conv_blocks.0"].dtype == torch.bool and torch.equal(loaded.masks["conv_blocks.0"], state.masks["conv_blocks.0"])
    assert torch.equal(loaded.taylor_scores["conv_blocks.0"], state.taylor_scores["conv_blocks.0"])
    assert (loaded.dense_config, loaded.rounds_done, loaded.history, loaded.search_seconds, loaded.reward_evaluations, loaded.taylor_steps,
            loaded.weights_sha1) == (state.dense_config, 2, state.history, 1.25, 8, 7, "ab12")
    write_state(str(tmp_path), PruningState(dense_config={}))  # before the first round: no tensors at all
    assert read_state(str(tmp_path)).masks == {} and read_state(str(tmp_path)).weights_sha1 is None
    assert not (tmp_path / "rlprune_agent.safetensors").exists()


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_callback import prune_config, train
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    # Each rank gets its own search seed: only rank 0's search may count, so the ranks agree only if it is broadcast.
    trainer, callback = train(out, prune_config(prune_seed=rank), ddp_backend="gloo")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"history": [h["masks_sha1"] for h in callback.history], "widths": trainer.model.config.conv_channels}, handle)
    """
)


def test_two_process_ddp_applies_identical_masks(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(script), str(tmp_path / "out"), os.path.dirname(__file__)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert len(ranks[0]["history"]) == 2
    assert (tmp_path / "out" / "pruned" / "model.safetensors").exists()  # written once, by rank 0


def test_refit_reward_through_the_trainer_with_and_without_recovery(tmp_path):
    # The refit (on by default) needs training batches even without recovery steps; the budget holds and the same seed
    # repeats.
    runs = {}
    for steps in (0, 2):
        _, runs[steps] = train(tmp_path / f"refit{steps}", prune_config(recovery_steps=steps))
        assert runs[steps].history[-1]["macs_ratio"] <= 0.3 and runs[steps].reward_evaluations == 8
    _, again = train(tmp_path / "again", prune_config(recovery_steps=0, refit_ridge=0.01))
    assert [h["masks_sha1"] for h in again.history] == [h["masks_sha1"] for h in runs[0].history]
    _, plain = train(tmp_path / "plain", prune_config(refit=False, recovery_steps=0))
    assert [h["reward"] for h in plain.history] != [h["reward"] for h in runs[0].history]  # the refit changed the rewards


def pattern_data(n=192, seed=0):
    """Four classes, each a fixed random image plus noise: learnt in a few dozen steps, unlike `tiny_data`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    patterns = torch.randn(4, 3, 8, 8, generator=generator)
    pixels = torch.randn(n, 3, 8, 8, generator=generator) + patterns[labels]  # (N, 3, 8, 8)
    dataset = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")
    return dataset.select(range(n - 48)), dataset.select(range(n - 48, n))


class RoundRecorder(TrainerCallback):
    """Runs after RLPruneCallback: right after each pruning round, the trained model's reward-split accuracy and
    whether its weights are the evaluator's refit of the chosen allocation."""

    def __init__(self):
        self.rlprune, self.accuracies, self.holds_refit = None, [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        history = self.rlprune.history
        if history and history[-1]["step"] == state.global_step and len(self.accuracies) < len(history):
            self.accuracies.append(batched_accuracy(model, self.rlprune._evaluator.reward_batches))
            refitted = self.rlprune._evaluator.refitted_tensors(history[-1]["widths"])
            tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            self.holds_refit.append(all(torch.equal(tensors[name], value) for name, value in refitted.items()))


@pytest.mark.parametrize("refit_applied, norm_batches", [(True, 0), (False, 0), (True, 2)],
                         ids=["applied", "not-applied", "applied-with-batch-norm-recalibration"])
def test_the_trained_model_continues_from_the_refitted_candidate(tmp_path, refit_applied, norm_batches):
    # Without recovery steps the reward is the candidate's accuracy right after its refit (and its batch norms'
    # recalibration): with refit_applied the trained model takes those weights and statistics, so it scores exactly
    # the chosen candidate's reward accuracy.
    recorder = RoundRecorder()
    config = prune_config(refit_ridge=0.01, recovery_steps=0, refit_applied=refit_applied, num_rounds=1, target=0.5,
                          start_fraction=0.5, end_fraction=0.5, bn_recalibration_batches=norm_batches)
    train_set, reward_set = pattern_data()
    recorder.rlprune = RLPruneCallback(config, reward_dataset=reward_set)
    torch.manual_seed(0)
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN, use_batch_norm=norm_batches > 0))
    args = TrainingArguments(str(tmp_path), max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    Trainer(model=model, args=args, train_dataset=train_set, callbacks=[recorder.rlprune, recorder]).train()
    record = recorder.rlprune.history[0]
    assert record["step"] == 30 and record["reward_accuracy"] > 0.4  # a trained model, well above chance (0.25)
    assert recorder.holds_refit == [refit_applied]
    if refit_applied:
        assert recorder.accuracies == [record["reward_accuracy"]]
    assert recorder.rlprune.report["reward_setup"]["bn_recalibration_batches"] == norm_batches
    if norm_batches:  # the statistics came with the weights: recomputed, not the round's running averages
        assert "batch-norm statistics recomputed on 2 training batches" in (tmp_path / "pruned" / "README.md").read_text()
        assert len(recorder.rlprune._recovery_batches(0)) == max(norm_batches, recorder.rlprune._evaluator.repair.refit_batches)
        evaluator = recorder.rlprune._evaluator
        carried = {name: value for name, value in evaluator.refitted_tensors(record["widths"]).items() if "running_var" in name}
        assert len(carried) == 2 and all(not torch.equal(value, evaluator._snapshot[name]) for name, value in carried.items())


def test_the_report_records_batch_norm_recalibration_only_where_it_ran(tmp_path):
    _, callback = train(tmp_path, prune_config(num_rounds=1, bn_recalibration_batches=3))  # TINY_CNN has no batch norm
    assert callback.report["reward_setup"]["bn_recalibration_batches"] == 0
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "batch-norm" not in card
    assert "importance, one round,\n" in card and "schedule" not in card  # one round has no budget schedule


def test_the_compacted_model_is_checked_against_the_masked_one(tmp_path, monkeypatch, caplog):
    _, callback = train(tmp_path / "ok", prune_config(num_rounds=1))
    check = callback.report["compaction_check"]
    assert check["agrees"] and check["float32"]["max_logit_difference"] < 1e-4 and "bfloat16" not in check

    def broken_compact(model):  # a compaction that changes what the model computes
        small = compact(model)
        with torch.no_grad():
            small.classifier.bias.add_(1.0)
        return small

    monkeypatch.setattr("hf_rlprune.callback.compact", broken_compact)
    with caplog.at_level("WARNING", logger="hf_rlprune.callback"):
        _, callback = train(tmp_path / "broken", prune_config(num_rounds=1))
    assert not callback.report["compaction_check"]["agrees"]
    assert callback.report["compaction_check"]["float32"]["max_logit_difference"] == pytest.approx(1.0, abs=1e-4)
    assert "compacted model's float32 logits differ" in caplog.text


class WrongUnderAutocast(torch.nn.Module):
    """A layer that is right in float32 and wrong in half precision, as cuDNN's half LSTM was for some widths."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states):
        logits = self.layer(hidden_states)  # (B, labels)
        return -logits if torch.is_autocast_enabled(hidden_states.device.type) else logits


def test_the_compaction_check_runs_in_float32_and_in_the_training_precision(tmp_path, monkeypatch, caplog):
    # Under bf16 the Trainer's model runs under autocast (accelerate wraps its forward): the float32 check must still be
    # float32, and the bf16 check must catch a compacted model that is only wrong in bf16.
    _, callback = train(tmp_path / "ok", prune_config(num_rounds=1), bf16=True)
    check = callback.report["compaction_check"]
    assert check["float32"]["max_logit_difference"] < 1e-4
    assert check["bfloat16"]["agrees"] and check["bfloat16"]["prediction_agreement"] >= 0.98 and check["agrees"]

    def compact_wrong_in_bf16(model):
        small = compact(model)
        small.classifier = WrongUnderAutocast(small.classifier)
        return small

    monkeypatch.setattr("hf_rlprune.callback.compact", compact_wrong_in_bf16)
    with caplog.at_level("WARNING", logger="hf_rlprune.callback"):
        _, callback = train(tmp_path / "broken", prune_config(num_rounds=1), bf16=True)
    check = callback.report["compaction_check"]
    # float32 agrees only if accelerate's autocast wrapper on the model's forward was bypassed
    assert check["float32"]["agrees"] and not check["bfloat16"]["agrees"] and not check["agrees"]
    assert check["bfloat16"]["prediction_agreement"] < 0.5
    assert "compacted model's bfloat16 logits differ" in caplog.text
