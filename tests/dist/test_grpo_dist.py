"""Critic-free estimators (GRPO, RLOO) with n samples per prompt on real DeepSpeed engines
in 2 CPU processes, through the launcher: all runs of a rank count share one launch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_rlhf.tracking import read_metrics
from tests.conftest import ppo_config, run_deepspeed, write_yaml

pytestmark = pytest.mark.dist

N = 4  # samples per prompt
# 4 prompts x 4 samples = 16 rows: 8 per rank on 2 ranks, two minibatches of 4 per rank.
GROUPS = {"generation": {"max_new_tokens": 8, "batch_size": 8, "n_samples_per_prompt": N}}
GRPO = {"advantage_estimator": "grpo", "kl_coef": 0.0, "rollout_batch_size": 4,
        "num_minibatches": 2}
RLOO = {"advantage_estimator": "rloo", "kl_coef": 0.05, "rollout_batch_size": 4}


# An environment whose episodes have two model turns whatever the (random) model writes.
ENV = '''
class Echo:
    def reset(self, row):
        self.turns = 0
        return row["prompt"]

    def step(self, action):
        self.turns += 1
        return " it is good", sum(map(ord, action)) % 7 / 7, self.turns == 2
'''

# Echo, but the second sample of each prompt in FAILING raises in its first step(): one
# failed episode per prompt of FAILING per step. Its per-process count of each prompt's
# resets is the sample index (a group is reset in order, on one rank).
FLAKY = ENV + """

class Flaky(Echo):
    FAILING = {failing!r}
    resets = {{}}

    def reset(self, row):
        k = Flaky.resets[row["prompt"]] = Flaky.resets.get(row["prompt"], -1) + 1
        self.fails = k % 4 == 1 and row["prompt"] in self.FAILING
        return super().reset(row)

    def step(self, action):
        if self.fails:
            raise KeyError("the flaky environment lost its state")
        return super().step(action)
"""


def four_prompts(assets, tmp) -> tuple[str, list[str]]:
    """A prompt file of 4 prompts: with rollout_batch_size 4 every step has all of them."""
    lines = open(assets["prompts"]).read().splitlines()[:4]
    path = tmp / "four_prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), [json.loads(line)["prompt"] for line in lines]


def _agent(assets, tmp, name: str, steps: int) -> dict:
    """GRPO on environment episodes: 2 turns of up to 8 tokens, a 3-token observation
    between them; the environment's reward is the only one (no reward model). ZeRO-3: each
    turn generates on the gathered copy, filled once per step."""
    return _config(assets, tmp, name, 3, {**GRPO, "steps": steps,
                                          "loss_agg": "seq_mean_token_mean"},
                   reward={"model": {}, "zero_stage": 3},
                   rollout={"environment": f"{tmp / 'env.py'}:Echo", "max_turns": 3,
                            "max_total_tokens": 24})


def _lagged(assets, tmp, name: str, steps: int, k: int, zero_stage: int = 2) -> dict:
    """GRPO with rollout.staleness k and TIS, a reward function only; a checkpoint at every
    step (the weights that sampled each step are checked against them)."""
    return _config(assets, tmp, name, zero_stage,
                   {**GRPO, "steps": steps, "rollout_correction": "tis"},
                   reward={"model": {}, "zero_stage": 3},
                   rewards=[{"function": f"{tmp / 'reward_fn.py'}:char_code"}],
                   rollout={"staleness": k}, checkpoint={"save_every": 1, "keep_last": 10})


def _config(assets, tmp, name: str, zero_stage: int, ppo: dict, **sections) -> dict:
    base = ppo_config(assets, tmp / name)
    stage = {"zero_stage": zero_stage}
    return ppo_config(assets, tmp / name, actor={**base["actor"], **stage}, ppo=ppo,
                      **GROUPS, **sections)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """The runs of this file: output dirs by name. One 2-rank launch runs them in order; the
    first config ("grpo") also runs alone on 1 rank ("grpo_1rank")."""
    tmp = tmp_path_factory.mktemp("grpo")
    (tmp / "reward_fn.py").write_text(  # a rule with spread inside groups, no model
        "def char_code(prompts, completions, **columns):\n"
        "    return [sum(map(ord, c)) % 7 / 7 for c in completions]\n")
    (tmp / "env.py").write_text(ENV)
    prompts, texts = four_prompts(assets, tmp)
    (tmp / "flaky.py").write_text(FLAKY.format(failing=texts[:1]))
    configs = {
        # A reward function only, kl_coef 0 and kl_loss_coef 0: the actor is the only
        # engine. seq_mean_token_mean over the global minibatch; 2 minibatches drawn from
        # all ranks' rows.
        "grpo": _config(assets, tmp, "grpo", 3, {**GRPO, "steps": 1,
                                                 "loss_agg": "seq_mean_token_mean"},
                        reward={"model": {}, "zero_stage": 3},
                        rewards=[{"function": f"{tmp / 'reward_fn.py'}:char_code"}]),
        # "grpo" with truncated importance sampling: the hf sampler's logprobs equal the
        # trainer's up to round-off, so the update must be "grpo"'s
        "grpo_tis": _config(assets, tmp, "grpo_tis", 3, {**GRPO, "steps": 1,
                                                         "loss_agg": "seq_mean_token_mean",
                                                         "rollout_correction": "tis"},
                            reward={"model": {}, "zero_stage": 3},
                            rewards=[{"function": f"{tmp / 'reward_fn.py'}:char_code"}]),
        # One minibatch, no KL in the reward: the on-policy shortcut (old logprobs from the
        # training forward) against the two-forward path; with TIS and a KL loss term (the
        # reference), so the weights and the KL metric read the detached values.
        **{name: _config(assets, tmp, name, 3, {
            **GRPO, "steps": 2, "num_minibatches": 1, "rollout_correction": "tis",
            "kl_loss_coef": 0.1, "on_policy_shortcut": shortcut},
            rewards=[{"function": f"{tmp / 'reward_fn.py'}:char_code"}],
            reward={"model": {}, "zero_stage": 3})
           for name, shortcut in (("shortcut", True), ("two_forwards", False))},
        # a KL loss term needs the reference; DAPO's clip-higher; Dr. GRPO's normalisation
        "grpo_kl": _config(assets, tmp, "grpo_kl", 2, {
            **GRPO, "steps": 2, "kl_loss_coef": 0.1, "kl_loss_estimator": "k2",
            "clip_eps_high": 0.28, "loss_agg": "seq_mean_token_sum_norm"}),
        "rloo_z3": _config(assets, tmp, "rloo_z3", 3, {**RLOO, "steps": 2}),
        # rloo at ZeRO-2: 2 steps uninterrupted; 1 step then resumed to 2 in another dir
        "rloo": _config(assets, tmp, "rloo", 2, {**RLOO, "steps": 2}),
        "rloo_cut": _config(assets, tmp, "rloo_cut", 2, {**RLOO, "steps": 1}),
        "rloo_resumed": _config(assets, tmp, "rloo_cut", 2, {**RLOO, "steps": 2}),
        # multi-turn episodes with an environment: 2 steps; 1 step then resumed to 2
        "agent": _agent(assets, tmp, "agent", 2),
        "agent_cut": _agent(assets, tmp, "agent_cut", 1),
        "agent_resumed": _agent(assets, tmp, "agent_cut", 2),
        # rollout.staleness: 3 GRPO steps with a lag of 1 (uninterrupted; 2 steps then
        # resumed to 3), a lag of 2, and PPO with a critic and the reward model
        **{name: _lagged(assets, tmp, name, steps, k)
           for name, steps, k in (("grpo_lag1", 3, 1), ("grpo_lag1_cut", 2, 1),
                                  ("grpo_lag2", 4, 2))},
        "grpo_lag1_resumed": _lagged(assets, tmp, "grpo_lag1_cut", 3, 1),
        "ppo_lag1": ppo_config(assets, tmp / "ppo_lag1", rollout={"staleness": 1},
                               ppo={"steps": 3, "rollout_batch_size": 8, "num_minibatches": 2,
                                    "rollout_correction": "tis"}),
        # 1 of the 16 episodes of each step fails: it leaves the update, the run goes on
        "flaky": {**_agent(assets, tmp, "flaky", 2),
                  "data": {"datasets": [{"path": prompts}], "max_prompt_len": 16},
                  "rollout": {"environment": f"{tmp / 'flaky.py'}:Flaky", "max_turns": 3,
                              "max_total_tokens": 24}},
    }
    paths = [write_yaml(cfg, tmp / f"{name}.yaml") for name, cfg in configs.items()]
    proc = run_deepspeed(2, ["tests/dist/runs.py", *map(str, paths)], module=False,
                         timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ones = [write_yaml({**configs[name], "output_dir": str(tmp / f"{name}_1rank")},
                       tmp / f"{name}_1rank.yaml")
            for name in ("grpo", "agent", "flaky", "grpo_lag1", "ppo_lag1")]
    proc1 = run_deepspeed(1, ["tests/dist/runs.py", *map(str, ones)], module=False,
                          timeout=600)
    assert proc1.returncode == 0, proc1.stdout[-4000:] + proc1.stderr[-4000:]
    # rollout.placement separate, the lagged runs again: 1 training + 1 generation rank
    # (with grpo_lag1 cut after step 2), then 2 + 1, resuming that cut run to step 3
    pool = {"placement": "separate", "generation_ranks": 1}
    # and grpo_lag1 with the actor at ZeRO-3 (separate only): its weights go to the pool
    # gathered a bucket at a time, buckets of 50 KB (about 20 a step)
    configs["grpo_lag1_z3"] = _lagged(assets, tmp, "grpo_lag1_z3", 3, 1, zero_stage=3)
    configs["grpo_lag1_z3"]["rollout"]["weight_bucket_mb"] = 0.05
    separate = {nproc: [write_yaml({**configs[name], "output_dir": str(tmp / f"{out}"),
                                    "rollout": {**configs[name]["rollout"], **pool}},
                                   tmp / f"{out}.yaml") for name, out in names]
                for nproc, names in (
                    (2, (("grpo_lag1", "grpo_lag1_sep11"), ("ppo_lag1", "ppo_lag1_sep11"),
                         ("grpo_lag1_cut", "grpo_lag1_sep_cut"))),
                    (3, (("grpo_lag1", "grpo_lag1_sep21"), ("ppo_lag1", "ppo_lag1_sep21"),
                         ("grpo_lag1_resumed", "grpo_lag1_sep_cut"),
                         ("grpo_lag1_z3", "grpo_lag1_sep21_z3"))))}
    for nproc, paths in separate.items():
        proc_sep = run_deepspeed(nproc, ["tests/dist/runs.py", *map(str, paths)], module=False,
                                 timeout=600)
        assert proc_sep.returncode == 0, proc_sep.stdout[-4000:] + proc_sep.stderr[-4000:]
    out = {name: tmp / name for name in configs
           if not name.endswith("_resumed") and name != "grpo_lag1_z3"}
    return {**out, **{f"{name}_1rank": tmp / f"{name}_1rank"
                      for name in ("grpo", "agent", "flaky", "grpo_lag1", "ppo_lag1")},
            **{name: tmp / name for name in ("grpo_lag1_sep11", "ppo_lag1_sep11",
                                             "grpo_lag1_sep21", "ppo_lag1_sep21",
                                             "grpo_lag1_sep_cut", "grpo_lag1_sep21_z3")},
            "stdout": proc.stdout, "stdout_1rank": proc1.stdout}


@pytest.mark.parametrize("name, steps", [("grpo", 1), ("grpo_tis", 1), ("grpo_kl", 2),
                                         ("rloo_z3", 2), ("rloo", 2)])
def test_critic_free_runs_finish_with_finite_metrics(runs, name, steps):
    metrics = read_metrics(runs[name] / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        for key, value in m.items():
            assert math.isfinite(value), (name, key, value)
        assert "loss/value_avg" not in m  # no critic, no value loss
        assert m["timing/critic_train"] == 0.0 and m["timing/values"] == 0.0
        assert m["perf/samples_per_s"] > 0
    if name.startswith("rloo"):  # one minibatch: the update sees the policy that sampled
        assert metrics[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert (runs[name] / "actor" / "config.json").is_file()  # exported
    assert not (runs[name] / "critic").exists()
    checkpoint = runs[name] / "checkpoints" / f"step_{steps}"
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == ["actor"]


def test_engines_built_follow_the_kl_terms(runs):
    """What a run builds, from what it reports: engines.json and the console line."""
    def engines(name):
        return json.loads((runs[name] / "engines.json").read_text())["engines"]

    assert engines("grpo") == ["actor"]  # reward function, kl_coef 0, kl_loss_coef 0
    assert engines("grpo_kl") == ["actor", "ref", "reward"]  # kl_loss_coef 0.1, reward model
    assert engines("rloo") == ["actor", "ref", "reward"]  # kl_coef 0.05 in the reward
    assert "engines: actor (ppo.advantage_estimator grpo)" in runs["stdout"]
    kl = read_metrics(runs["grpo_kl"] / "metrics.jsonl")
    assert kl[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # actor == reference
    assert kl[1]["policy/ref_kl_avg"] > 0  # ... until the first update (k3 >= 0)


def test_on_policy_shortcut_takes_the_two_forward_step(runs):
    """Old logprobs from the training forward (detached) instead of a scoring forward: no
    time in actor_logprobs, and the same update and metrics (TIS weights, mismatch, KL to
    the reference measured after the update) as the two-forward path, over 2 steps."""
    short = read_metrics(runs["shortcut"] / "metrics.jsonl")
    full = read_metrics(runs["two_forwards"] / "metrics.jsonl")
    for a, b in zip(short, full, strict=True):
        assert a["timing/actor_logprobs"] == 0.0 < b["timing/actor_logprobs"]
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith(("timing/", "perf/")):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    # step 1 moved the actor away from the reference; on-policy, the ratio is 1
    assert full[1]["policy/ref_kl_avg"] > 0
    assert full[0]["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    a = AutoModelForCausalLM.from_pretrained(runs["shortcut"] / "actor").state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["two_forwards"] / "actor").state_dict()
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=1e-6, rtol=0)


def test_groups_sample_apart_and_share_their_prompt(runs):
    rows = [json.loads(x) for x in (runs["grpo"] / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * N
    by_prompt: dict[int, list] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    assert len(by_prompt) == 4
    for group in by_prompt.values():
        assert sorted(r["sample_index"] for r in group) == list(range(N))
        assert len({tuple(r["response_ids"]) for r in group}) > 1  # n different draws


def test_one_rank_equals_two_ranks_with_two_minibatches(runs):
    """Same GRPO config on 1 and 2 ranks: the same tokens, and the same actor after a step of
    2 minibatches drawn from a global shuffle (rows exchanged between ranks)."""
    def samples(out):
        rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        return {(r["prompt_index"], r["sample_index"]): r for r in rows}

    one, two = samples(runs["grpo_1rank"]), samples(runs["grpo"])
    assert sorted(one) == sorted(two) and len(one) == 4 * N
    for key in one:
        assert one[key]["response_ids"] == two[key]["response_ids"]
        assert one[key]["score"] == pytest.approx(two[key]["score"], abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(runs["grpo_1rank"] / "actor").state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["grpo"] / "actor").state_dict()
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=1e-5, rtol=0)
    m1 = read_metrics(runs["grpo_1rank"] / "metrics.jsonl")[0]
    m2 = read_metrics(runs["grpo"] / "metrics.jsonl")[0]
    for key in ("objective/scores", "loss/policy_avg", "policy/approxkl_avg"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    assert m2["policy/approxkl_avg"] > 0  # the first minibatch moved the actor
    assert m2["rewards/char_code/mean"] == pytest.approx(m2["objective/scores"], abs=1e-6)


def test_resumed_critic_free_run_equals_uninterrupted_run(runs):
    full = read_metrics(runs["rloo"] / "metrics.jsonl")
    cut = read_metrics(runs["rloo_cut"] / "metrics.jsonl")
    assert [m["step"] for m in cut] == [1, 2]
    for a, b in zip(full, cut, strict=True):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg",
                    "policy/approxkl_avg", "response_length/mean"):
            assert a[key] == b[key], (a["step"], key)


def test_multi_turn_one_rank_equals_two_ranks(runs):
    """Environment episodes on 1 and 2 ranks: the same episodes token for token, the same
    metrics and the same actor after 2 GRPO steps of 2 minibatches each."""
    def samples(out):
        rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        return {(r["step"], r["prompt_index"], r["sample_index"]): r for r in rows}

    one, two = samples(runs["agent_1rank"]), samples(runs["agent"])
    assert sorted(one) == sorted(two) and len(one) == 2 * 4 * N
    for key, row in two.items():
        assert one[key]["response_ids"] == row["response_ids"]
        assert [p["role"] for p in row["parts"]] == ["assistant", "environment", "assistant"]
        assert row["parts"][1]["text"] == "it is good"
    a = AutoModelForCausalLM.from_pretrained(runs["agent_1rank"] / "actor").state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["agent"] / "actor").state_dict()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=1e-5, rtol=0)
    for m1, m2 in zip(read_metrics(runs["agent_1rank"] / "metrics.jsonl"),
                      read_metrics(runs["agent"] / "metrics.jsonl"), strict=True):
        for key in ("objective/scores", "loss/policy_avg", "policy/approxkl_avg",
                    "episode/turns_mean", "episode/truncated", "response_length/mean"):
            assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
        assert m2["episode/turns_mean"] == 2.0  # the environment ends every episode there
        assert m2["episode/tool_calls_mean"] == 0.0 and m2["episode/tool_errors"] == 0.0
        assert m2["episode/truncated"] == 0.0 and m2["timing/env"] >= 0.0
        assert m2["rewards/environment/mean"] == pytest.approx(m2["objective/scores"], abs=1e-6)
        assert m2["policy/approxkl_avg"] > 0


def test_resumed_multi_turn_run_equals_uninterrupted_run(runs):
    full = read_metrics(runs["agent"] / "metrics.jsonl")
    cut = read_metrics(runs["agent_cut"] / "metrics.jsonl")
    assert [m["step"] for m in cut] == [1, 2]
    for a, b in zip(full, cut, strict=True):
        for key in ("objective/scores", "loss/policy_avg", "policy/approxkl_avg",
                    "response_length/mean", "episode/turns_mean"):
            assert a[key] == b[key], (a["step"], key)
    a = AutoModelForCausalLM.from_pretrained(runs["agent"] / "actor").state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["agent_cut"] / "actor").state_dict()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_tis_with_the_hf_sampler_changes_nothing(runs):
    """The hf decode loop's sampler logprobs are the trainer's up to fp32 round-off: the
    mismatch metrics are ~0, no weight is capped, and the tis update is the plain one."""
    plain = read_metrics(runs["grpo"] / "metrics.jsonl")[0]
    tis = read_metrics(runs["grpo_tis"] / "metrics.jsonl")[0]
    for m in (plain, tis):
        assert 0 <= m["rollout/logprob_abs_diff"] < 1e-4
        assert abs(m["rollout/mismatch_kl"]) < 1e-3
    assert tis["rollout/is_capped_frac"] == 0.0 and "rollout/is_capped_frac" not in plain
    assert tis["rollout/logprob_abs_diff"] == plain["rollout/logprob_abs_diff"]  # same draws
    for key in ("loss/policy_avg", "policy/approxkl_avg", "policy/clipfrac_avg"):
        assert tis[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key
    a = AutoModelForCausalLM.from_pretrained(runs["grpo"] / "actor").state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["grpo_tis"] / "actor").state_dict()
    # Adam (lr 1e-3) moves a weight up to ~1e-3 per step. A weight whose gradient nearly
    # cancels to 0 is sensitive to round-off in its terms, so single weights may differ by
    # up to 1% of a step (seen: 3 of 26k above 1e-7, at most 2.5e-6); on average 1e-5 of it.
    diff = torch.cat([(b[name] - value).abs().flatten() for name, value in a.items()])
    assert diff.max() < 1e-5 and diff.mean() < 1e-8, (diff.max(), diff.mean())


def test_a_failed_episode_leaves_the_update_and_the_run_goes_on(runs):
    """Flaky fails 1 of the 16 episodes of each step: both steps run, each counts one failed
    episode and prints its kind once (step 1); 1 rank and 2 ranks train alike."""
    for name in ("flaky", "flaky_1rank"):
        metrics = read_metrics(runs[name] / "metrics.jsonl")
        assert [m["env/failed_episodes"] for m in metrics] == [1, 1]
        assert all(m["train/skipped_minibatches"] == 0 for m in metrics)
        stdout = runs["stdout" if name == "flaky" else "stdout_1rank"]
        kind = "step() raised KeyError: 'the flaky environment lost its state'"
        assert stdout.count(kind) == 1, stdout[-3000:]
        assert "PPO step 1: 1 of 16 rows failed: environment" in stdout
    for m1, m2 in zip(read_metrics(runs["flaky_1rank"] / "metrics.jsonl"),
                      read_metrics(runs["flaky"] / "metrics.jsonl"), strict=True):
        for key in ("objective/scores", "loss/policy_avg", "policy/approxkl_avg",
                    "response_length/mean"):
            assert m1[key] == pytest.approx(m2[key], abs=1e-5), key


def _samples(out) -> dict:
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["step"], r["prompt_index"], r["sample_index"]): r for r in rows}


@pytest.mark.parametrize("name, other", [
    *((name, f"{name}_{other}") for name in ("grpo_lag1", "ppo_lag1")
      for other in ("1rank", "sep11", "sep21")), ("grpo_lag1", "grpo_lag1_sep21_z3")])
def test_a_lagged_run_is_the_same_on_any_ranks_and_placement(runs, name, other):
    """rollout.staleness 1, GRPO and PPO with a critic, colocated on 2 ranks against 1 rank,
    and against the separate placement with 1 training + 1 generation rank and 2 + 1: the
    same sampled tokens on every row of every step, metrics within 1e-6 (also with the actor
    at ZeRO-3 in the separate placement, its weights gathered a bucket at a time for the
    transfer, against ZeRO-2 colocated); the lag is logged,
    and the old logprobs, recomputed by the updated actor, differ from the sampler's from
    step 2 on."""
    one, two = _samples(runs[other]), _samples(runs[name])
    assert sorted(one) == sorted(two) and len(two) == 3 * (16 if name == "grpo_lag1" else 8)
    for key, row in two.items():
        assert one[key]["response_ids"] == row["response_ids"], key
    m1s, m2s = (read_metrics(runs[n] / "metrics.jsonl") for n in (other, name))
    for m1, m2 in zip(m1s, m2s, strict=True):
        for key, value in m2.items():
            # A clip fraction counts tokens past a boundary: round-off (1e-8 here, the two
            # runs sum gradients in another order) may move one of the step's ~60 tokens.
            tolerance = 0.02 if "clipfrac" in key else 1e-6
            if not key.startswith(("timing/", "perf/")):
                assert m1[key] == pytest.approx(value, abs=tolerance), (m2["step"], key)
    assert [m["rollout/staleness"] for m in m2s] == [0, 1, 1]
    assert m2s[0]["rollout/logprob_abs_diff"] < 1e-4  # step 1: sampled by W_0, trained by W_0
    for m in m2s[1:]:  # sampled by W_{t-2}, the old logprobs by W_{t-1}
        assert m["rollout/logprob_abs_diff"] > 1e-3
        assert 0 < m["rollout/is_weight_mean"] <= m["rollout/is_weight_max"] <= 2.0


def test_the_pool_gets_the_actor_after_every_update(runs):
    """Separate placement, lag 1: at step t the weights sent to the generation rank are the
    actor after step t - 1 (W_{t-1}, which samples step t + 1's rollout): their checksum is
    that of the actor in the checkpoint of step t - 1, byte for byte."""
    from ds_rlhf.engines.transport import checksum

    out = runs["grpo_lag1_sep21"]
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["weights/version"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert m["weights/transfer_bytes"] > 0 and m["timing/weight_transfer"] > 0
        if m["weights/version"] == 0:
            continue
        states = torch.load(out / "checkpoints" / f"step_{m['weights/version']}" / "actor" /
                            "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert m["weights/checksum"] == sum(map(checksum, states.values())) % 2**52, m["step"]


@pytest.mark.parametrize("full, cut", [("grpo_lag1", "grpo_lag1_cut"),
                                       ("grpo_lag1_sep21", "grpo_lag1_sep_cut")])
def test_a_resumed_lagged_run_equals_the_uninterrupted_run(runs, full, cut):
    """Cut after step 2 with step 3's rollout in the FIFO (rollouts.pt): the same command
    resumed trains on it: the metrics are the uninterrupted run's bit for bit. In the
    separate placement, cut with 1 training rank and resumed with 2 (both with a generation
    rank): the rows the pool had made are in the checkpoint, and step 3 trains on them."""
    step_2 = runs[cut] / "checkpoints" / "step_2"
    assert (step_2 / "rollouts.pt").is_file()
    assert "rollouts.pt" in json.loads((step_2 / "manifest.json").read_text())["files"]
    full_metrics, resumed = (read_metrics(runs[n] / "metrics.jsonl") for n in (full, cut))
    assert [m["step"] for m in resumed] == [1, 2, 3]
    exact = cut == "grpo_lag1_cut"  # else steps 1-2 ran on 1 training rank: round-off
    if not exact:
        assert _samples(runs[cut]).keys() == _samples(runs[full]).keys()
        for key, row in _samples(runs[full]).items():
            assert _samples(runs[cut])[key]["response_ids"] == row["response_ids"], key
    for a, b in zip(full_metrics, resumed, strict=True):
        for key, value in a.items():
            if not key.startswith(("timing/", "perf/", "weights/")):
                tolerance = 0 if exact else 0.02 if "clipfrac" in key else 1e-6
                assert b[key] == pytest.approx(value, abs=tolerance), (a["step"], key)


@pytest.mark.parametrize("name, k", [("grpo_lag1", 1), ("grpo_lag2", 2)])
def test_the_rollout_of_step_t_is_sampled_by_the_actor_after_step_t_minus_1_minus_k(
        runs, name, k):
    """Every row of step t, sampled again (same seeds) by the actor of checkpoint step
    t - 1 - k (the initial actor where that is <= 0), gives the run's tokens. And the FIFO
    that each checkpoint holds (rollouts.pt) carries the sampler's logprobs of exactly that
    actor: those of the next actor differ."""
    from ds_rlhf.config import load_config
    from ds_rlhf.data import collate_left, load_prompts
    from ds_rlhf.generation import generate
    from ds_rlhf.models import build_causal_lm, load_tokenizer

    out = runs[name]
    cfg = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(cfg.actor.model, "actor")
    prompts = load_prompts(cfg.data, tokenizer, split="train")

    def actor_after(step: int):
        model = build_causal_lm(cfg.actor.model, "actor", cfg.actor.dtype, cfg.seed).eval()
        if step > 0:
            states = out / "checkpoints" / f"step_{step}" / "actor" / "mp_rank_00_model_states.pt"
            model.load_state_dict(torch.load(states, weights_only=False)["module"])
        return model

    samples = _samples(out)
    for step in range(1, cfg.ppo.steps + 1):
        rows = [r for (s, _, _), r in sorted(samples.items()) if s == step]
        ids, mask = collate_left([prompts.input_ids[r["prompt_index"]] for r in rows],
                                 tokenizer.pad_token_id)
        response, response_mask = generate(
            actor_after(max(step - 1 - k, 0)), ids, mask,
            torch.tensor([r["prompt_index"] for r in rows]), step=step, seed=cfg.seed,
            max_new_tokens=cfg.generation.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, temperature=cfg.generation.temperature,
            sample_index=torch.tensor([r["sample_index"] for r in rows]))
        assert [t[m.bool()].tolist() for t, m in zip(response, response_mask, strict=True)] \
            == [r["response_ids"] for r in rows], step

    def logprobs(model, row) -> torch.Tensor:  # the row's response tokens, teacher-forced
        ids = torch.tensor([row.prompt_ids + row.response_ids])
        logits = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1:-1].float()
        return torch.log_softmax(logits / cfg.generation.temperature, -1).gather(
            1, torch.tensor(row.response_ids)[:, None]).squeeze(1)

    for saved in range(1, cfg.ppo.steps + 1):
        fifo = torch.load(out / "checkpoints" / f"step_{saved}" / "rollouts.pt",
                          weights_only=False)["fifo"]
        assert [(s, v) for s, v, _ in fifo] == [
            (s, max(s - 1 - k, 0)) for s in range(saved + 1, saved + 1 + k)]
        for made_for, version, rows in fifo:
            right, next_one = actor_after(version), actor_after(version + 1)
            diffs = []
            for row in rows:
                sampler = torch.tensor(row.sampler_logprobs)
                torch.testing.assert_close(logprobs(right, row), sampler, atol=1e-4, rtol=0)
                diffs.append((logprobs(next_one, row) - sampler).abs().max())
            assert max(diffs) > 1e-3, (saved, made_for)  # one update later: another actor
