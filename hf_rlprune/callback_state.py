"""The pruning state a Trainer checkpoint carries beside the model: masks, round history, Taylor scores, the agent.

`rlprune_state.safetensors` holds the masks (uint8) and Taylor scores as tensors and the rest as string metadata;
`rlprune_agent.safetensors` is the PPO agent's own file (`PPOAgent.save`). Both are written atomically, so a
run cut off while saving leaves the previous file or none, never half of one.
"""

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .agent import PPOAgent
from .atomic import atomic_write

STATE_FILE = "rlprune_state.safetensors"
AGENT_FILE = "rlprune_agent.safetensors"
STATE_FORMAT = "hf_rlprune.callback_state.v1"


@dataclass
class PruningState:
    """What a resumed run needs to make the same decisions as an uninterrupted one."""

    dense_config: dict  # the unpruned model's config, as a dict
    rounds_done: int = 0
    history: list[dict] = field(default_factory=list)
    search_seconds: float = 0.0
    reward_evaluations: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # group name -> (width,) bool
    taylor_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    taylor_steps: int = 0
    weights_sha1: str | None = None  # the parameters the state was saved with (None in files written before it)


def write_state(directory: str, state: PruningState, agent: PPOAgent | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = {f"mask.{name}": mask.to(torch.uint8).cpu().contiguous() for name, mask in state.masks.items()}
    tensors.update({f"taylor.{name}": score.detach().cpu().contiguous() for name, score in state.taylor_scores.items()})
    metadata = {
        "format": STATE_FORMAT,
        "rounds_done": str(state.rounds_done),
        "history": json.dumps(state.history),
        "search_seconds": repr(state.search_seconds),
        "reward_evaluations": str(state.reward_evaluations),
        "taylor_steps": str(state.taylor_steps),
        "dense_config": json.dumps(state.dense_config),
        **({"weights_sha1": state.weights_sha1} if state.weights_sha1 else {}),
    }
    # safetensors cannot save an empty file: a checkpoint from before the first round holds one placeholder
    atomic_write(lambda path: save_file(tensors or {"empty": torch.zeros(0)}, path, metadata=metadata), os.path.join(directory, STATE_FILE))
    if agent is not None:
        atomic_write(agent.save, os.path.join(directory, AGENT_FILE))


def read_state(directory: str) -> PruningState:
    """The state in `directory`; a clear error when it is missing, corrupt or not ours."""
    path = os.path.join(directory, STATE_FILE)
    missing = (f"{directory} has no {STATE_FILE}: it was not written by RLPruneCallback, so its pruning state (masks, agent) "
               "cannot be restored. Resume from a checkpoint of a run that used the callback.")
    metadata, tensors = _read(path, missing, _metadata_and_tensors)
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an hf_rlprune callback state (format {metadata.get('format')!r}).")
    return PruningState(
        dense_config=json.loads(metadata["dense_config"]),
        rounds_done=int(metadata["rounds_done"]),
        history=json.loads(metadata["history"]),
        search_seconds=float(metadata["search_seconds"]),
        reward_evaluations=int(metadata["reward_evaluations"]),
        masks={key.removeprefix("mask."): value.bool() for key, value in tensors.items() if key.startswith("mask.")},
        taylor_scores={key.removeprefix("taylor."): value for key, value in tensors.items() if key.startswith("taylor.")},
        taylor_steps=int(metadata["taylor_steps"]),
        weights_sha1=metadata.get("weights_sha1"),
    )


def read_agent(directory: str) -> PPOAgent:
    """The PPO agent saved in `directory`: a resumed run needs it, since a fresh agent would decide otherwise."""
    missing = (f"{directory} has no {AGENT_FILE}, the PPO agent's state: the run that wrote it did not use method='ppo', or "
               "the file was lost. Resume with that run's method, or from another checkpoint.")
    return _read(os.path.join(directory, AGENT_FILE), missing, PPOAgent.load)


def _metadata_and_tensors(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}


def _read(path: str, missing: str, load):
    if not os.path.isfile(path):
        raise FileNotFoundError(missing)
    try:
        return load(path)
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{path} is corrupt or truncated ({error}); resume from an earlier checkpoint.") from error
