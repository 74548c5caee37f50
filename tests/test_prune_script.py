import importlib.util
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageClassification

from hf_rlprune import RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification

from .hub_fixtures import hub_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def load_prune_script():
    spec = importlib.util.spec_from_file_location("prune_script", ROOT / "scripts" / "prune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOAD_AND_PREDICT = textwrap.dedent(
    """
    import json, sys
    if sys.argv[1] == "blocked":
        sys.modules["hf_rlprune"] = None  # the package is not importable in this process
    else:
        import hf_rlprune  # registers the Auto classes: no remote code needed
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    kwargs = {"trust_remote_code": True} if sys.argv[1] == "blocked" else {}
    model = AutoModelForSequenceClassification.from_pretrained("org/imdb-pruned", **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained("org/imdb-pruned", **kwargs)
    batch = tokenizer(["a great and wonderful film", "boring, awful<br /><br />plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "widths": model.config.lstm_hidden_sizes}))
    """
)


def test_smoke_run_pushes_to_the_hub_and_loads_back(tmp_path, hub_server):  # noqa: F811
    prune = load_prune_script()
    output_dir = tmp_path / "out"
    report = prune.main(["--smoke", "--task", "imdb", "--output_dir", str(output_dir), "--measure_latency", "false",
                         "--push_to_hub", "--hub_model_id", "org/imdb-pruned", "--hub_token", hub_server.token])
    folder = output_dir / "pruned"
    names = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "pruning_report.json", "README.md", "modeling_rlprune_lstm.py"} <= names
    assert report["accuracy"]["split"] == "test" and report["accuracy"]["pruned"] is not None
    assert report["macs"]["pruned"] <= 0.5 * report["macs"]["dense"]
    card = (folder / "README.md").read_text()
    assert "{{" not in card and "org/imdb-pruned" in card and "model-index" in card
    assert "## Reproduce\n\n```bash\npython scripts/prune.py --smoke --task imdb" in card
    assert "stanfordnlp/imdb" not in card and "datasets:" not in card  # the smoke run's data is synthetic, not IMDB
    for path in output_dir.rglob("*"):  # the token is never written anywhere
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".py"):
            assert hub_server.token not in path.read_text(errors="ignore"), path
    assert hub_server.token not in json.dumps(report)
    assert "README.md" in hub_server.hub.files("org/imdb-pruned", "main")

    local = RLPruneLSTMForSequenceClassification.from_pretrained(folder).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["a great and wonderful film", "boring, awful<br /><br />plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = local(**batch).logits
    for mode in ("installed", "blocked"):
        result = hub_server.run_python(LOAD_AND_PREDICT, mode, hf_home=tmp_path / f"home-{mode}")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert lines, result.stdout[-2000:] + result.stderr[-2000:]
        loaded = json.loads(lines[-1])
        assert loaded["widths"] == local.config.lstm_hidden_sizes
        assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-6)
        assert loaded["module"].startswith("hf_rlprune") == (mode == "installed")


def test_push_honours_private_repo_and_revision(tmp_path, hub_server):  # noqa: F811
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    prune = load_prune_script()
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "config.json").write_text("{}")
    prune.push_pruned_folder(str(tmp_path / "pruned"), "org/private-pruned", hub_server.token, private=True, revision="v1")
    assert "config.json" in hub_server.hub.files("org/private-pruned", "v1")
    assert "config.json" not in hub_server.hub.files("org/private-pruned", "main")
    assert HfApi(token=hub_server.token).model_info("org/private-pruned").private
    with pytest.raises(RepositoryNotFoundError):  # not visible without a token
        HfApi(token=False).model_info("org/private-pruned")
    # the repo mirrors the folder, as a save replaces the folder: a re-run's push leaves no file of the earlier run
    # (here an ONNX export of other widths) beside the new weights; .gitattributes stays
    (tmp_path / "pruned" / "model.onnx").write_bytes(b"earlier run")
    prune.push_pruned_folder(str(tmp_path / "pruned"), "org/private-pruned", hub_server.token, revision="v1")
    (tmp_path / "pruned" / "model.onnx").unlink()
    (tmp_path / "pruned" / "config.json").write_text('{"conv_channels": [9, 17]}')
    prune.push_pruned_folder(str(tmp_path / "pruned"), "org/private-pruned", hub_server.token, revision="v1")
    files = hub_server.hub.files("org/private-pruned", "v1")
    assert "model.onnx" not in files and files["config.json"] == b'{"conv_channels": [9, 17]}'
    assert ".gitattributes" in files


def test_callback_pushes_the_pruned_model_to_its_own_repo(tmp_path, hub_server):  # noqa: F811
    from hf_rlprune import RLPruneConfig

    from .test_callback import prune_config, train

    train(tmp_path, prune_config(pruned_hub_model_id="org/cb-pruned"), hub_token=hub_server.token)
    files = hub_server.hub.files("org/cb-pruned")
    assert {"model.safetensors", "config.json", "pruning_report.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert 'from_pretrained("org/cb-pruned", trust_remote_code=True)' in card  # the card names the repo it is in
    with pytest.raises(ValueError, match="pruned_hub_model_id pushes the model saved at train end"):
        RLPruneConfig(pruned_hub_model_id="org/x", save_on_train_end=False)


def test_a_checkpoint_pushed_during_training_holds_the_pruning_state(tmp_path, hub_server):  # noqa: F811
    """hub_strategy "checkpoint": the Trainer starts uploading a checkpoint before on_save, so the state is written first."""
    from transformers import TrainerCallback

    from hf_rlprune.callback_state import AGENT_FILE, STATE_FILE

    from .test_callback import train

    state_there = []

    class StateProbe(TrainerCallback):  # after RLPruneCallback in the handler, as the upload starts
        def on_push_begin(self, args, state, control, **kwargs):
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            state_there.append(all(os.path.isfile(os.path.join(checkpoint, name)) for name in (STATE_FILE, AGENT_FILE)))

    trainer, _ = train(tmp_path, trailing_callbacks=[StateProbe()], push_to_hub=True, hub_model_id="org/with-checkpoints",
                       hub_token=hub_server.token, hub_strategy="checkpoint", save_strategy="steps", save_steps=10)
    assert state_there and all(state_there)
    files = hub_server.hub.files("org/with-checkpoints")
    assert {f"last-checkpoint/{STATE_FILE}", f"last-checkpoint/{AGENT_FILE}"} <= set(files)
    # the final push, after compaction, leaves the last checkpoint's masks alone (the compacted model has none)
    trainer.push_to_hub()
    with safe_open(tmp_path / "checkpoint-20" / STATE_FILE, framework="pt") as handle:
        assert any(key.startswith("mask.") for key in handle.keys())


def test_prune_script_pushes_to_either_hub_setting():
    prune = load_prune_script()
    for argv, expected in ((["--push_to_hub", "--hub_model_id", "org/a"], (True, "org/a")),
                           (["--pruned_hub_model_id", "org/b"], (True, "org/b")),
                           ([], (False, None))):
        _, config, training = prune.parse_args(["--smoke", "--output_dir", "x", *argv])
        assert prune.hub_target(config, training) == expected, argv


def test_smoke_cifar_run_with_onnx_export(tmp_path):
    prune = load_prune_script()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds other files"):  # refused before any training
        prune.main(["--smoke", "--task", "cifar10", "--output_dir", str(tmp_path), "--save_dir", str(other)])
    assert not (tmp_path / "dense").exists() and (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="holds the output_dir"):  # it would replace the dense model and checkpoints
        prune.main(["--smoke", "--task", "cifar10", "--output_dir", str(tmp_path / "out"), "--save_dir", str(tmp_path)])
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "my-pruned"
    report = prune.main(["--smoke", "--task", "cifar10", "--output_dir", str(tmp_path), "--export_onnx", "--measure_latency", "false",
                         "--target", "0.4", "--distill_alpha", "0.5", "--save_dir", str(folder)])  # distillation: same outputs
    assert not (tmp_path / "pruned").exists()  # --save_dir, not the default <output_dir>/pruned
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert report["macs"]["pruned"] <= 0.4 * report["macs"]["dense"]
    assert report["layers"][0]["width"] == model.config.conv_channels[0] < report["layers"][0]["dense_width"]
    assert (folder / "preprocessor_config.json").exists()
    pixels = torch.randn(2, 3, 32, 32)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        assert np.allclose(onnx_logits, model(pixels).logits.numpy(), atol=1e-4)


def test_smoke_run_pruning_while_training_from_scratch(tmp_path):
    prune = load_prune_script()
    report = prune.main(["--smoke", "--task", "cifar10", "--output_dir", str(tmp_path), "--prune_while_pretraining", "--target", "0.3"])
    assert not (tmp_path / "dense").exists()  # nothing was pre-trained
    assert report["accuracy"]["dense"] is None and report["accuracy"]["pruned"] > 0.0
    assert report["macs"]["pruned"] <= 0.3 * report["macs"]["dense"]
    assert [r["step"] for r in report["rounds"]] == sorted({r["step"] for r in report["rounds"]})  # rounds spread over training
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "pruned")
    assert model.config.conv_channels == [layer["width"] for layer in report["layers"][:2]]
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "{{" not in card and "Accuracy (dense" not in card
    # latency, measured by default: in the results table and model-index, with the machine that measured it
    assert set(report["latency_ms"]) == {f"{runtime}_cpu_batch{batch}" for runtime in ("onnxruntime", "torch") for batch in (1, 128)}
    assert "| latency onnxruntime_cpu_batch128 (ms, median) |" in card and "name: Latency onnxruntime_cpu_batch128 (ms)" in card
    assert report["latency_hardware"]["cpu_threads"] == torch.get_num_threads() and "gpu" not in report["latency_hardware"]
    assert f"Latency: medians of timed forward passes on CPU {report['latency_hardware']['cpu']} with {torch.get_num_threads()} threads." in card


@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["--task", "mnist"], ValueError, "Unknown task 'mnist'"),
        (["--smoke", "--push_to_hub"], ValueError, "--hub_model_id"),
        (["--smoke", "--target", "0.001", "--min_keep", "0.5"], ValueError, "cannot be met"),
        (["--smoke", "--target", "1.5"], ValueError, "target"),
        (["--smoke", "--distill_alpha", "1.5"], ValueError, "--distill_alpha 1.5 must be in"),
        (["--smoke", "--pretrain_patience", "0"], ValueError, "--pretrain_patience 0 must be >= 1"),
        (["--smoke", "--reward_size", "1.5"], ValueError, "--reward_size 1.5: give a fraction"),
        (["--smoke", "--prune_while_pretraining", "--model_name_or_path", "x"], ValueError, "drop --model_name_or_path"),
        (["--smoke", "--save_on_train_end", "false"], ValueError, "--save_on_train_end false: this script's output"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, argv, error, message):
    prune = load_prune_script()
    with pytest.raises(error, match=message):
        prune.main([*argv, "--output_dir", str(tmp_path)])
    assert not (tmp_path / "dense").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_loading_data(tmp_path, monkeypatch):
    prune = load_prune_script()
    monkeypatch.setattr(prune, "prepare_task", lambda *args, **kwargs: pytest.fail("data loaded"))
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ValueError, match="--output_dir .*afile is a file"):
        prune.main(["--smoke", "--output_dir", str(tmp_path / "afile")])
    assert (tmp_path / "afile").read_text() == "mine"


def test_the_datas_own_column_names_from_the_command_line(tmp_path, monkeypatch):
    from hf_rlprune.data import make_synthetic_imdb

    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, dataset in make_synthetic_imdb(200, 50, seed=0).items():
        dataset.rename_columns({"text": "review", "label": "sentiment"}).to_parquet(folder / f"{split}.parquet")
    prune = load_prune_script()
    seen = {}

    def stop_before_training(model, task_data, *args, **kwargs):
        seen["task_data"] = task_data
        raise KeyboardInterrupt  # the data is what this test is about

    monkeypatch.setattr(prune, "pretrain", stop_before_training)
    common = ["--task", "imdb", "--dataset_dir", str(folder), "--vocab_size", "200", "--max_length", "16",
              "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="lacks column.*--input_column / --label_column"):
        prune.main(common)
    with pytest.raises(KeyboardInterrupt):
        prune.main([*common, "--input_column", "review", "--label_column", "sentiment"])
    assert len(seen["task_data"].train) + len(seen["task_data"].reward) == 200 and "input_ids" in seen["task_data"].train.column_names


@pytest.fixture(scope="module")
def latency_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latency")  # one table for the tests below: measured once, then loaded


@pytest.mark.parametrize(
    "budget, message",
    [
        (["--target", "0.01"], r"0\.010 x dense latency cannot be met.*Raise the target"),
        (["--target_latency_ms", "1e6"], r"not below the dense model's estimated latency.*Lower target_latency_ms"),
        (["--target_latency_ms", "1e-4"], r"target_latency_ms = 0\.0001 is 0\.000 x the dense model's estimated .* cannot be met"),
    ],
)
def test_impossible_latency_budget_fails_before_pretraining(tmp_path, monkeypatch, latency_cache, budget, message):
    prune = load_prune_script()
    monkeypatch.setattr(prune, "pretrain", lambda *args, **kwargs: pytest.fail("pre-training started"))
    with pytest.raises(ValueError, match=message):
        prune.main(["--smoke", "--task", "cifar10", "--budget_kind", "latency", *budget, "--latency_runtime", "torch",
                    "--latency_threads", "1", "--latency_batch_size", "8", "--latency_cache_dir", str(latency_cache),
                    "--output_dir", str(tmp_path)])
    assert not (tmp_path / "dense").exists()
    assert len(list(latency_cache.glob("*.json"))) == 1  # cached: the callback loads this table instead of measuring


def test_smoke_settings_rebuild_the_training_arguments():
    # The device is fixed when TrainingArguments are constructed: editing use_cpu afterwards would leave a GPU host's
    # Trainer on the GPU. Rebuilt arguments went through __post_init__ (which turns strategies into enums).
    from transformers.trainer_utils import SaveStrategy

    prune = load_prune_script()
    script, config, training = prune.parse_args(["--smoke", "--task", "cifar10", "--output_dir", "x", "--seed", "3"])
    smoke = prune.apply_smoke_settings(script, config, training)
    assert smoke.use_cpu and smoke.device.type == "cpu" and smoke.save_strategy is SaveStrategy.NO
    assert smoke.seed == 3 and smoke.output_dir == "x" and smoke.num_train_epochs == 2 and script.max_length == 64


def test_a_json_file_of_arguments_parses_as_its_command_line(tmp_path):
    prune = load_prune_script()
    arguments = {"smoke": True, "task": "imdb", "target": 0.3, "report_to": ["none"], "hub_token": "hf_SECRET",
                 "lr_scheduler_kwargs": {"num_cycles": 2}, "save_dir": None, "weight_decay": -1e-05, "run_name": "--odd name"}
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    argv = prune.as_command_line(arguments)
    assert argv == ["--smoke=true", "--task=imdb", "--target=0.3", "--report_to", "none", "--hub_token=hf_SECRET",
                    '--lr_scheduler_kwargs={"num_cycles": 2}', "--weight_decay=-1e-05", "--run_name=--odd name"]
    from_file, from_line = prune.parse_args([str(tmp_path / "args.json")]), prune.parse_args(argv)
    assert from_file == from_line and from_file[2].output_dir == "outputs/smoke"  # the command line's default folder too
    assert from_file[2].lr_scheduler_kwargs == {"num_cycles": 2} and from_file[2].weight_decay == -1e-05
    # the card spells the arguments out (the file is not published with it), without the token
    command = prune.reproduce_command(argv)
    assert "hf_SECRET" not in command and "--task=imdb --target=0.3 --report_to none" in command
    # "smoke": false is no smoke run, in a file as on the command line
    (tmp_path / "no_smoke.json").write_text(json.dumps({"smoke": False, "task": "cifar10"}))
    assert prune.parse_args([str(tmp_path / "no_smoke.json")])[2].output_dir == "outputs/prune"
    assert prune.parse_args(["--smoke", "false"])[2].output_dir == "outputs/prune"
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="one JSON object of argument names and values"):
        prune.parse_args([str(tmp_path / "list.json")])


def test_reproduce_command_never_holds_the_token():
    prune = load_prune_script()
    for argv in (["--hub_token", "hf_SECRET", "--task", "imdb"], ["--hub_token=hf_SECRET"], ["--hub_tok", "hf_SECRET"], ["--hub-token", "hf_SECRET"]):
        command = prune.reproduce_command(argv)
        assert "hf_SECRET" not in command and command.startswith("python scripts/prune.py")
    assert "--task imdb" in prune.reproduce_command(["--hub_token", "hf_SECRET", "--task", "imdb"])
    with pytest.raises(ValueError, match="not used"):  # abbreviated options are refused: no spelling of the token slips through
        prune.parse_args(["--hub_tok", "hf_SECRET", "--output_dir", "x"])


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20)).save_pretrained(tmp_path / "lstm")
    prune = load_prune_script()
    with pytest.raises(ValueError, match="holds a 'rlprune-lstm' model"):
        prune.main(["--task", "cifar10", "--model_name_or_path", str(tmp_path / "lstm"), "--output_dir", str(tmp_path / "out")])


def test_lstm_checkpoint_without_its_tokenizer_is_rejected(tmp_path):
    # Its embedding rows are indexed by the tokenizer it was trained with: never train a new one silently.
    RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20)).save_pretrained(tmp_path / "lstm")
    prune = load_prune_script()
    with pytest.raises(ValueError, match="(?s)Cannot load the tokenizer of .*save that tokenizer beside the model"):
        prune.main(["--task", "imdb", "--model_name_or_path", str(tmp_path / "lstm"), "--output_dir", str(tmp_path / "out")])
