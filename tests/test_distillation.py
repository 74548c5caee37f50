import copy
import math

import pytest
import torch
from transformers import TrainingArguments

from hf_rlprune import DistillationTrainer, RLPruneCallback, RLPruneCNNConfig, RLPruneCNNForImageClassification
from hf_rlprune.distillation import distillation_loss
from hf_rlprune.pruning import compute_macs

from .test_callback import TINY_CNN, prune_config, tiny_data


def test_distillation_loss_against_hand_worked_numbers():
    student, teacher = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # T = 2: p_teacher = softmax([0.5, 0]), p_student = softmax([0, 0.5]); KL = (p1 - p2) * (0.5 - (-0.5)) for these two
    p = 1 / (1 + math.exp(-0.5))
    expected = 4 * (p * math.log(p / (1 - p)) + (1 - p) * math.log((1 - p) / p))
    assert float(distillation_loss(student, teacher, temperature=2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(teacher, teacher, temperature=2.0)) == pytest.approx(0.0, abs=1e-7)


def make_trainer(tmp_path, alpha, teacher, model=None, callbacks=(), max_steps=20):
    train_set, reward_set = tiny_data()
    args = TrainingArguments(str(tmp_path), max_steps=max_steps, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    torch.manual_seed(1)
    model = model or RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))
    return DistillationTrainer(model=model, args=args, train_dataset=train_set, callbacks=list(callbacks),
                               teacher=teacher, alpha=alpha, temperature=2.0)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return RLPruneCNNForImageClassification(RLPruneCNNConfig(**TINY_CNN))


def test_loss_mixes_the_models_loss_and_distillation(tmp_path, teacher):
    batch = {key: value[:16] for key, value in tiny_data()[0][:16].items()}
    losses = {}
    for alpha in (0.0, 0.25, 1.0):
        trainer = make_trainer(tmp_path, alpha, teacher)
        trainer.model.eval()  # no dropout: the three losses see the same student
        losses[alpha] = float(trainer.compute_loss(trainer.model, dict(batch)).detach())
    student = make_trainer(tmp_path, 0.0, teacher).model.eval()
    with torch.no_grad():
        own = student(**batch).loss
        kd = distillation_loss(student(pixel_values=batch["pixel_values"]).logits, teacher(pixel_values=batch["pixel_values"]).logits, 2.0)
    assert losses[0.0] == pytest.approx(float(own), rel=1e-6)
    assert losses[1.0] == pytest.approx(float(kd), rel=1e-6)
    assert losses[0.25] == pytest.approx(0.75 * float(own) + 0.25 * float(kd), rel=1e-6)


def test_student_learns_the_teacher_while_pruned_and_the_teacher_stays_frozen(tmp_path, teacher):
    before = copy.deepcopy(teacher.state_dict())
    pixels = tiny_data()[1][:]["pixel_values"]  # (N, 3, 8, 8) held-out inputs
    callback = RLPruneCallback(prune_config(target=0.5), reward_dataset=tiny_data()[1])
    trainer = make_trainer(tmp_path, 1.0, teacher, callbacks=[callback], max_steps=60)
    with torch.no_grad():
        gap_before = float(distillation_loss(trainer.model(pixel_values=pixels).logits, teacher(pixel_values=pixels).logits, 2.0))
    trainer.train()
    student = trainer.model
    assert compute_macs(student) <= 0.5 * compute_macs(teacher)  # the callback pruned it as usual
    with torch.no_grad():
        gap_after = float(distillation_loss(student(pixel_values=pixels).logits, teacher(pixel_values=pixels).logits, 2.0))
    assert gap_after < 0.5 * gap_before  # held-out inputs: the student imitates the teacher, labels weigh nothing here
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_bad_settings_name_the_fix(tmp_path, teacher):
    with pytest.raises(ValueError, match=r"alpha = 1.5 must be in \[0, 1\]"):
        make_trainer(tmp_path, 1.5, teacher)
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=teacher, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]), teacher=teacher, temperature=0)
    with pytest.raises(ValueError, match="label_smoothing_factor=0"):
        DistillationTrainer(model=teacher, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=0.1),
                            teacher=teacher)
    with pytest.raises(ValueError, match=r"teacher is the model being trained.*copy.deepcopy\(model\)"):
        DistillationTrainer(model=teacher, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]), teacher=teacher)
    trainer = make_trainer(tmp_path, 0.5, teacher)
    with pytest.raises(ValueError, match="needs labels"):
        trainer.compute_loss(trainer.model, {"pixel_values": torch.randn(2, 3, 8, 8)})


@pytest.mark.parametrize("trainer_class", ["Trainer", "DistillationTrainer"])
def test_gradient_accumulation_takes_the_large_batchs_step(tmp_path, trainer_class):
    # One step on 32 examples as 1 x 32 or 4 x 8 micro-batches: the same loss and update. The models' losses are
    # batch means, so the Trainer must divide each micro-batch's by the accumulation steps.
    from transformers import Trainer

    train_set = tiny_data(n=80)[0].select(range(32))
    config = RLPruneCNNConfig(**TINY_CNN, dropout=0.0)
    torch.manual_seed(2)
    teacher_model = RLPruneCNNForImageClassification(config)

    def one_step(batch_size, accumulation):
        torch.manual_seed(0)
        model = RLPruneCNNForImageClassification(config)
        before = model.classifier.weight.detach().clone()
        args = TrainingArguments(str(tmp_path / f"{batch_size}"), max_steps=1, per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd", max_grad_norm=1e9,
                                 lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                 disable_tqdm=True, seed=0, data_seed=0)
        extra = {} if trainer_class == "Trainer" else dict(teacher=copy.deepcopy(teacher_model), alpha=0.5)
        trainer = (Trainer if trainer_class == "Trainer" else DistillationTrainer)(model=model, args=args, train_dataset=train_set, **extra)
        trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        return loss, model.classifier.weight.detach() - before

    (loss_whole, update_whole), (loss_split, update_split) = one_step(32, 1), one_step(8, 4)
    assert loss_split == pytest.approx(loss_whole, rel=1e-4)
    assert torch.allclose(update_split, update_whole, atol=1e-6) and update_whole.abs().max() > 1e-4
    from hf_rlprune import RLPruneLSTMForSequenceClassification

    assert RLPruneLSTMForSequenceClassification.accepts_loss_kwargs is False  # the LSTM's loss is a batch mean too
