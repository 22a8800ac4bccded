"""hsbench.rl: normalization against gymnasium's wrappers, PPO's formulas against CleanRL's,
determinism, resumption from checkpoints, divergence, and short runs with every optimizer kind."""

from __future__ import annotations

import math
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal

from hsbench.engine.runner import RunContext
from hsbench.losses import PPOLoss
from hsbench.rl import a2c, networks, ppo, training
from hsbench.rl.env import NormalizedEnv, RunningMeanStd

ENV = "InvertedPendulum-v5"  # cheap, and random actions end its episodes within a few steps
PPO_TINY = {"num_steps": 64, "num_minibatches": 4, "update_epochs": 2}


def gymnasium_stack(env_id: str, seed: int, gamma: float) -> tuple[gym.Env, np.ndarray]:
    """CleanRL's ``make_env`` for ``ppo_continuous_action`` from gymnasium's own wrappers, and its first observation."""
    env = gym.make(env_id)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env = gym.wrappers.ClipAction(env)
    env = gym.wrappers.NormalizeObservation(env)
    env = gym.wrappers.TransformObservation(env, lambda o: np.clip(o, -10, 10), env.observation_space)
    env = gym.wrappers.NormalizeReward(env, gamma=gamma)
    env = gym.wrappers.TransformReward(env, lambda r: np.clip(r, -10, 10))
    return env, env.reset(seed=seed)[0]


@pytest.mark.parametrize("env_id", [ENV, "Hopper-v5"])
def test_normalized_env_equals_gymnasium_wrappers(env_id):
    ours, (theirs, obs) = NormalizedEnv(env_id, seed=3, gamma=0.9), gymnasium_stack(env_id, seed=3, gamma=0.9)
    np.testing.assert_allclose(ours.obs, obs, rtol=1e-5, atol=1e-6)
    actions = np.random.default_rng(0).uniform(-3, 3, (300, ours.act_dim))  # beyond the bounds: ClipAction
    episodes = 0
    for action in actions:
        step = ours.step(action)
        obs, reward, terminated, truncated, info = theirs.step(action)
        assert step.done == (terminated or truncated) and step.terminated == terminated
        if step.done:
            episodes += 1
            assert step.episode is not None
            assert step.episode[0] == pytest.approx(float(info["episode"]["r"]), rel=1e-6)
            assert step.episode[1] == int(info["episode"]["l"])
            obs = theirs.reset()[0]
        np.testing.assert_allclose(step.obs, obs, rtol=1e-5, atol=1e-6)
        assert step.reward == pytest.approx(float(reward), rel=1e-6)
    assert episodes > (5 if env_id == ENV else 0)  # resets are compared too


def test_running_mean_std_equals_direct_statistics():
    data = np.random.default_rng(1).normal(3.0, 2.0, (500, 4))
    rms, scalar = RunningMeanStd((4,)), RunningMeanStd(())
    for x in data:
        rms.update(x)
        scalar.update(float(x[0]))
    # the prior (mean 0, variance 1, count 1e-4) weighs 1e-4 / 500 of the data
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-5)
    assert rms.count == pytest.approx(500 + 1e-4)
    assert (scalar.mean, scalar.var) == (rms.mean[0], rms.var[0])


def test_normalized_reward_is_reward_over_std_of_discounted_return():
    env = NormalizedEnv(ENV, seed=0, gamma=0.5)
    raw, discounted, returns = [], 0.0, []
    rng = np.random.default_rng(2)
    for _ in range(40):
        before = env.episode_return
        step = env.step(rng.uniform(-3, 3, env.act_dim))
        r = (env.episode_return if step.episode is None else step.episode[0]) - before
        discounted = discounted * 0.5 * (1 - step.terminated) + r
        returns.append(discounted)
        raw.append(r)
        expected = np.clip(r / math.sqrt(np.var(returns) + 1e-8), -10, 10)
        assert step.reward == pytest.approx(expected, rel=1e-3)  # the 1e-4 prior of the statistics


def test_time_feature_is_the_authors_elapsed_time():
    """The authors' ``AddTimeInfo``: −0.5 at a reset and after an episode's first step, then
    1 / (time limit) more per step; appended before normalization, so the observation statistics
    average it over every observation seen (the last of an episode and the next one's first)."""
    env, plain = NormalizedEnv(ENV, seed=0, time_feature=True), NormalizedEnv(ENV, seed=0)
    assert env.obs_dim == plain.obs_dim + 1 and env.obs.shape == (env.obs_dim,)
    limit, seen, done_once = env.max_episode_steps, [-0.5], False
    rng = np.random.default_rng(0)
    for _ in range(30):
        action = rng.uniform(-3, 3, env.act_dim)
        step, twin = env.step(action), plain.step(action)
        length = step.episode[1] if step.done else env.episode_length
        seen.append(-0.5 + (length - 1) / limit)
        if step.done:
            seen.append(-0.5)
            done_once = True
        assert step.reward == twin.reward and step.done == twin.done  # the task itself is unchanged
        normalized = (seen[-1] - env.obs_rms.mean[-1]) / np.sqrt(env.obs_rms.var[-1] + 1e-8)  # the agent's entry
        assert step.obs[-1] == pytest.approx(np.clip(normalized, -10, 10), rel=1e-5, abs=1e-6)
    assert done_once and len(seen) > 4 and seen[2] == -0.5 + 1 / limit
    np.testing.assert_allclose(env.obs_rms.mean[-1], np.mean(seen), rtol=1e-3)  # the 1e-4 prior count
    np.testing.assert_allclose(env.obs_rms.mean[:-1], plain.obs_rms.mean, rtol=1e-12)


def test_a2c_keeps_torch_initialization_and_the_time_feature(monkeypatch):
    """As the authors' A2C runs: ``nn.Linear``'s own initialization, the elapsed time observed."""
    seen = {}

    def start_agent(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(a2c, "start_agent", start_agent)
    with pytest.raises(RuntimeError, match="stop"):
        a2c.train(ENV, "adam", 1e-3, seed=0, total_steps=10)
    assert seen == {"time_feature": True, "init": "torch"}
    torch.manual_seed(0)
    actor, critic = networks.actor(4, 2, init="torch"), networks.critic(4, init="torch")
    torch.manual_seed(0)
    expected = [nn.Linear(4, 64), nn.Linear(64, 64), nn.Linear(64, 2), nn.Linear(4, 64), nn.Linear(64, 64)]
    expected.append(nn.Linear(64, 1))
    linears = [m for m in [*actor, *critic] if isinstance(m, nn.Linear)]
    assert all(
        torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) for a, b in zip(linears, expected, strict=True)
    )
    assert torch.equal(actor[-1].log_std, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        networks.actor(4, 2, init="xavier")
    # ``start_agent`` hands both on: the environment observes the time, the networks take it in
    agent = training.start_agent(ENV, 0, 0.99, (nn.MSELoss(), nn.MSELoss()), "adam", 1e-3, {}, None, **seen)
    assert agent.env.time_feature and agent.env.obs_dim == NormalizedEnv(ENV, 0).obs_dim + 1
    torch.manual_seed(0)
    first = nn.Linear(agent.env.obs_dim, 64)  # the actor's first layer as nn.Linear draws it
    assert torch.equal(agent.actor[0].weight, first.weight) and agent.critic[0].in_features == agent.env.obs_dim


def test_gae_equals_cleanrl():
    """CleanRL's loop, where dones[t] flags that observation t starts a new episode."""
    rng = np.random.default_rng(0)
    T, gamma, lam = 50, 0.99, 0.95
    rewards, values = rng.normal(size=T), rng.normal(size=T + 1)
    ended = (rng.random(T) < 0.1).astype(float)  # step t ended its episode
    dones, next_done = np.concatenate([[0.0], ended[:-1]]), ended[-1]
    expected, last = np.zeros(T), 0.0
    for t in reversed(range(T)):
        if t == T - 1:
            nextnonterminal, nextvalues = 1.0 - next_done, values[T]
        else:
            nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        expected[t] = last = delta + gamma * lam * nextnonterminal * last
    np.testing.assert_allclose(ppo.gae(rewards, values, ended, gamma, lam), expected, rtol=1e-12)


def test_ppo_losses_equal_cleanrl():
    torch.manual_seed(0)
    actor, critic = networks.actor(5, 2), networks.critic(5)
    with torch.no_grad():
        actor[-1].log_std.copy_(torch.tensor([-0.3, 0.4]))
        actor[4].weight.mul_(50)  # means far enough from the old policy's that some ratios clip
    obs, actions = torch.randn(64, 5), torch.randn(64, 2)
    old_logprobs = Normal(torch.zeros(64, 2), 1.0).log_prob(actions).sum(1) + 0.3 * torch.randn(64)
    advantages, returns = torch.randn(64) * 2 + 1, torch.randn(64)
    pg_loss, v_loss = ppo.losses(
        actor, critic, PPOLoss("gaussian"), nn.MSELoss(), obs, actions, old_logprobs, advantages, returns
    )

    # CleanRL's ppo_continuous_action, unclipped value loss without CleanRL's 0.5 (the authors' MSELoss)
    mean = actor[:-1](obs)
    newlogprob = Normal(mean, actor[-1].log_std.exp()).log_prob(actions).sum(1)
    ratio = (newlogprob - old_logprobs).exp()
    mb_advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 0.8, 1.2)
    expected_pg = torch.max(pg_loss1, pg_loss2).mean()
    expected_v = ((critic(obs).view(-1) - returns) ** 2).mean()
    assert ((ratio - 1).abs() > 0.2).any() and ((ratio - 1).abs() < 0.2).any()
    torch.testing.assert_close(pg_loss, expected_pg)
    torch.testing.assert_close(v_loss, expected_v)


def test_networks_as_cleanrl():
    torch.manual_seed(0)
    actor, critic = networks.actor(11, 3), networks.critic(11)
    for net, last_gain in ((actor, 0.01), (critic, 1.0)):
        linears = [m for m in net if isinstance(m, nn.Linear)]
        for layer, gain in zip(linears, (math.sqrt(2), math.sqrt(2), last_gain), strict=True):
            w = layer.weight
            small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # orthogonal rows or columns, times gain²
            torch.testing.assert_close(small, gain**2 * torch.eye(small.shape[0]), atol=1e-5, rtol=0)
            assert not layer.bias.any()
    assert actor(torch.zeros(4, 11)).shape == (4, 6) and not actor[-1].log_std.any()


def test_numpy_policy_equals_torch():
    torch.manual_seed(0)
    actor = networks.actor(11, 3)
    with torch.no_grad():
        actor[-1].log_std.fill_(-0.5)
        for m in actor:
            if isinstance(m, nn.Linear):
                m.bias.normal_()
    policy = networks.NumpyPolicy(actor)
    obs = np.random.default_rng(0).normal(size=(7, 11)).astype(np.float32)
    out = actor(torch.from_numpy(obs)).detach().numpy()
    np.testing.assert_allclose(np.stack([policy.mean(o) for o in obs]), out[:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy.std, np.exp(-0.5))
    with torch.no_grad():
        actor[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        policy.load(actor)


class Stop(Exception):
    pass


class Context(RunContext):
    """The engine's run context, checkpointing after every update (interval 0) into ``path``,
    keeping the saved states, and raising ``Stop`` (a kill) after ``stop_after`` checkpoints."""

    def __init__(self, path, stop_after=None):
        super().__init__(run_id="rl", seed=0, device="cpu", checkpoint_path=path, checkpoint_interval_s=0.0)
        self.states, self.stop_after = [], stop_after

    def save_checkpoint(self, state):
        super().save_checkpoint(state)
        self.states.append(state)
        if len(self.states) == self.stop_after:
            raise Stop


def without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "time_s"}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name in a["networks"]:
        for key, value in a["networks"][name].items():
            assert torch.equal(value, b["networks"][name][key]), (name, key)
    assert without_time(a["metrics"]) == without_time(b["metrics"])
    data_a, data_b = pickle.loads(a["env"]["mjdata"]), pickle.loads(b["env"]["mjdata"])
    for field in ("time", "qpos", "qvel", "act", "qacc_warmstart", "ctrl"):
        np.testing.assert_array_equal(getattr(data_a, field), getattr(data_b, field))
    np.testing.assert_array_equal(a["env"]["obs_rms"]["var"], b["env"]["obs_rms"]["var"])
    assert a["numpy_rng"] == b["numpy_rng"]


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks: one thread is fastest, and on a loaded machine several are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RUNS = {
    "ppo": lambda optimizer, ctx=None, seed=0: ppo.train(ENV, optimizer, 3e-3, seed, 64 * 5, ctx=ctx, **PPO_TINY),
    "a2c": lambda optimizer, ctx=None, seed=0: a2c.train(ENV, optimizer, 3e-3, seed, 1000, record_every=256, ctx=ctx),
}


@pytest.mark.parametrize(
    "algorithm, optimizer",
    [("ppo", "adam"), ("a2c", "adam"), ("ppo", "adahessian"), ("a2c", "scaled-adahesscale")],
)  # AdaHessian draws from torch's generator; the scaled optimizers keep more state
def test_resumed_run_equals_uninterrupted(algorithm, optimizer, tmp_path):
    run = RUNS[algorithm]
    straight = Context(tmp_path / "straight.pt")
    expected = run(optimizer, straight)
    killed = Context(tmp_path / "killed.pt", stop_after=2)
    with pytest.raises(Stop):
        run(optimizer, killed)
    resumed = Context(tmp_path / "killed.pt")  # loads the file the killed run saved
    metrics = run(optimizer, resumed)
    assert resumed.resumed and len(killed.states) == 2
    assert len(expected["episode_returns"]) > 5
    assert without_time(metrics) == without_time(expected)
    assert_same_state(resumed.states[-1], straight.states[-1])
    assert metrics["time_s"]["env"] > 0


@pytest.mark.parametrize("algorithm", RUNS)
def test_deterministic(algorithm):
    first, second = RUNS[algorithm]("adam"), RUNS[algorithm]("adam")
    assert without_time(first) == without_time(second)
    assert without_time(RUNS[algorithm]("adam", seed=1)) != without_time(first)


@pytest.mark.parametrize("algorithm", RUNS)
@pytest.mark.parametrize("optimizer", ["adam", "adahesscale", "scaled-adahesscale", "scaled-adam", "adahessian"])
def test_smoke(algorithm, optimizer):
    metrics = RUNS[algorithm](optimizer)
    assert metrics["diverged_at_step"] is None
    assert metrics["episode_steps"] == sorted(metrics["episode_steps"]) and len(metrics["episode_returns"]) > 5
    assert all(math.isfinite(r) and r > 0 for r in metrics["episode_returns"])
    if optimizer.startswith("scaled-"):
        assert len(metrics["eta_steps"]) == (5 if algorithm == "ppo" else 4)
        assert all(0 < eta <= 1 for eta in metrics["eta_actor"] + metrics["eta_critic"])
    else:
        assert metrics["eta_steps"] == []


@pytest.mark.parametrize("algorithm", RUNS)
def test_divergence_is_reported_with_its_step(algorithm):
    if algorithm == "ppo":
        metrics = ppo.train(ENV, "adam", 1e30, 0, 64 * 5, **PPO_TINY)
    else:
        metrics = a2c.train(ENV, "adam", 1e30, 0, 1000)
    step = metrics["diverged_at_step"]
    assert step is not None and metrics["diverged"]
    assert metrics["episode_steps"] == [] or metrics["episode_steps"][-1] <= step
    if algorithm == "ppo":
        assert step % 64 == 0 and step <= 64 * 5


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown environment 'Hopper-v0'"):
        NormalizedEnv("Hopper-v0", 0)
    with pytest.raises(ValueError, match="not a MuJoCo environment"):
        NormalizedEnv("CartPole-v1", 0)
    with pytest.raises(ValueError, match="multiple of num_minibatches"):
        ppo.train(ENV, total_steps=100, num_steps=100, num_minibatches=32)
    with pytest.raises(ValueError, match="unknown optimizer"):
        a2c.train(ENV, "adamw", total_steps=10)
