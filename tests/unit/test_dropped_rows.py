"""Rows dropped for a NaN/inf reward score (PPOTrainer.drop_rows) leave the update completely:
no part in their group's statistics, in the seq_mean_* loss normalisers or in the reward
metrics. The trainer's own methods on a real one-process gloo Coordinator, no engines."""

from __future__ import annotations

import math

import pytest
import torch

from ds_rlhf.algo import FixedKLController, group_advantages
from ds_rlhf.config import PPORunConfig
from ds_rlhf.errors import FailedRowsError
from ds_rlhf.rewards import reward_metrics
from ds_rlhf.rollout import Rollout, RowFailure
from ds_rlhf.tracking import Timer
from ds_rlhf.trainers.ppo import PPOTrainer

NAN, INF = math.nan, math.inf
# Two groups of 4 samples; the group [1, 1, NaN, 1], then one with an inf.
SCORES = [1.0, 1.0, NAN, 1.0, 0.0, INF, 3.0, 6.0]
LENGTHS = [3, 1, 2, 3, 2, 3, 1, 2]  # response tokens of each row (width 3)


class RecordingActor:
    """Stands in for the actor engine: records the LossScale of each optimizer minibatch."""

    def __init__(self):
        self.scales = []

    def train_step(self, minibatch, scale):
        self.scales.append(scale)
        return {"optimizer_steps": 1.0}


def _trainer(coord, estimator: str, loss_agg: str = "token_mean") -> PPOTrainer:
    cfg = PPORunConfig()
    cfg.ppo.advantage_estimator, cfg.ppo.loss_agg = estimator, loss_agg
    cfg.ppo.rollout_batch_size, cfg.generation.n_samples_per_prompt = 2, 4
    cfg.generation.max_new_tokens = 3
    return PPOTrainer(cfg=cfg, sizes=None, coord=coord, tokenizer=None, prompts=None,
                      sampler=None, actor=RecordingActor(), critic=None, ref=None, reward=None,
                      rewards=None, kl_ctl=FixedKLController(0.0), tracker=None, preempted=None)


def _rollout() -> Rollout:
    n = len(LENGTHS)
    mask = (torch.arange(3)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    rollout = Rollout(prompt_ids=torch.ones(n, 2, dtype=torch.long),
                      prompt_mask=torch.ones(n, 2, dtype=torch.long),
                      response_ids=torch.ones(n, 3, dtype=torch.long), response_mask=mask,
                      prompt_index=torch.arange(n) // 4, sample_index=torch.arange(n) % 4)
    rollout.old_logprobs = torch.zeros(n, 3)
    rollout.scores = torch.tensor(SCORES)
    return rollout


def _dropped(trainer: PPOTrainer) -> Rollout:
    rollout = _rollout()
    assert trainer.drop_rows(~torch.isfinite(rollout.scores), rollout) == 2
    return rollout


@pytest.mark.parametrize("estimator, group_1", [
    # group 1 after its inf row is dropped: valid scores 0, 3, 6, mean 3, std 3 (see
    # test_algo.py::test_group_advantages_dropped_rows_take_no_part_in_their_group)
    ("grpo", [-3 / (3 + 1e-6), 0.0, 0.0, 3 / (3 + 1e-6)]),
    ("dr_grpo", [-3.0, 0.0, 0.0, 3.0]),
    ("rloo", [-4.5, 0.0, 0.0, 4.5]),  # 0 - (3 + 6) / 2, 3 - (0 + 6) / 2, 6 - (0 + 3) / 2
])
def test_group_estimators_use_surviving_rows_only(coord, estimator, group_1):
    trainer = _trainer(coord, estimator)
    rollout = _dropped(trainer)
    trainer.advantages(rollout)
    mask = rollout.response_mask.bool()
    # the same advantage on every real token of a row, 0 on padding and on dropped rows
    per_row = rollout.advantages[:, 0]  # every row keeps token 0, unless dropped
    assert torch.equal(rollout.advantages, torch.where(mask, per_row[:, None], 0.0))
    # group 0: survivors all scored 1 -> 0 (counting the dropped row as a 0 gave
    # [0.5, 0.5, -1.5, 0.5] under grpo)
    assert per_row[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(per_row[4:], torch.tensor(group_1))


def test_reinforce_pp_baseline_uses_surviving_rows_only(coord):
    trainer = _trainer(coord, "reinforce_pp_baseline")
    rollout = _dropped(trainer)
    trainer.advantages(rollout)
    # kl_coef 0: the only reward is score - mean of the group's valid scores, on the last
    # token: group 0: 1 - 1 = 0 (not 1 - 0.75); group 1: 0 - 3, dropped, 3 - 3, 6 - 3
    last = torch.tensor(LENGTHS) - 1
    assert rollout.rewards.gather(1, last[:, None]).squeeze(1).tolist() == [
        0.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0, 3.0]
    assert rollout.rewards.abs().sum() == 6.0  # nothing anywhere else


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_seq_mean_normalisers_do_not_count_dropped_rows(coord, loss_agg):
    trainer = _trainer(coord, "grpo", loss_agg)
    rollout = _dropped(trainer)
    trainer.advantages(rollout)
    trainer.update(rollout, step=1, timer=Timer())
    (scale,) = trainer.actor.scales  # one epoch, one minibatch of the 8 rows
    # 6 rows left with 3 + 1 + 3 + 2 + 1 + 2 = 12 tokens (8 rows would scale the loss by 6/8)
    assert (scale.num_sequences, scale.num_tokens) == (6, 12.0)
    if loss_agg == "seq_mean_token_sum_norm":  # rows x max_new_tokens = 6 x 3
        assert float(scale.denominators(rollout.response_mask)) == 18.0


def test_reward_metrics_skip_dropped_rows(coord):
    rollout = _rollout()
    valid = torch.isfinite(rollout.scores)
    per_reward = {"rm": rollout.scores.clone(), "len": torch.tensor(LENGTHS).float()}
    scores = torch.where(valid, rollout.scores, 0.0)  # as drop_rows leaves them
    m = reward_metrics(per_reward, scores, 4, coord, valid)
    # rm over the 6 valid rows: (1 + 1 + 1 + 0 + 3 + 6) / 6 = 2; len: (3+1+3+2+1+2) / 6 = 2
    # group 0's valid scores are all 1 (equal), group 1's 0, 3, 6 are not: 1 of 2 groups
    assert m == {"rewards/rm/mean": 2.0, "rewards/len/mean": 2.0,
                 "rewards/all_equal_groups": 0.5}
    # a group with one valid row teaches nothing either: counted as all equal
    one_left = torch.tensor([True, False, False, False] + [True] * 4)
    m = reward_metrics(per_reward, scores, 4, None, one_left & valid)
    assert m["rewards/all_equal_groups"] == 0.5


# Rows whose episode or reward call failed (issue 27, item 8) take the same way out.
def _failure(source: str, i: int) -> RowFailure:
    return RowFailure(source, f"{source} kind", f"the row of prompt index {i}")


def test_failed_rows_leave_their_group_like_a_group_without_them(coord, capsys):
    """Group 0 loses row 2 to a failed episode and group 1 row 5 to a failed reward call:
    each sibling's advantage equals that of the same group without the failed row, computed
    on its own (the scores of the failed rows, finite here, must not count)."""
    trainer = _trainer(coord, "grpo")
    trainer.cfg.rollout.max_failed_fraction = 0.25
    rollout = _rollout()
    rollout.scores = torch.tensor([1.0, 2.0, 100.0, 4.0, 0.0, -50.0, 3.0, 6.0])
    failures = [None, None, _failure("episode", 0), None, None, _failure("reward", 1), None,
                None]
    assert trainer.drop_failed_rows(failures, rollout) == {"episode": 1, "reward": 1}
    trainer.advantages(rollout)
    per_row = rollout.advantages[:, 0]
    assert per_row[2] == 0.0 and per_row[5] == 0.0 and rollout.response_mask[[2, 5]].sum() == 0
    for rows in ([0, 1, 3], [4, 6, 7]):  # the survivors of group 0, of group 1
        alone = group_advantages(rollout.scores[rows], len(rows), "grpo")
        torch.testing.assert_close(per_row[rows], alone)
    out = capsys.readouterr().out  # each kind printed once, with its count and first row
    assert out.count("rows failed") == 2
    assert "1 of 8 rows failed: episode kind (first the row of prompt index 0)" in out
    trainer.drop_failed_rows(failures, _rollout())  # the same kinds again: not printed
    assert capsys.readouterr().out == ""


def test_more_failed_rows_than_max_failed_fraction_stop_the_run(coord):
    trainer = _trainer(coord, "grpo")
    trainer.cfg.rollout.max_failed_fraction = 0.25  # 2 of 8 may fail, not 3
    failures = [_failure("episode", 0), None, _failure("episode", 0), None, None,
                _failure("reward", 1), None, None]
    with pytest.raises(FailedRowsError) as e:
        trainer.drop_failed_rows(failures, _rollout())
    assert str(e.value).startswith(
        "3 of 8 rows failed at PPO step 0, more than rollout.max_failed_fraction (0.25): "
        "episode kind (2 rows, first the row of prompt index 0); reward kind (1 row, first "
        "the row of prompt index 1). The last checkpoint is intact")
    assert FailedRowsError.every_rank
