"""Config: YAML round-trip, dotted overrides, and one clear error per class of bad input."""

from __future__ import annotations

import os

import pytest
import yaml

from ds_rlhf.config import (
    ConfigError,
    PPORunConfig,
    SFTRunConfig,
    derive_sizes,
    load_config,
    parse_overrides,
    to_yaml,
)
from ds_rlhf.engines.ds_config import deepspeed_config

BASE = {
    "actor": {"model": {"path": "/models/sft"}, "micro_batch_size": 2},
    "critic": {"model": {"path": "/models/rm"}, "micro_batch_size": 2},
    "reward": {"model": {"path": "/models/rm"}},
    "data": {"datasets": [{"path": "prompts.jsonl", "format": "prompt"}]},
    "ppo": {"rollout_batch_size": 16, "num_minibatches": 2},
}


@pytest.fixture
def base_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def test_yaml_round_trip_is_identity(base_yaml, tmp_path):
    cfg = load_config(base_yaml, ["--ppo.kl_coef", "0.1", "--generation.top_k=5"])
    text = to_yaml(cfg)
    again = tmp_path / "again.yaml"
    again.write_text(text)
    cfg2 = load_config(again)
    assert cfg2 == cfg
    assert to_yaml(cfg2) == text


def test_overrides_parse_yaml_values(base_yaml):
    cfg = load_config(base_yaml, ["--ppo.kl_target", "6", "--ppo.score_clip=null",
                                  "--ppo.whiten_advantages", "false", "--actor.lr", "2e-6"])
    assert cfg.ppo.kl_target == 6.0 and isinstance(cfg.ppo.kl_target, float)
    assert cfg.ppo.score_clip is None and cfg.ppo.whiten_advantages is False
    assert cfg.actor.lr == 2e-6
    assert parse_overrides(["--a.b=[1, 2]"]) == {"a.b": [1, 2]}


def test_defaults_follow_the_spec():
    p = PPORunConfig().ppo
    assert (p.kl_coef, p.kl_estimator, p.clip_eps, p.value_clip_eps) == (0.05, "k1", 0.2, 0.2)
    assert (p.gamma, p.lam, p.whiten_advantages, p.ppo_epochs, p.num_minibatches) == (
        1.0, 0.95, True, 1, 1)
    assert (p.rollout_correction, p.rollout_is_cap) == ("none", 2.0)


@pytest.mark.parametrize("override, field", [
    (["--ppo.kl_cof", "0.1"], "ppo.kl_cof"),  # unknown key
    (["--actor.zero_stage", "two"], "actor.zero_stage"),  # wrong type
    (["--ppo.whiten_advantages", "1"], "ppo.whiten_advantages"),  # int is not a bool
    (["--actor.dtype", "fp8"], "actor.dtype"),  # not one of the choices
    (["--generation.temperature", "0"], "generation.temperature"),  # impossible value
    (["--generation.top_p", "1.5"], "generation.top_p"),
    (["--actor.zero_stage", "4"], "actor.zero_stage"),
    (["--ref.zero_stage", "2"], "ref.zero_stage"),  # frozen: only 0 or 3 make sense
    (["--critic.offload_params", "true"], "critic.offload_params"),  # needs ZeRO-3
    (["--actor.lr", "-1"], "actor.lr"),
    (["--data.datasets", "[]"], "data.datasets"),
    (["--reward.micro_batch_tokens", "-1"], "reward.micro_batch_tokens"),
    # the adaptive controller multiplies kl_coef: from 0 it would stay 0
    (["--ppo.kl_coef", "0", "--ppo.kl_target", "6"], "ppo.kl_coef"),
    (["--ppo.max_untrained_steps", "-1"], "ppo.max_untrained_steps"),
    (["--ppo.rollout_correction", "is"], "ppo.rollout_correction"),  # none or tis
    (["--ppo.rollout_is_cap", "0"], "ppo.rollout_is_cap"),
    (["--ppo.rollout_is_cap", "inf"], "ppo.rollout_is_cap"),
])
def test_bad_input_names_the_field(base_yaml, override, field):
    with pytest.raises(ConfigError) as e:
        load_config(base_yaml, override)
    assert field in str(e.value)


def test_unknown_key_suggests_the_right_one(base_yaml):
    with pytest.raises(ConfigError, match="did you mean 'kl_coef'"):
        load_config(base_yaml, ["--ppo.kl_cof", "0.1"])


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_derived_sizes(base_yaml):
    cfg = load_config(base_yaml)
    s = derive_sizes(cfg, world_size=2)
    # 16 prompts / 2 ranks = 8 per rank; 2 minibatches of 4; micro-batches of 2 -> accum 2.
    assert (s.rollout_per_rank, s.minibatch_per_rank, s.actor_grad_accum) == (8, 4, 2)


def test_derived_sizes_count_rows_of_n_samples(base_yaml):
    cfg = load_config(base_yaml, ["--generation.n_samples_per_prompt", "3",
                                  "--ppo.num_minibatches", "4"])
    s = derive_sizes(cfg, world_size=2)
    # 16 prompts / 2 ranks = 8 prompts x 3 samples = 24 rows; 4 minibatches of 6; accum 3.
    assert (s.rollout_per_rank, s.rows_per_rank, s.minibatch_per_rank) == (8, 24, 6)
    assert (s.actor_grad_accum, s.critic_grad_accum) == (3, 3)
    with pytest.raises(ConfigError, match="generation.n_samples_per_prompt"):
        derive_sizes(load_config(base_yaml, ["--generation.n_samples_per_prompt", "3",
                                             "--ppo.num_minibatches", "5"]), world_size=2)


def test_critic_free_estimators_need_no_critic_and_groups(base_yaml):
    grpo = ["--ppo.advantage_estimator", "grpo", "--ppo.kl_coef", "0",
            "--generation.n_samples_per_prompt", "4"]
    cfg = load_config(base_yaml, [*grpo, "--critic.model.path", "null"])  # no critic needed
    assert not cfg.ppo.uses_critic and not cfg.ppo.uses_reference
    # critic.micro_batch_size 3 does not divide the minibatch, but no critic is built
    assert derive_sizes(load_config(base_yaml, [*grpo, "--critic.micro_batch_size", "3"]),
                        2).critic_grad_accum == 1
    assert load_config(base_yaml, [*grpo, "--ppo.kl_loss_coef", "0.1"]).ppo.uses_reference
    gae = load_config(base_yaml, ["--ppo.kl_coef", "0", "--ppo.kl_loss_coef", "0"]).ppo
    assert gae.uses_critic and not gae.uses_reference  # no KL term: no reference either


@pytest.mark.parametrize("override, message", [
    (["--ppo.advantage_estimator", "rloo"], "generation.n_samples_per_prompt: .*rloo compares "
     "the samples of a prompt; set generation.n_samples_per_prompt to 2 or more"),
    (["--ppo.advantage_estimator", "grpo", "--generation.n_samples_per_prompt", "2"],
     "ppo.kl_coef: grpo puts no KL penalty in the reward; set ppo.kl_coef: 0"),
    (["--ppo.advantage_estimator", "reinforce_pp", "--checkpoint.export_critic", "true"],
     "checkpoint.export_critic: .*reinforce_pp trains no critic"),
    (["--generation.n_samples_per_prompt", "0"], "generation.n_samples_per_prompt: must be"),
    (["--ppo.kl_loss_coef", "-1"], "ppo.kl_loss_coef: must be >= 0"),
    (["--ppo.clip_eps_high", "0"], "ppo.clip_eps_high: must be > 0"),
    (["--ppo.loss_agg", "sum"], "ppo.loss_agg: 'sum' is not allowed"),
    (["--critic.model.path", "null"], "critic.model: no weights given"),  # gae needs one
    (["--ppo.kl_target", "6", "--ppo.kl_coef", "0"], "ppo.kl_target: the adaptive controller"),
])
def test_critic_free_config_errors(base_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(base_yaml, override)


SEPARATE = ["--rollout.placement", "separate", "--rollout.generation_ranks", "1"]


@pytest.mark.parametrize("override, message", [
    (["--rollout.generation_ranks", "1"], "rollout.generation_ranks: is the generation pool's "
     "size, for rollout.placement: separate; set that or remove it"),
    (["--rollout.placement", "separate"], "rollout.generation_ranks: must be at least 1"),
    ([*SEPARATE, "--generation.backend", "vllm", "--generation.vllm.tensor_parallel_size", "2"],
     r"generation.vllm.tensor_parallel_size: 2 does not divide rollout.generation_ranks \(1\)"),
    ([*SEPARATE, "--rollout.weight_bucket_mb", "0"], "rollout.weight_bucket_mb: must be > 0"),
    ([*SEPARATE, "--rollout.environment", "env.py:Echo"], "rollout.placement: separate does "
     "not run multi-turn episodes"),
])
def test_placement_config_errors(base_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(base_yaml, override)


@pytest.mark.parametrize("world, pool, rank, index", [(3, 1, 2, 0), (3, 1, 1, None),
                                                      (4, 2, 2, 0), (4, 2, 3, 1)])
def test_the_last_generation_ranks_of_the_launch_are_the_pool(monkeypatch, world, pool, rank,
                                                               index):
    """split_world: the training ranks' world is the first W - G ranks (WORLD_SIZE), the
    last G ranks are the pool; a pool as large as the launch is refused."""
    from ds_rlhf.coordinator import LAUNCH_WORLD, pool_index, split_world

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.delenv(LAUNCH_WORLD, raising=False)
    assert split_world("separate", pool) == index == pool_index()
    assert os.environ["WORLD_SIZE"] == str(world - pool)
    assert split_world("separate", pool) == index  # idempotent: the runs of one launch
    if index is None:  # a run of the training ranks alone (bench's colocated variants)
        assert split_world("colocated", 0) is None
    else:
        with pytest.raises(ConfigError, match="colocated, in a launch whose last ranks"):
            split_world("colocated", 0)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv(LAUNCH_WORLD)
    with pytest.raises(ConfigError, match=f"rollout.generation_ranks: {world} leaves no "
                       f"training rank of the {world} ranks launched"):
        split_world("separate", world)
    monkeypatch.delenv(LAUNCH_WORLD, raising=False)


@pytest.mark.parametrize("world_size, override, field", [
    (3, [], "ppo.rollout_batch_size"),  # 16 prompts do not split over 3 ranks
    (2, ["--ppo.num_minibatches", "3"], "ppo.num_minibatches"),  # 8 per rank, 3 minibatches
    (2, ["--critic.micro_batch_size", "3"], "critic.micro_batch_size"),  # minibatch of 4
])
def test_batch_arithmetic_errors_name_the_field(base_yaml, world_size, override, field):
    cfg = load_config(base_yaml, override)
    with pytest.raises(ConfigError) as e:
        derive_sizes(cfg, world_size)
    assert field in str(e.value)


def test_token_micro_batches_need_room_for_the_longest_sequence(base_yaml):
    # Defaults: data.max_prompt_len 256 + generation.max_new_tokens 128 = 384 tokens.
    with pytest.raises(ConfigError, match="critic.micro_batch_tokens: 383 cannot hold one "
                       "sequence .* raise it to at least 384"):
        load_config(base_yaml, ["--critic.micro_batch_tokens", "383"])
    cfg = load_config(base_yaml, ["--critic.micro_batch_tokens", "384",
                                  "--critic.micro_batch_size", "3"])
    s = derive_sizes(cfg, world_size=2)  # micro_batch_size 3 is unused: no divisibility error
    # The number of packed micro-batches varies per step; DeepSpeed accumulates over them
    # with explicit boundaries, so its own accumulation count is 1.
    assert (s.actor_grad_accum, s.critic_grad_accum) == (2, 1)


def test_supervised_steps_refuse_token_micro_batches():
    with pytest.raises(ConfigError, match="model.micro_batch_tokens: `ds-rlhf sft` batches by "
                       "rows; unset it and use model.micro_batch_size"):
        load_config(None, {"model.model.path": "/models/base", "model.micro_batch_tokens": 512,
                           "data.datasets": [{"path": "sft.jsonl"}]}, cls=SFTRunConfig)


def test_deepspeed_config_agrees_with_run_config(base_yaml):
    cfg = load_config(base_yaml, ["--actor.zero_stage", "3", "--actor.dtype", "bf16",
                                  "--actor.offload_optimizer", "true"])
    s = derive_sizes(cfg, world_size=2)
    ds = deepspeed_config(cfg.actor, cfg.actor.micro_batch_size, s.actor_grad_accum, 2,
                          on_cpu=False)
    assert ds["train_batch_size"] == 2 * 2 * 2  # micro 2 x accum 2 x 2 ranks
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == cfg.actor.lr
    frozen = deepspeed_config(cfg.reward, 4, 1, 2, on_cpu=True)
    assert "optimizer" not in frozen and frozen["zero_optimization"]["stage"] == 3
    z2 = deepspeed_config(cfg.critic, 2, 2, 2, on_cpu=True)
    assert not any(k.startswith("stage3_") for k in z2["zero_optimization"])


@pytest.mark.parametrize("ppo, taken", [
    ({"advantage_estimator": "grpo", "kl_coef": 0.0}, True),  # one step, no KL in the reward
    ({"advantage_estimator": "grpo", "kl_coef": 0.0, "kl_loss_coef": 0.1}, True),  # in the loss
    ({"kl_coef": 0.0}, True),  # gae without the KL penalty
    ({"kl_coef": 0.05}, False),  # the KL penalty reads them before training
    ({"advantage_estimator": "grpo", "kl_coef": 0.0, "num_minibatches": 2}, False),
    ({"advantage_estimator": "grpo", "kl_coef": 0.0, "ppo_epochs": 2}, False),
    ({"advantage_estimator": "grpo", "kl_coef": 0.0, "on_policy_shortcut": False}, False),
])
def test_on_policy_shortcut_only_for_one_step_without_kl_in_the_reward(base_yaml, ppo, taken):
    cfg = load_config(base_yaml, {"ppo": ppo, "generation": {"n_samples_per_prompt": 2}})
    assert cfg.ppo.takes_on_policy_shortcut is taken


def test_zero3_templates_keep_small_parameters_whole(base_yaml):
    cfg = load_config(base_yaml, ["--actor.zero_stage", "3"])
    actor = deepspeed_config(cfg.actor, 2, 1, 2, on_cpu=True)["zero_optimization"]
    frozen = deepspeed_config(cfg.reward, 4, 1, 2, on_cpu=True)["zero_optimization"]
    assert actor["stage3_param_persistence_threshold"] == 2**20 == \
        frozen["stage3_param_persistence_threshold"]
    assert frozen["memory_efficient_linear"] is False  # never trains: torch's own linear
