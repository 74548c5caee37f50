"""Pruning report (pruning_report.json), model card (README.md) and the atomic save of the pruned model folder."""

import json
import logging
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .atomic import atomic_directory
from .models import RLPruneCNNConfig
from .pruning import compute_flops, compute_macs, count_parameters, get_prunable_groups, group_widths, pruning_ratios, trade_off_score
from .pruning.refit import batch_norms

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
REPORT_FILE = "pruning_report.json"
PLOT_FILE = "accuracy_vs_macs.png"

logger = logging.getLogger(__name__)


def build_report(dense_config, pruned_model, config, history, reward_accuracy_after=None, search_seconds=0.0,
                 reward_evaluations=0, target: float | None = None) -> dict:
    """Everything known about a pruning run, as plain JSON-able values."""
    pruned_widths = group_widths(pruned_model.config)
    macs_before, macs_after = compute_macs(dense_config), compute_macs(pruned_model.config)
    params_before, params_after = count_parameters(dense_config), count_parameters(pruned_model.config)
    layers = [
        {"name": g.name, "kind": g.kind, "dense_width": g.width, "width": pruned_widths[g.name], "keep_ratio": pruned_widths[g.name] / g.width}
        for g in get_prunable_groups(dense_config)
    ]
    has_batch_norm = bool(batch_norms(pruned_model))
    report = {
        "model_type": dense_config.model_type,
        "method": config.method,
        "reward_mode": config.reward_mode,
        "importance": config.importance,
        "budget_kind": config.budget_kind,
        "target": config.target if target is None else target,  # a budget in milliseconds, resolved to a fraction
        "num_rounds": config.num_rounds,
        "seed": config.prune_seed,
        # how each candidate was scored: the reward's recipe, which the defaults no longer pin down across versions
        "reward_setup": {"refit": config.refit, "refit_ridge": config.refit_ridge if config.refit else None,
                         # what ran: a model without batch norm had nothing to recalibrate
                         "bn_recalibration_batches": config.bn_recalibration_batches if has_batch_norm else 0,
                         "recovery_steps": config.recovery_steps},
        "policy": {layer["name"]: layer["keep_ratio"] for layer in layers},
        "layers": layers,
        "macs": {"dense": macs_before, "pruned": macs_after},
        "flops": {"dense": compute_flops(dense_config), "pruned": compute_flops(pruned_model.config)},
        "params": {"dense": params_before, "pruned": params_after},
        "pruning_ratio": pruning_ratios(dense_config, pruned_widths),
        "accuracy": {"split": "reward", "dense": None, "pruned": reward_accuracy_after},
        "rounds": history,
        "search": {"reward_evaluations": reward_evaluations, "search_seconds": search_seconds},
        "latency_ms": {},
    }
    update_trade_off(report)
    return report


def update_trade_off(report: dict) -> None:
    accuracy = report["accuracy"]
    report["trade_off_score"] = {
        side: (trade_off_score(accuracy[side], report["flops"][side]) if accuracy.get(side) is not None else None)
        for side in ("dense", "pruned")
    }


def _fmt_int(value):
    return f"{value:,}" if value is not None else "n/a"


def _fmt_pct(value):
    return f"{100 * value:.2f}%" if value is not None else "n/a"


def _fmt_float(value, digits=4):
    return f"{value:.{digits}f}" if value is not None else "n/a"


def _latency_where(report: dict) -> str:
    """The sentence under the latency rows: which machine measured them (absent from reports written before it was
    recorded), and how."""
    if not report.get("latency_ms"):
        return ""
    hardware = report.get("latency_hardware") or {}
    machines = ([f"CPU {hardware['cpu']} with {hardware['cpu_threads']} threads"] if "cpu" in hardware else []) + (
        [f"GPU {hardware['gpu']}"] if "gpu" in hardware else [])
    where = f" on {' and '.join(machines)}" if machines else ""
    how = f", {report['latency_note']}" if report.get("latency_note") else ""
    return f"Latency: medians of timed forward passes{where}{how}.\n"


def render_model_card(report: dict, repo_id: str = "your-org/your-pruned-model", reproduce_command: str | None = None,
                      dataset_name: str | None = None, plot_file: str | None = None, report_file: str = REPORT_FILE) -> ModelCard:
    """The model card: YAML with model-index eval results, text with the tables, plot and reproduce command.
    `dataset_name` ("cifar10", "imdb" or a Hub id) is the data the accuracy was measured on; unset, the card names no
    dataset ("custom" in the eval results). `report_file` is the name the report is saved under beside the card."""
    is_cnn = report["model_type"] == RLPruneCNNConfig.model_type
    task_type = "image-classification" if is_cnn else "text-classification"
    # a card names only the data it was told about: the callback in a user's script may train on anything
    dataset_id = {"cifar10": "uoft-cs/cifar10", "imdb": "stanfordnlp/imdb"}.get(dataset_name, dataset_name)
    accuracy = report["accuracy"]
    split = accuracy["split"]
    results = []

    def add(metric_type, value, name):
        if value is not None:
            results.append(EvalResult(task_type=task_type, dataset_type=dataset_id or "custom", dataset_name=dataset_name or "custom",
                                      dataset_split=split, metric_type=metric_type, metric_value=float(value), metric_name=name))

    add("accuracy", accuracy.get("pruned"), "Accuracy (pruned)")
    # only this model's own figures: the Hub reads model-index as the model's results (the dense one is in the text)
    add("macs", report["macs"]["pruned"], "MACs per sample")
    add("flops", report["flops"]["pruned"], "FLOPs per sample")
    add("params", report["params"]["pruned"], "Parameters")
    add("pruning_ratio", report["pruning_ratio"]["macs_removed"], "Fraction of MACs removed")
    add("trade_off_score", report["trade_off_score"]["pruned"], "Accuracy per GFLOP")
    for key, value in report.get("latency_ms", {}).items():
        add("latency_ms", value.get("pruned"), f"Latency {key} (ms)")
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=task_type,
        tags=["hf_rlprune", "pruning", "structured-pruning", "reinforcement-learning"],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        eval_results=results or None,
    )
    latency_rows = "".join(
        f"| latency {key} (ms, median) | {_fmt_float(value.get('dense'), 3)} | {_fmt_float(value.get('pruned'), 3)} |\n"
        for key, value in report.get("latency_ms", {}).items()
    )
    layer_rows = "\n".join(
        f"| `{layer['name']}` | {layer['kind']} | {layer['dense_width']} | {layer['width']} | {layer['keep_ratio']:.3f} |"
        for layer in report["layers"]
    )
    plot_markdown = f"![accuracy versus MACs]({plot_file})" if plot_file else "(no plot saved with this card)"
    rounds, planned = report.get("rounds") or [], report["num_rounds"]
    finished_early = len(rounds) < planned  # training stopped before the last round: the budget met is the last round's
    if planned == 1:
        rounds_text = "no round (training ended before it)" if finished_early else "one round"
    elif finished_early:
        rounds_text = f"{len(rounds)} of {planned} planned rounds on a cubic budget schedule (training ended before the rest)"
    else:
        rounds_text = f"{planned} rounds on a cubic budget schedule"
    target = (rounds[-1]["target"] if rounds else 1.0) if finished_early else report["target"]  # no round: still dense
    cost_note = report.get("cost_note", "")
    latency_where = _latency_where(report)
    setup = report.get("reward_setup")  # absent from reports written before it was recorded
    if setup is None:
        reward_setup = ""
    else:
        refit = f"its pruned layers' consumers refitted by ridge least squares (ridge {setup['refit_ridge']}), then " if setup["refit"] else ""
        norms = setup.get("bn_recalibration_batches") or 0  # absent from reports written before it was recorded
        recalibrated = f"its batch-norm statistics recomputed on {norms} training batches, then " if norms else ""
        reward_setup = (f" Before its reward, each candidate had {refit}{recalibrated}{setup['recovery_steps']} recovery "
                        "steps of training.")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        architecture="CNN (RLPruneCNNForImageClassification)" if is_cnn else "LSTM (RLPruneLSTMForSequenceClassification)",
        unit_word="channels and neurons" if is_cnn else "embedding dimensions, hidden units and neurons",
        auto_class="AutoModelForImageClassification" if is_cnn else "AutoModelForSequenceClassification",
        target_percent=f"{100 * target:.0f}%",
        budget_kind="MACs" if report["budget_kind"] == "macs" else report["budget_kind"],
        accuracy_split=f"{split} split",
        accuracy_before=_fmt_pct(accuracy.get("dense")),
        accuracy_after=_fmt_pct(accuracy.get("pruned")),
        macs_before=_fmt_int(report["macs"]["dense"]),
        macs_after=_fmt_int(report["macs"]["pruned"]),
        flops_before=_fmt_int(report["flops"]["dense"]),
        flops_after=_fmt_int(report["flops"]["pruned"]),
        params_before=_fmt_int(report["params"]["dense"]),
        params_after=_fmt_int(report["params"]["pruned"]),
        latency_rows=latency_rows,
        units_removed=_fmt_pct(report["pruning_ratio"]["units_removed"]),
        macs_removed=_fmt_pct(report["pruning_ratio"]["macs_removed"]),
        params_removed=_fmt_pct(report["pruning_ratio"]["params_removed"]),
        trade_off_before=_fmt_float(report["trade_off_score"]["dense"]),
        trade_off_after=_fmt_float(report["trade_off_score"]["pruned"]),
        cost_note=cost_note,
        latency_where=latency_where,
        layer_rows=layer_rows,
        plot_markdown=plot_markdown,
        method=report["method"],
        chooser={"ppo": "a PPO agent", "random": "random search", "uniform": "a uniform keep ratio"}.get(report["method"], report["method"]),
        reward_mode=report["reward_mode"],
        importance=report["importance"],
        rounds_text=rounds_text,
        report_file=report_file,
        reward_evaluations=report["search"]["reward_evaluations"],
        search_seconds=f"{report['search']['search_seconds']:.1f}",
        reward_setup=reward_setup,
        reproduce_command=reproduce_command or report.get("command"),  # none known (a user's own script): no section
    )


def plot_accuracy_vs_macs(report: dict, path: str) -> bool:
    """Accuracy (per round, on the reward split, and final) against the fraction of dense MACs; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(5, 3.5))
    rounds = report.get("rounds", [])
    if rounds:
        axis.plot([r["macs_ratio"] for r in rounds], [r["reward_accuracy"] for r in rounds], "o-", label="search rounds (reward split, at search time)")
    accuracy = report["accuracy"]
    dense_macs = report["macs"]["dense"]
    if accuracy.get("dense") is not None:
        axis.plot([1.0], [accuracy["dense"]], "s", label=f"dense ({accuracy['split']})")
    if accuracy.get("pruned") is not None:
        axis.plot([report["macs"]["pruned"] / dense_macs], [accuracy["pruned"]], "*", markersize=12, label=f"pruned ({accuracy['split']})")
    axis.set_xlabel("MACs / dense MACs")
    axis.set_ylabel("accuracy")
    axis.set_title("Accuracy versus MACs")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def check_save_dir(save_dir, output_dir=None, marker: str = REPORT_FILE, name: str = "save_dir") -> Path:
    """`save_dir` as an absolute path, if saving a model may replace it: it does not exist, is empty, or holds a model
    saved there before (its `marker` file: pruning_report.json for a pruned model, config.json for a dense one). Any
    other folder is refused, since the save replaces the whole folder, and so is one holding the run's `output_dir`
    (the Trainer's checkpoints, a benchmark's results) or the working directory. `name` is the setting, for errors."""
    save_dir = Path(save_dir).expanduser().resolve()
    if output_dir is not None:
        output = Path(output_dir).expanduser().resolve()
        if save_dir == output or save_dir in output.parents:
            raise ValueError(
                f"{name} {str(save_dir)!r} holds the output_dir ({output}), where the run writes its checkpoints or results, "
                "and saving the model replaces the whole folder. Name a folder of its own, e.g. <output_dir>/pruned."
            )
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"{name} {str(save_dir)!r} is a file; name a folder for the model.")
    cwd = Path.cwd().resolve()
    if save_dir == cwd or save_dir in cwd.parents:
        raise ValueError(f"{name} {str(save_dir)!r} holds the current working directory, and saving replaces the whole "
                         "folder; name a folder of its own, e.g. ./pruned.")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not (save_dir / marker).is_file():
        entries = sorted(entry.name for entry in save_dir.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"{name} {str(save_dir)!r} already holds other files ({shown}) and no {marker}, so it is not a model saved "
            "there before; saving replaces the whole folder. Name a new or empty folder (e.g. <output_dir>/pruned)."
        )
    return save_dir


def save_pruned_model(model, save_dir, report: dict, processing_class=None, repo_id: str | None = None,
                      reproduce_command: str | None = None, dataset_name: str | None = None) -> Path:
    """Write the pruned model folder atomically: model (safetensors + config with widths + model code), its
    tokenizer or image processor, pruning_report.json, the accuracy-vs-MACs plot and the card as README.md.

    Everything is written to a sibling temporary folder that then replaces `save_dir` by rename, so an interrupted
    save leaves the previous folder (or none), never a half-written model. Only a new or empty folder, or one holding a
    pruned model saved before, is replaced (`check_save_dir`).
    """
    save_dir = check_save_dir(save_dir)
    with atomic_directory(save_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        has_plot = plot_accuracy_vs_macs(report, str(staging / PLOT_FILE))
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        card = render_model_card(report, repo_id=repo_id or f"your-org/{save_dir.name}", reproduce_command=reproduce_command,
                                 dataset_name=dataset_name, plot_file=PLOT_FILE if has_plot else None)
        card.save(staging / "README.md")
    return save_dir


def push_pruned_folder(save_dir, repo_id: str, token: str | None = None, private: bool | None = None,
                       revision: str | None = None) -> None:
    """Upload a saved pruned-model folder (model, card, report) to the Hub repo `repo_id`, created if missing (private
    if asked), on branch `revision` (created from main if missing) or main. The branch then holds the folder's files
    and no others (its .gitattributes stays): an earlier run's files, say an ONNX export of other widths, would
    otherwise sit beside the new weights."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(folder_path=str(save_dir), repo_id=repo_id, revision=revision, delete_patterns="*",
                      commit_message="Upload pruned model (hf_rlprune)")
    logger.info("Pushed %s to %s%s", save_dir, repo_id, f" (revision {revision})" if revision else "")
