"""The benchmark scripts end to end on synthetic data: benchmark.py's random one-shot runs feed bench_fidelity.py."""

import copy
import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_rlprune import RLPruneCallback, RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneConfig
from hf_rlprune.data import make_synthetic_cifar, normalize_images
from hf_rlprune.device_data import DeviceBatchCollator
from hf_rlprune.pruning import apply_masks, masks_from_widths, widths_from_keep_ratios
from hf_rlprune.reward import batched_accuracy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A local folder in the Hub's parquet layout, as `load_dataset(folder)` reads ../shared/data/cifar10."""
    root = tmp_path_factory.mktemp("cifar10")
    (root / "plain_text").mkdir()
    for split, dataset in make_synthetic_cifar(600, 200, seed=0).items():
        dataset.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # bench_fidelity imports benchmark, as when run from scripts/
    return importlib.import_module("benchmark"), importlib.import_module("bench_fidelity")


def test_fidelity_rescores_the_benchmarks_random_allocations(tmp_path, cifar_dir, scripts):
    benchmark, bench_fidelity = scripts
    common = ["--task", "cifar10", "--dataset_dir", str(cifar_dir), "--batch_size", "32"]
    dense_dir = str(tmp_path / "dense")
    benchmark.main(common + ["--pretrain_epochs", "4", "--save_dense_to", dense_dir, "--methods", "random_oneshot", "--budgets", "0.25", "--seeds", "0", "1", "2", "--finetune_epochs", "1",
                             "--recovery_steps", "0", "--latency_runs", "0", "--output_dir", str(tmp_path / "bench"),
                             "--cards_dir", str(tmp_path / "cards")])
    policies = tmp_path / "bench" / "cifar10.json"
    runs = json.loads(policies.read_text())["runs"]
    assert len({json.dumps(run["report"]["policy"], sort_keys=True) for run in runs}) == 3  # three different random allocations

    summary = bench_fidelity.main(common + ["--dense_model_path", dense_dir, "--policies_from", str(policies), "--fidelity_recovery_steps", "0", "4",
                                            "--fidelity_refit_ridges", "0.1", "--fidelity_bn_recalibration_batches", "0", "2",
                                            "--output", str(tmp_path / "new" / "fidelity.json")])  # a folder not there yet
    written = json.loads((tmp_path / "new" / "fidelity.json").read_text())
    assert [row["rewards"] for row in written["rows"]] == [row["rewards"] for row in summary["rows"]]
    assert summary["test_accuracies"] == [run["test_accuracy"] for run in runs]
    assert [(row["refit_ridge"], row["bn_recalibration_batches"], row["recovery_steps"]) for row in summary["rows"]] == [
        (ridge, norms, steps) for ridge in (None, 0.1) for norms in (0, 2) for steps in (0, 4)]
    no_recovery, recovered, refit_only, refit_recovered = [row for row in summary["rows"] if row["bn_recalibration_batches"] == 0]
    # the reference CNN has no batch norm: recalibrating changes nothing
    for plain, recalibrated in zip(summary["rows"][0:2] + summary["rows"][4:6], summary["rows"][2:4] + summary["rows"][6:8]):
        assert recalibrated["rewards"] == plain["rewards"]
    assert refit_only["rewards"] != no_recovery["rewards"] and refit_recovered["rewards"] != recovered["rewards"]
    held_out = [run["report"]["accuracy"]["reward_split_pruned"] for run in runs]
    assert summary["reward_split_accuracies"] == held_out
    assert all(math.isnan(row["spearman_reward_split"]) or -1.0 <= row["spearman_reward_split"] <= 1.0 for row in summary["rows"])
    # Without recovery a reward is the reward-split accuracy of the dense model masked to the policy's widths.
    args = bench_fidelity.FidelityArguments(task="cifar10", dataset_dir=str(cifar_dir), dense_model_path=dense_dir, batch_size=32)
    setup = benchmark.setup_task(args)
    reward_batches = [DeviceBatchCollator(setup.tensors["reward"], train=False)(range(start, min(start + 256, count)))
                      for count in [len(setup.tensors["reward"]["labels"])] for start in range(0, count, 256)]
    expected = []
    for run in runs:
        masked = copy.deepcopy(setup.dense)
        apply_masks(masked, masks_from_widths(masked, widths_from_keep_ratios(masked, run["report"]["policy"])))
        expected.append(batched_accuracy(masked, reward_batches))
    assert no_recovery["rewards"] == pytest.approx(expected, abs=1e-9)
    assert len(set(expected)) > 1  # the allocations differ in accuracy: the comparison can fail
    assert recovered["rewards"] != no_recovery["rewards"] and all(0.0 <= r <= 1.0 for r in recovered["rewards"])
    assert all(math.isnan(row["spearman"]) or -1.0 <= row["spearman"] <= 1.0 for row in summary["rows"])

    with pytest.raises(ValueError, match="another dense model"):  # a differently trained dense model is refused
        bench_fidelity.main(common + ["--pretrain_epochs", "1", "--policies_from", str(policies), "--output", str(tmp_path / "other.json")])
    with pytest.raises(ValueError, match="task 'cifar10'"):
        bench_fidelity.main(["--task", "imdb", "--policies_from", str(policies)])
    with pytest.raises(ValueError, match=r"0 random_oneshot runs at budgets \[0.5\]"):  # --budgets picks the policies
        bench_fidelity.main(common + ["--budgets", "0.5", "--policies_from", str(policies)])


def test_policies_searched_elsewhere_are_measured_here(tmp_path, monkeypatch, scripts):
    # The deployment workflow: a table from this machine, policies searched on a GPU host with it, measured back here.
    from hf_rlprune import RLPruneCNNConfig
    from hf_rlprune.pruning import LatencyTable
    from tests.test_latency_table import CountingTimer

    benchmark, _ = scripts
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench_latency = importlib.import_module("bench_latency")
    table_path = LatencyTable.build(RLPruneCNNConfig(), batch_size=8, grid=2, timer=CountingTimer()).save(tmp_path / "cnn.json")
    args = benchmark.BenchmarkArguments(latency_table_path=str(table_path))
    assert benchmark.prune_config(args, "ppo_latency", 0.5, 0).latency_table_path == str(table_path)

    def run(method, seed, widths, accuracy):
        layers = [{"name": name, "width": width} for name, width in zip(["conv_blocks.0", "conv_blocks.1", "hidden_layers.0"], widths)]
        return {"method": method, "budget": 0.25, "seed": seed, "test_accuracy": accuracy, "report": {"layers": layers, "budget_kind": "latency"}}

    results = {"task": "cifar10", "args": {"model_preset": "reference"},
               "runs": [run("ppo_latency", 0, [8, 8, 64], 0.5), run("ppo_latency", 1, [8, 8, 64], 0.7), run("ppo_latency", 2, [16, 32, 256], 0.6)]}
    (tmp_path / "runs.json").write_text(json.dumps(results))
    common = ["--batch_size", "8", "--rounds", "1", "--repeats", "1", "--warmup", "0", "--output", str(tmp_path / "out.json")]
    plans = bench_latency.main(common + ["--policies_from", str(tmp_path / "runs.json"), "--policies_table", str(table_path)])
    assert [(plan["seeds"], plan["test_accuracies"]) for plan in plans] == [([0, 1], [0.5, 0.7]), ([2], [0.6])]  # same widths: one row
    table = LatencyTable.load(table_path)
    for plan in plans:
        assert plan["estimated_latency_ratio"] == pytest.approx(table(plan["widths"]) / table.dense_ms)
        assert plan["speedup"] == pytest.approx(plan["dense_ms"] / plan["measured_ms"]) and plan["limit"] == 4.0
    assert plans[0]["speedup"] > 1.0  # 1-6% of the MACs: measurably faster than dense
    assert json.loads((tmp_path / "out.json").read_text())["policies"][0]["widths"] == plans[0]["widths"]

    (tmp_path / "imdb.json").write_text(json.dumps({**results, "task": "imdb"}))
    with pytest.raises(ValueError, match="CIFAR-10 CNN results only"):
        bench_latency.main(common + ["--policies_from", str(tmp_path / "imdb.json")])
    with pytest.raises(ValueError, match="batch_size"):  # a table for another batch size is refused
        bench_latency.main(common[2:] + ["--batch_size", "16", "--policies_from", str(tmp_path / "runs.json"), "--policies_table", str(table_path)])


def test_a_deployment_table_for_a_saved_models_own_structure(tmp_path, monkeypatch):
    from hf_rlprune import RLPruneLSTMConfig
    from hf_rlprune.pruning import LatencyTable

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench_latency = importlib.import_module("bench_latency")
    config = RLPruneLSTMConfig(vocab_size=50, embedding_dim=16, lstm_hidden_sizes=[16], hidden_sizes=[8], max_seq_length=12, pooling="mean")
    config.save_pretrained(tmp_path / "model")
    bench_latency.main(["--model_config", str(tmp_path / "model"), "--compare_budgets", "false", "--batch_size", "4", "--grid", "2",
                        "--table_repeats", "1", "--table_passes", "1", "--allocations", "2", "--rounds", "1", "--repeats", "1",
                        "--warmup", "0", "--save_tables", str(tmp_path / "tables"), "--output", str(tmp_path / "out.json")])
    assert sorted(path.name for path in (tmp_path / "tables").iterdir()) == ["lstm.json"]  # that model's kind only
    table = LatencyTable.load_for(tmp_path / "tables" / "lstm.json", config, "onnxruntime", batch_size=4)  # its structure
    assert table.key["structure"]["pooling"] == "mean" and table.key["seq_len"] == 12
    with pytest.raises(ValueError, match="structure"):
        LatencyTable.load_for(tmp_path / "tables" / "lstm.json", RLPruneLSTMConfig(), "onnxruntime", batch_size=4)


def test_the_best_fine_tuning_epoch_on_the_reward_split_is_kept(tmp_path, cifar_dir, scripts):
    benchmark, _ = scripts
    benchmark.main(["--task", "cifar10", "--dataset_dir", str(cifar_dir), "--batch_size", "32", "--pretrain_epochs", "2",
                    "--methods", "uniform", "--budgets", "0.5", "--seeds", "0", "--finetune_epochs", "3", "--num_rounds", "1",
                    "--end_fraction", "0.2", "--recovery_steps", "0", "--select_best_epoch", "True", "--latency_runs", "0",
                    "--output_dir", str(tmp_path / "bench"), "--cards_dir", str(tmp_path / "cards")])
    run = json.loads((tmp_path / "bench" / "cifar10.json").read_text())["runs"][0]
    by_epoch = dict(run["report"]["fine_tuning"]["reward_split_by_epoch"])  # epoch -> reward-split accuracy
    assert list(by_epoch) == [1.0, 2.0, 3.0]  # every epoch ends after the round at 20% of training
    assert by_epoch[run["report"]["fine_tuning"]["selected_epoch"]] == max(by_epoch.values())
    # the kept epoch's weights are what was compacted and measured: its reward-split accuracy, at the budget
    assert run["report"]["accuracy"]["reward_split_pruned"] == pytest.approx(max(by_epoch.values()), abs=1e-9)
    assert run["report"]["macs"]["pruned"] <= 0.5 * run["report"]["macs"]["dense"]


def test_best_epoch_callback_restores_the_best_epoch_after_the_last_round(scripts):
    benchmark, _ = scripts
    torch.manual_seed(0)
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[4], hidden_sizes=[8], image_size=8, num_labels=3)).eval()
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(pixel_values=normalize_images(images)).logits.argmax(-1)  # the first weights score 100%
    rlprune = RLPruneCallback(RLPruneConfig(num_rounds=1), reward_dataset=[{"labels": 0}])
    keeper = benchmark.BestEpochOnRewardSplit(rlprune, {"images": images, "labels": labels}, autocast_dtype=None)
    first = {name: value.clone() for name, value in model.state_dict().items()}
    keeper.on_epoch_end(None, SimpleNamespace(epoch=1.0), None, model=model)  # before the last round: not a candidate
    rlprune.rounds_done = 1
    keeper.on_epoch_end(None, SimpleNamespace(epoch=2.0), None, model=model)
    with torch.no_grad():
        model.classifier.weight.mul_(-1.0)  # a worse epoch
    keeper.on_epoch_end(None, SimpleNamespace(epoch=3.0), None, model=model)
    assert keeper.epochs == [2.0, 3.0] and keeper.accuracies[0] == 1.0 and keeper.accuracies[1] < 1.0 and keeper.best_epoch == 2
    keeper.on_train_end(None, None, None, model=model)
    assert all(torch.equal(value, first[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("name", ["prune", "benchmark", "bench_fidelity", "bench_latency", "bench_pruning", "bench_reward",
                                  "lstm_width_outliers", "cudnn_lstm_check"])
def test_every_script_prints_its_help(name, monkeypatch, capsys):
    # argparse formats help strings with %: a bare % in a field's help breaks --help
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


def test_lstm_width_outliers_counts_runs_per_compacted_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    outliers = importlib.import_module("lstm_width_outliers")

    def run(seed, embedding, hidden, test):
        layers = [{"name": "embeddings", "width": embedding}, {"name": "lstm_layers.0", "width": hidden}]
        return {"method": "ppo", "budget": 0.25, "seed": seed, "test_accuracy": test,
                "report": {"layers": layers, "accuracy": {"reward_split_pruned": test + 0.01}}}

    path = tmp_path / "imdb.json"
    path.write_text(json.dumps({"runs": [run(0, 41, 72, 0.81), run(1, 43, 71, 0.86), run(2, 64, 64, 0.85)]}))
    runs = outliers.main(["--paths", str(path)])
    assert [r["seed"] for r in runs] == [0, 2, 1]  # sorted by test accuracy
    printed = capsys.readouterr().out
    assert "a multiple of 8, not of 32 (40-184): True   input size multiple of 8: False  runs:   1  below 0.84 test: 1" in printed
    assert "a multiple of 8, not of 32 (40-184): False  input size multiple of 8: False  runs:   1  below 0.84 test: 0" in printed  # 71
    assert "a multiple of 8, not of 32 (40-184): False  input size multiple of 8: True   runs:   1  below 0.84 test: 0" in printed  # 64


def test_benchmark_refuses_bad_settings_before_loading_data(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    benchmark = importlib.import_module("benchmark")
    (tmp_path / "notes.txt").write_text("mine")  # saving the dense model replaces the folder: not one of other files
    with pytest.raises(ValueError, match="--save_dense_to .* already holds other files \\(notes.txt\\) and no config.json"):
        benchmark.main(["--task", "cifar10", "--save_dense_to", str(tmp_path)])
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "config.json").write_text("{}")  # a dense model saved before: replaceable, but not above the results
    with pytest.raises(ValueError, match="--save_dense_to .* holds the output_dir"):
        benchmark.main(["--task", "cifar10", "--save_dense_to", str(tmp_path), "--output_dir", str(tmp_path / "results")])
    with pytest.raises(ValueError, match="--refit_applied True needs --refit_ridge"):
        benchmark.main(["--task", "cifar10", "--refit_applied", "True"])
    with pytest.raises(ValueError, match="--while_pretraining_lr 'cosine': choose 'plan' or 'plan_then_finetune'"):
        benchmark.main(["--task", "cifar10", "--while_pretraining_lr", "cosine"])


def test_width_multiple_reaches_every_method(scripts):
    benchmark, _ = scripts
    default = benchmark.BenchmarkArguments()
    assert benchmark.prune_config(default, "ppo", 0.25, 0).width_multiple == 1  # RLPruneConfig's default for MACs budgets
    snapped = benchmark.BenchmarkArguments(width_multiple=8)
    for method in ("ppo", "random", "uniform", "oneshot", "random_oneshot"):
        assert benchmark.prune_config(snapped, method, 0.25, 0).width_multiple == 8, method


def test_reward_and_importance_settings_reach_every_method(scripts):
    benchmark, _ = scripts
    args = benchmark.BenchmarkArguments(importance="taylor", bn_recalibration_batches=4, refit_ridge=0.1)
    for method in ("ppo", "random", "uniform", "oneshot", "random_oneshot", "ppo_latency"):
        config = benchmark.prune_config(args, method, 0.25, 0)
        assert (config.importance, config.bn_recalibration_batches, config.refit, config.refit_ridge) == ("taylor", 4, True, 0.1), method
    with pytest.raises(ValueError, match="importance = 'l3' is unknown"):  # before any data is loaded or model trained
        benchmark.main(["--task", "cifar10", "--dataset_dir", "/nonexistent", "--importance", "l3"])
    with pytest.raises(ValueError, match="bn_recalibration_batches = -1"):
        benchmark.main(["--task", "cifar10", "--dataset_dir", "/nonexistent", "--bn_recalibration_batches", "-1"])


def test_random_oneshot_under_a_latency_budget(scripts, tmp_path):
    # the head-room probe of ppo_latency: one random allocation per seed, under the same latency budget, cut once
    benchmark, _ = scripts
    args = benchmark.BenchmarkArguments(latency_table_path=str(tmp_path / "cnn.json"))
    config = benchmark.prune_config(args, "random_oneshot_latency", 0.25, 3)
    assert (config.method, config.search_episodes, config.num_rounds, config.budget_kind) == ("random", 1, 1, "latency")
    assert config.latency_table_path == str(tmp_path / "cnn.json") and config.prune_seed == 3 and config.width_multiple == 8

    def run(seed, accuracy):
        report = {"macs": {"dense": 100, "pruned": 20}, "params": {"pruned": 10}, "pruning_ratio": {"units_removed": 0.7},
                  "trade_off_score": {"pruned": 1.0}, "search": {"reward_evaluations": 1, "search_seconds": 0.1, "total_seconds": 9.0},
                  "policy": {"conv_blocks.0": 0.5, "conv_blocks.1": 0.25 + seed / 100}, "latency_ms": {}}
        return {"method": "random_oneshot_latency", "budget": 0.25, "seed": seed, "test_accuracy": accuracy, "final_reward": None, "report": report}

    results = {"name": "cifar10", "device": "cpu", "runs": [run(0, 0.70), run(1, 0.74), run(2, 0.72)],
               "dense": {"accuracy": 0.8, "macs": 100, "params": 40, "pretrain_seconds": 1.0}}
    table = benchmark.markdown(results, benchmark.summarize(results))
    assert "| 0.25 latency | random_oneshot_latency | 72.00 ± 2.00 |" in table
    assert "Best of 3 random one-shot allocations, each fully fine-tuned, at 0.25 latency: 74.00% (seed 1, keep ratios 0.50, 0.26)" in table


def test_pruning_while_pretraining_trains_a_fresh_model_for_the_whole_recipe(tmp_path, cifar_dir, scripts):
    benchmark, _ = scripts
    benchmark.main(["--task", "cifar10", "--dataset_dir", str(cifar_dir), "--batch_size", "32", "--pretrain_epochs", "1",
                    "--finetune_epochs", "1", "--prune_while_pretraining", "True", "--methods", "uniform", "--budgets", "0.5",
                    "--seeds", "0", "--num_rounds", "2", "--start_fraction", "0.25", "--end_fraction", "0.5",
                    "--recovery_steps", "0", "--latency_runs", "0", "--output_dir", str(tmp_path / "bench"),
                    "--cards_dir", str(tmp_path / "cards")])
    results = json.loads((tmp_path / "bench" / "cifar10-while-pretraining.json").read_text())
    run = results["runs"][0]
    steps_per_epoch = (600 - 60) // 32  # 10% of the training rows are the reward split; the last partial batch is dropped
    # the schedule spans pre-training + fine-tuning (2 epochs), not the fine-tuning epoch alone
    assert [r["step"] for r in run["report"]["rounds"]] == [round(0.25 * 2 * steps_per_epoch), round(0.5 * 2 * steps_per_epoch)]
    assert run["report"]["macs"]["pruned"] <= 0.5 * results["dense"]["macs"]
    # the dense reference is the pre-trained model, measured apart from the pruned run
    assert results["dense"]["pretrain_seconds"] > 0 and results["args"]["prune_while_pretraining"] is True
    # the best run's card is named after these results and shows its accuracy-versus-MACs plot, saved beside it
    card = (tmp_path / "cards" / "cifar10-while-pretraining-50pct-macs.md").read_text()
    assert "![accuracy versus MACs](cifar10-while-pretraining-50pct-macs.png)" in card and "{{" not in card
    assert (tmp_path / "cards" / "cifar10-while-pretraining-50pct-macs.png").stat().st_size > 0
    assert "| latency" not in card and "Latency:" not in card  # --latency_runs 0
    # the card's figures are in the report saved beside it, under the name the card gives
    report = json.loads((tmp_path / "cards" / "cifar10-while-pretraining-50pct-macs.json").read_text())
    assert "`cifar10-while-pretraining-50pct-macs.json` next to this card" in card and report["policy"] == run["report"]["policy"]
    assert "2 rounds on a cubic budget schedule," in card
    # --card_latency: the card of a run measured without latency gets it from its rebuilt architecture, measured here
    results_path = str(tmp_path / "bench" / "cifar10-while-pretraining.json")
    benchmark.main(["--report_only", results_path, "--card_latency", "True", "--output_dir", str(tmp_path / "again"),
                    "--cards_dir", str(tmp_path / "cards_latency")])
    card = (tmp_path / "cards_latency" / "cifar10-while-pretraining-50pct-macs.md").read_text()
    assert "| latency onnxruntime_cpu_batch128 (ms, median) |" in card and "name: Latency onnxruntime_cpu_batch1 (ms)" in card
    assert f"with {torch.get_num_threads()} threads, measured after the run, on its architecture with freshly initialized weights." in card
    rewritten = json.loads((tmp_path / "again" / "cifar10-while-pretraining.json").read_text())
    assert all(run["report"]["latency_ms"] == {} for run in rewritten["runs"])  # the raw results stay as the run wrote them
    # an architecture the arguments do not rebuild (another preset) is refused, not measured
    results["args"]["model_preset"] = "vgg6"
    (tmp_path / "other.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="its architecture is not known here"):
        benchmark.main(["--report_only", str(tmp_path / "other.json"), "--card_latency", "True", "--output_dir", str(tmp_path / "other"),
                        "--cards_dir", str(tmp_path / "other_cards")])


def test_pruning_while_pretraining_starts_from_the_seeds_initialization(scripts, monkeypatch):
    # run_one must not start from the dense weights: capture the model handed to the Trainer
    benchmark, _ = scripts
    dense = RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[4, 8], dense_units=[16], image_size=8))
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.fill_(0.5)
    seen = {}

    class StopTrainer:
        def __init__(self, model, args, optimizers, **kwargs):
            seen.update(model=model, epochs=args.num_train_epochs, optimizers=optimizers)
            raise RuntimeError("stop")

    monkeypatch.setattr(benchmark, "Trainer", StopTrainer)
    args = benchmark.BenchmarkArguments(prune_while_pretraining=True, pretrain_epochs=7, finetune_epochs=3)
    tensors = {split: {"pixel_values": torch.zeros(4, 3, 8, 8), "labels": torch.zeros(4, dtype=torch.long)} for split in ("train", "reward")}
    with pytest.raises(RuntimeError, match="stop"):
        benchmark.run_one(args, dense, {"dense_accuracy": 0.5}, tensors, "uniform", 0.5, 0, torch.device("cpu"), None, False)
    assert seen["epochs"] == 10
    assert not any(torch.all(p == 0.5) for p in seen["model"].parameters() if p.dim() > 1)  # freshly initialized weights
    optimizer, scheduler = seen["optimizers"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert scheduler.lr_lambdas[0](10_000) == pytest.approx(1 / (1 + 1e-4 * 10_000))  # the plan's decay
    # plan_then_finetune: the plan's decay for the 7 pre-training epochs (2 steps each), then finetune_lr's cosine over 3
    args = benchmark.BenchmarkArguments(prune_while_pretraining=True, pretrain_epochs=7, finetune_epochs=3, batch_size=2,
                                        finetune_lr=4e-4, while_pretraining_lr="plan_then_finetune")
    with pytest.raises(RuntimeError, match="stop"):
        benchmark.run_one(args, dense, {"dense_accuracy": 0.5}, tensors, "uniform", 0.5, 0, torch.device("cpu"), None, False)
    factor = seen["optimizers"][1].lr_lambdas[0]
    assert factor(13) == pytest.approx(1 / (1 + 1e-4 * 13)) and factor(14) == pytest.approx(0.4)
    assert factor(17) == pytest.approx(0.2) and factor(20) == pytest.approx(0.0, abs=1e-12)


def test_a_cards_command_runs_on_its_own(scripts):
    # machine paths replaced; a loaded dense model becomes one pre-trained (and saved) by the command itself
    benchmark, _ = scripts
    command = ("python scripts/benchmark.py --task cifar10 --dataset_dir /mnt/data/cifar10 --dense_model_path /mnt/dense "
               "--budgets 0.5 --output_dir /mnt/out --cards_dir /mnt/cards --seeds 2")
    assert benchmark.portable_command(command, "cifar10") == (
        "python scripts/benchmark.py --task cifar10 --dataset_dir ../shared/data/cifar10 --save_dense_to outputs/dense-cifar10 "
        "--budgets 0.5 --seeds 2")


def test_a_loaded_lstm_reads_its_tokens_through_its_own_tokenizer(tmp_path, scripts):
    # --dense_model_path with other data arguments (here fewer training rows) must not retrain the word ids.
    from hf_rlprune.data import make_synthetic_imdb

    benchmark, _ = scripts
    (tmp_path / "imdb" / "plain_text").mkdir(parents=True)
    for split, dataset in make_synthetic_imdb(300, 100, seed=0).items():
        dataset.to_parquet(str(tmp_path / "imdb" / "plain_text" / f"{split}-00000-of-00001.parquet"))
    common = dict(task="imdb", dataset_dir=str(tmp_path / "imdb"), batch_size=32, max_length=32)
    trained = benchmark.setup_task(benchmark.BenchmarkArguments(**common, pretrain_epochs=2, save_dense_to=str(tmp_path / "dense")))
    loaded = benchmark.setup_task(benchmark.BenchmarkArguments(**common, dense_model_path=str(tmp_path / "dense"), max_train_samples=120))
    assert torch.equal(loaded.tensors["test"]["input_ids"], trained.tensors["test"]["input_ids"])
    assert loaded.dense_accuracy == trained.dense_accuracy


def test_bench_pruning_times_the_dense_model_whatever_ratios_are_asked(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench_pruning = importlib.import_module("bench_pruning")
    from hf_rlprune.pruning import LatencyResult, compute_macs

    def fake_latency(model, batch_size, runtime, device="cpu", **kwargs):  # proportional to MACs: speedup = MACs reduction
        return LatencyResult(runtime, device, batch_size, compute_macs(model) / 1e6, 0.0, 1, 1)

    monkeypatch.setattr(bench_pruning, "measure_latency", fake_latency)
    monkeypatch.setattr(bench_pruning, "runtimes", lambda: [("torch", "cpu")])
    rows = bench_pruning.bench_model("cnn", bench_pruning.BenchArguments(keep_ratios=[0.5, 0.3], batch_sizes=[1], output=str(tmp_path / "x.json")))
    assert [row["keep_ratio"] for row in rows] == [0.5, 0.3]  # the dense model was timed, not reported
    for row in rows:
        assert row["speedup"]["torch_cpu_b1"] == pytest.approx(row["macs_reduction"])
