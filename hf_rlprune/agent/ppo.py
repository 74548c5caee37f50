"""PPO for layer-wise keep-ratio search, after CleanRL's ``ppo_continuous_action.py``, as importable pieces.

The agent only maps observation vectors to keep ratios; it never sees a model. One episode walks the prunable
layer groups once, one action per group, and the environment's reward arrives on the last step only.

Policy choice: a Gaussian on the *normalized* action u in [0, 1] (mean from a tanh MLP, state-independent learned
log-std), clipped to [0, 1] outside the policy, as CleanRL clips for the environment. The stored log-prob is that of
the unclipped sample, so it is exact and clipping is simply part of the environment's dynamics. Unlike a Beta or a
sigmoid-squashed Gaussian, the deterministic action (the clipped mean) can sit exactly on keep = 1.0, common for
sensitive layers; unlike tanh squashing, no Jacobian correction is needed and the entropy is closed-form.

Reproducibility: seeded generators only (torch for init and shuffling, numpy for exploration noise). Bit-identical
reruns also need the same torch thread count, since CPU matmul reductions depend on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributions import Normal

CHECKPOINT_FORMAT = "hf_rlprune.agent.PPOAgent/1"


@dataclass
class PPOConfig:
    learning_rate: float = field(
        default=3e-4,
        metadata={"help": "Adam learning rate (the plan's 3e-4; RLPruneConfig uses 1e-3, which learns faster within the "
                          "few hundred episodes a pruning search affords)."},
    )
    gamma: float = field(default=0.99, metadata={"help": "Discount factor over the steps of an episode."})
    gae_lambda: float = field(default=0.95, metadata={"help": "Lambda of generalized advantage estimation."})
    clip_coef: float = field(default=0.2, metadata={"help": "PPO surrogate clipping coefficient."})
    update_epochs: int = field(default=10, metadata={"help": "Passes over the rollout per PPO update."})
    minibatch_size: int = field(default=64, metadata={"help": "Largest number of steps per gradient step."})
    ent_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    vf_coef: float = field(default=0.5, metadata={"help": "Value loss coefficient."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Global gradient norm clip."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the two hidden layers of actor and critic."})
    init_std: float = field(
        default=0.2, metadata={"help": "Initial policy std on the normalized action in [0, 1] (a fifth of the range)."}
    )
    episodes_per_update: int = field(
        default=8, metadata={"help": "Complete episodes (reward evaluations) collected per PPO update."}
    )

    def __post_init__(self):
        positive = ("learning_rate", "clip_coef", "max_grad_norm", "init_std")
        positive_int = ("update_epochs", "minibatch_size", "hidden_size", "episodes_per_update")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in positive_int:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("ent_coef", "vf_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalized advantage estimation with CleanRL's conventions; returns ``(advantages, returns)``, each [T].

    ``rewards``, ``values``, ``dones`` are [T]. ``dones[t]`` is 1 when ``obs[t]`` starts a new episode, i.e. step t-1
    ended one; ``next_done``/``next_value`` describe the observation after the last step.
    """
    num_steps = rewards.shape[0]
    dones = dones.to(values.dtype)
    next_value = torch.as_tensor(next_value, dtype=values.dtype)
    next_done = torch.as_tensor(next_done, dtype=values.dtype)
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros((), dtype=values.dtype)
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            next_nonterminal, next_values = 1.0 - next_done, next_value
        else:
            next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        advantages[t] = last_gae = delta + gamma * gae_lambda * next_nonterminal * last_gae
    return advantages, advantages + values


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0, generator=None) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std, generator=generator)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class ActorCritic(nn.Module):
    """Tanh MLP actor (mean of the normalized action) and critic, with CleanRL's orthogonal init."""

    def __init__(self, obs_dim: int, hidden_size: int = 64, init_std: float = 0.2, generator=None):
        super().__init__()

        def mlp(out_std: float, out_bias: float) -> nn.Sequential:
            return nn.Sequential(
                layer_init(nn.Linear(obs_dim, hidden_size), generator=generator),
                nn.Tanh(),
                layer_init(nn.Linear(hidden_size, hidden_size), generator=generator),
                nn.Tanh(),
                layer_init(nn.Linear(hidden_size, 1), std=out_std, bias_const=out_bias, generator=generator),
            )

        self.critic = mlp(out_std=1.0, out_bias=0.0)
        # Tiny output weights and bias 0.5: every layer starts at the middle of the keep range.
        self.actor_mean = mlp(out_std=0.01, out_bias=0.5)
        self.actor_logstd = nn.Parameter(torch.full((1, 1), math.log(init_std)))

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # [B, obs_dim] -> [B]

    def distribution(self, obs: torch.Tensor) -> Normal:
        mean = self.actor_mean(obs)  # [B, 1]
        return Normal(mean, self.actor_logstd.expand_as(mean).exp())

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor):
        """Log-prob [B], entropy [B] and value [B] of normalized, unclipped ``actions`` [B, 1] under this policy."""
        dist = self.distribution(obs)
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), self.get_value(obs)


class RolloutBatch(NamedTuple):
    obs: torch.Tensor  # [N, obs_dim]
    actions: torch.Tensor  # [N, 1], normalized and unclipped
    logprobs: torch.Tensor  # [N], under the policy that acted
    advantages: torch.Tensor  # [N]
    returns: torch.Tensor  # [N]


def clipped_policy_loss(new_logprob, old_logprob, advantages, clip_coef):
    """PPO's clipped surrogate, as a loss to minimize: mean of max(-A * r, -A * clip(r, 1 - c, 1 + c))."""
    ratio = (new_logprob - old_logprob).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    return torch.max(unclipped, clipped).mean()


def ppo_update(model: ActorCritic, optimizer, batch: RolloutBatch, config: PPOConfig, generator) -> dict:
    """``config.update_epochs`` shuffled passes over ``batch``; returns the mean of each statistic over minibatches."""
    batch_size = batch.obs.shape[0]
    # Equal-sized minibatches of at most minibatch_size, so no tiny leftover minibatch gets its own normalization.
    num_minibatches = math.ceil(batch_size / config.minibatch_size)
    totals = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"), 0.0)
    num_steps = 0
    for _ in range(config.update_epochs):
        permutation = torch.randperm(batch_size, generator=generator)
        for indices in torch.tensor_split(permutation, num_minibatches):
            new_logprob, entropy, new_value = model.evaluate(batch.obs[indices], batch.actions[indices])
            old_logprob = batch.logprobs[indices]
            advantages = batch.advantages[indices]
            if advantages.numel() > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = clipped_policy_loss(new_logprob, old_logprob, advantages, config.clip_coef)
            value_loss = 0.5 * (new_value - batch.returns[indices]).pow(2).mean()
            entropy_mean = entropy.mean()
            loss = policy_loss - config.ent_coef * entropy_mean + config.vf_coef * value_loss

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()

            with torch.no_grad():
                logratio = new_logprob - old_logprob
                ratio = logratio.exp()
                totals["approx_kl"] += ((ratio - 1.0) - logratio).mean().item()
                totals["clipfrac"] += ((ratio - 1.0).abs() > config.clip_coef).float().mean().item()
            totals["policy_loss"] += policy_loss.item()
            totals["value_loss"] += value_loss.item()
            totals["entropy"] += entropy_mean.item()
            num_steps += 1
    return {name: total / num_steps for name, total in totals.items()}


class PPOAgent:
    """Observation vector in, keep ratio in [action_low, action_high] out; learns from episode-end rewards.

    Rollout API: ``act(obs)`` then ``observe(reward, done)`` once per environment step, or ``act_batch`` and
    ``observe_batch`` for several episodes in lockstep (a vector environment); each episode enters the buffer when
    it ends, so the buffer is a sequence of whole episodes. When ``should_update`` is true (``episodes_per_update``
    complete episodes stored), call ``update()``. The same object can run several searches in a row (warm start);
    episodes left in the buffer carry over to the next search.
    """

    name = "ppo"
    _ROLLOUT_FIELDS = ("obs", "actions", "logprobs", "values", "rewards", "terminals")

    def __init__(self, obs_dim: int, action_low: float, action_high: float, config: PPOConfig | None = None, seed=0):
        if obs_dim < 1:
            raise ValueError(f"obs_dim must be >= 1, got {obs_dim}")
        if not action_low < action_high:
            raise ValueError(f"action_low ({action_low}) must be < action_high ({action_high})")
        self.obs_dim, self.action_low, self.action_high = int(obs_dim), float(action_low), float(action_high)
        self.config = config if config is not None else PPOConfig()
        self.seed = int(seed)
        # Torch generator: weight init, then minibatch shuffling. Numpy generator: exploration noise.
        self.generator = torch.Generator().manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.model = ActorCritic(self.obs_dim, self.config.hidden_size, self.config.init_std, self.generator)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate, eps=1e-5)
        self.rollout = {name: [] for name in self._ROLLOUT_FIELDS}
        self._pending = None  # per episode in the batch: (obs, action, logprob, value) of the step awaiting observe
        self._running: list[list[tuple]] = []  # per episode in the batch: its finished steps, until it ends
        self.num_updates = 0

    @property
    def episodes_in_buffer(self) -> int:
        return int(sum(self.rollout["terminals"]))

    @property
    def should_update(self) -> bool:
        return self.episodes_in_buffer >= self.config.episodes_per_update

    def _obs_tensor(self, observations) -> torch.Tensor:
        # Copy: the environment may reuse its observation array, and the rollout keeps this tensor.
        obs = torch.tensor(np.asarray(observations, dtype=np.float32))
        obs = obs.reshape(-1, obs.shape[-1]) if obs.dim() else obs.reshape(1, 1)  # (K, obs_dim)
        if obs.shape[1] != self.obs_dim:
            raise ValueError(f"observation has {obs.shape[1]} entries, agent expects obs_dim={self.obs_dim}")
        return obs

    def act(self, obs, deterministic: bool = False) -> float:
        """Keep ratio for this step. Deterministic acts (the clipped mean) are not recorded and draw no randomness."""
        return float(self.act_batch(np.asarray(obs, dtype=np.float32).reshape(1, -1), deterministic)[0])

    def act_batch(self, observations, deterministic: bool = False) -> np.ndarray:
        """Keep ratios (K,) for K episodes' observations (K, obs_dim), each episode at the same step."""
        obs = self._obs_tensor(observations)  # (K, obs_dim)
        with torch.no_grad():
            dist = self.model.distribution(obs)
            if deterministic:
                return self._to_keep_ratios(dist.mean)
            if self._pending is not None:
                raise RuntimeError("act() called twice without observe() in between")
            if self._running and len(self._running) != obs.shape[0]:
                raise RuntimeError(f"{obs.shape[0]} observations while {len(self._running)} episodes are running")
            noise = torch.from_numpy(self.rng.standard_normal((obs.shape[0], 1)).astype(np.float32))  # (K, 1)
            actions = dist.mean + dist.stddev * noise  # (K, 1), unclipped: the log-prob is of this sample
            logprobs, values = dist.log_prob(actions).sum(-1), self.model.get_value(obs)  # (K,), (K,)
            self._pending = list(zip(obs, actions, logprobs, values))
        return self._to_keep_ratios(actions)

    def _to_keep_ratios(self, normalized_actions: torch.Tensor) -> np.ndarray:
        unit = normalized_actions.reshape(-1).clamp(0.0, 1.0).double().numpy()  # (K,)
        return self.action_low + unit * (self.action_high - self.action_low)

    def observe(self, reward: float, done: bool) -> None:
        """Record the outcome of the last ``act``; ``done`` is terminated or truncated."""
        self.observe_batch([reward], [done])

    def observe_batch(self, rewards, dones) -> None:
        """Record the outcomes of the last ``act_batch``, one reward and done flag per episode."""
        if self._pending is None:
            raise RuntimeError("observe() called without a preceding stochastic act()")
        rewards, dones = list(np.asarray(rewards, dtype=np.float64).reshape(-1)), list(np.asarray(dones).reshape(-1))
        if not len(rewards) == len(dones) == len(self._pending):
            raise ValueError(f"{len(rewards)} rewards and {len(dones)} done flags for {len(self._pending)} actions")
        if not self._running:
            self._running = [[] for _ in self._pending]
        for steps, pending, reward, done in zip(self._running, self._pending, rewards, dones):
            steps.append((*pending, torch.tensor(float(reward)), torch.tensor(float(bool(done)))))
            if done:  # the episode enters the buffer whole
                for name, values in zip(self._ROLLOUT_FIELDS, zip(*steps)):
                    self.rollout[name].extend(values)
                steps.clear()
        if not any(self._running):
            self._running = []
        self._pending = None

    def update(self) -> dict:
        """One PPO update on the complete episodes in the buffer, which it then empties (a partial episode stays)."""
        terminals = self.rollout["terminals"]
        num_steps = max((t + 1 for t, done in enumerate(terminals) if done), default=0)
        if num_steps == 0:
            raise RuntimeError("update() needs at least one complete episode in the buffer")
        used = {name: torch.stack(values[:num_steps]) for name, values in self.rollout.items()}
        # CleanRL's dones[t] flags that obs[t] begins an episode, i.e. step t-1 was terminal.
        dones = torch.cat([torch.zeros(1), used["terminals"][:-1]])  # [N]
        advantages, returns = compute_gae(
            used["rewards"], used["values"], dones, next_value=0.0, next_done=1.0,
            gamma=self.config.gamma, gae_lambda=self.config.gae_lambda,
        )
        batch = RolloutBatch(used["obs"], used["actions"], used["logprobs"], advantages, returns)
        stats = ppo_update(self.model, self.optimizer, batch, self.config, self.generator)
        self.rollout = {name: values[num_steps:] for name, values in self.rollout.items()}
        self.num_updates += 1
        return stats

    def save(self, path: str | PathLike) -> None:
        """One safetensors file: weights, Adam state, torch generator, rollout buffer; config and numpy RNG as JSON."""
        if self._pending is not None or self._running:
            raise RuntimeError("cannot save in the middle of an episode: observe() the running episodes to their end first")
        tensors = {f"model.{name}": value.contiguous() for name, value in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        for index, param_state in optimizer_state["state"].items():
            for key, value in param_state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
        tensors["rng.torch_generator"] = self.generator.get_state()
        for name, values in self.rollout.items():
            if values:
                tensors[f"rollout.{name}"] = torch.stack(values)
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(asdict(self.config)),
            "agent": json.dumps(
                {"obs_dim": self.obs_dim, "action_low": self.action_low, "action_high": self.action_high,
                 "seed": self.seed, "num_updates": self.num_updates}
            ),
            "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | PathLike) -> PPOAgent:
        with safe_open(str(path), framework="pt") as checkpoint:
            metadata = checkpoint.metadata() or {}
            tensors = {key: checkpoint.get_tensor(key) for key in checkpoint.keys()}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a PPOAgent checkpoint (format {metadata.get('format')!r})")
        fields = json.loads(metadata["agent"])
        agent = cls(fields["obs_dim"], fields["action_low"], fields["action_high"],
                    PPOConfig(**json.loads(metadata["config"])), seed=fields["seed"])
        agent.num_updates = fields["num_updates"]
        agent.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        # JSON turned tuples (Adam's betas) into lists.
        param_groups = [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
            for group in json.loads(metadata["optimizer_param_groups"])
        ]
        agent.optimizer.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
        agent.generator.set_state(tensors["rng.torch_generator"])
        agent.rng.bit_generator.state = json.loads(metadata["numpy_rng"])
        for name in cls._ROLLOUT_FIELDS:
            if f"rollout.{name}" in tensors:
                agent.rollout[name] = list(tensors[f"rollout.{name}"].unbind(0))
        return agent
