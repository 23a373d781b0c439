"""ds_rlhf.algo against hand-computed numbers (arithmetic in comments) and loop references."""

import ast
import math
from pathlib import Path

import pytest
import torch

from ds_rlhf import algo
from ds_rlhf.algo import (
    AdaptiveKLController,
    FixedKLController,
    discounted_returns,
    gae,
    group_advantages,
    kl_loss,
    kl_per_token,
    logprobs_from_logits,
    loss_normalizer,
    masked_mean,
    masked_whiten,
    policy_loss,
    rollout_is_weights,
    shaped_rewards,
    value_loss,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


def ragged_mask(lengths, width):
    """Prefix masks: row i has lengths[i] real tokens."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------- module hygiene


def test_algo_imports_no_deepspeed_dist_or_transformers():
    tree = ast.parse(Path(algo.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    for name in imported:
        assert not name.startswith(("deepspeed", "torch.distributed", "transformers")), name


# ---------------------------------------------------------------- masked_mean / masked_whiten


def test_masked_mean_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # all: (1 + 2 + 4) / 3 = 7/3
    assert_close(masked_mean(x, mask), 7 / 3)
    # per row: (1 + 2) / 2 = 1.5 ; 4 / 1 = 4
    assert_close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    # per column: (1 + 4) / 2 = 2.5 ; 2 / 1 = 2 ; nothing -> 0
    assert_close(masked_mean(x, mask, dim=0), [2.5, 2.0, 0.0])


def test_masked_mean_ignores_garbage_and_empty_mask_is_zero():
    x = t([[1.0, float("nan")], [float("inf"), 3.0]])
    mask = t([[1, 0], [0, 1]])
    assert_close(masked_mean(x, mask), 2.0)  # (1 + 3) / 2
    assert_close(masked_mean(x, torch.zeros(2, 2)), 0.0)


def test_masked_whiten_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # masked entries 1, 2, 3, 4: mean 2.5, deviations -1.5 -0.5 0.5 1.5,
    # squares sum 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased var = 5 / 3, std = sqrt(5/3)
    std = math.sqrt(5 / 3)
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]]
    assert_close(masked_whiten(x, mask), expected)
    # shift_mean=False adds the mean (2.5) back on masked entries; padding stays 0
    expected_shifted = [
        [2.5 - 1.5 / std, 2.5 - 0.5 / std, 2.5 + 0.5 / std],
        [2.5 + 1.5 / std, 0.0, 0.0],
    ]
    assert_close(masked_whiten(x, mask, shift_mean=False), expected_shifted)


def test_masked_whiten_statistics_on_random_data():
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(6, 9, generator=gen)
    mask = ragged_mask([9, 0, 4, 1, 7, 3], 9)
    out = masked_whiten(x, mask)
    real = out[mask.bool()]
    assert abs(real.mean().item()) < 1e-5
    assert abs(real.var(unbiased=True).item() - 1.0) < 1e-5
    assert torch.all(out[~mask.bool()] == 0)
    shifted = masked_whiten(x, mask, shift_mean=False)
    assert abs(shifted[mask.bool()].mean().item() - x[mask.bool()].mean().item()) < 1e-4
    assert torch.all(shifted[~mask.bool()] == 0)


def test_masked_whiten_degenerate_masks_give_no_nan():
    x = t([[5.0, 7.0]])
    assert_close(masked_whiten(x, t([[0, 0]])), [[0.0, 0.0]])
    assert_close(masked_whiten(x, t([[1, 0]])), [[0.0, 0.0]])  # one entry: var taken as 0


# ---------------------------------------------------------------- KL estimators

LOGPROBS = t([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
REF_LOGPROBS = t([[-1.5, -1.0, -0.5], [-0.1, -2.0, -2.0]])


def test_kl_k1_by_hand():
    # logprobs - ref_logprobs
    assert_close(kl_per_token(LOGPROBS, REF_LOGPROBS, "k1"), [[0.5, -1.0, 0.0], [0.0, -1.0, 1.0]])
    assert_close(kl_per_token(LOGPROBS, REF_LOGPROBS), [[0.5, -1.0, 0.0], [0.0, -1.0, 1.0]])


def test_kl_k2_by_hand():
    # 0.5 * k1 ** 2: 0.5 * 0.25 = 0.125, 0.5 * 1 = 0.5
    assert_close(kl_per_token(LOGPROBS, REF_LOGPROBS, "k2"), [[0.125, 0.5, 0.0], [0.0, 0.5, 0.5]])


def test_kl_k3_by_hand():
    # log r = ref - logprobs = [[-0.5, 1, 0], [0, 1, -1]]; k3 = exp(log r) - log r - 1
    # exp(-0.5) + 0.5 - 1 = 0.6065307 - 0.5 = 0.1065307
    # exp(1) - 1 - 1 = 0.7182818 ; exp(-1) + 1 - 1 = 0.3678794 ; exp(0) - 0 - 1 = 0
    expected = [[0.1065307, 0.7182818, 0.0], [0.0, 0.7182818, 0.3678794]]
    assert_close(kl_per_token(LOGPROBS, REF_LOGPROBS, "k3"), expected)


def test_kl_unknown_estimator_names_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(LOGPROBS, REF_LOGPROBS, "k4")


def test_kl_computes_in_float32_from_bf16():
    out = kl_per_token(LOGPROBS.bfloat16(), REF_LOGPROBS.bfloat16(), "k3")
    assert out.dtype == torch.float32


# ---------------------------------------------------------------- shaped_rewards


def test_shaped_rewards_by_hand():
    scores = t([2.0, -1.0])
    mask = t([[1, 1, 0], [1, 1, 1]])  # row 0 ends with EOS at t=1; row 1 fills the length
    rewards, kl = shaped_rewards(scores, LOGPROBS, REF_LOGPROBS, mask, kl_coef=0.1)
    # kl = k1 * mask = [[0.5, -1, 0 (pad)], [0, -1, 1]]
    assert_close(kl, [[0.5, -1.0, 0.0], [0.0, -1.0, 1.0]])
    # -0.1 * kl = [[-0.05, 0.1, 0], [0, 0.1, -0.1]]
    # score on the last real token: row 0 t=1: 0.1 + 2 = 2.1 ; row 1 t=2: -0.1 - 1 = -1.1
    assert_close(rewards, [[-0.05, 2.1, 0.0], [0.0, 0.1, -1.1]])


def test_shaped_rewards_k2_estimator_by_hand():
    scores = t([0.0, 0.0])
    mask = t([[1, 1, 1], [1, 1, 1]])
    rewards, kl = shaped_rewards(scores, LOGPROBS, REF_LOGPROBS, mask, 0.5, kl_estimator="k2")
    # k2 = [[0.125, 0.5, 0], [0, 0.5, 0.5]] ; rewards = -0.5 * k2
    assert_close(kl, [[0.125, 0.5, 0.0], [0.0, 0.5, 0.5]])
    assert_close(rewards, [[-0.0625, -0.25, 0.0], [0.0, -0.25, -0.25]])


def test_shaped_rewards_score_position_on_ragged_masks():
    gen = torch.Generator().manual_seed(1)
    lengths = [4, 0, 1, 6, 3]  # 6 = full row (hit the length limit), 0 = empty response
    width = 6
    mask = ragged_mask(lengths, width)
    scores = torch.randn(5, generator=gen) + 10.0
    zeros = torch.zeros(5, width)
    # kl_coef = 0 isolates the score
    rewards, _ = shaped_rewards(scores, zeros, zeros, mask, kl_coef=0.0)
    for i, length in enumerate(lengths):
        expected = torch.zeros(width)
        if length > 0:
            expected[length - 1] = scores[i]
        assert_close(rewards[i], expected)


def test_shaped_rewards_nothing_lands_on_padding():
    mask = t([[1, 0, 0], [0, 0, 0]])
    # padding holds garbage: ref - logprobs = 100 at the pads overflows k3's exp
    logprobs = t([[-1.0, -100.0, -100.0], [-100.0, -100.0, -100.0]])
    ref_logprobs = t([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rewards, kl = shaped_rewards(t([3.0, 5.0]), logprobs, ref_logprobs, mask, 0.1, "k3")
    # row 0: only t=0 is real, kl there is 0, score 3 lands there; row 1 (all pad) gets nothing
    assert_close(kl, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(rewards, [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


# ---------------------------------------------------------------- gae


def gae_reference(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one episode per row ending after lengths[i] tokens, in plain python."""
    batch, width = len(rewards), len(rewards[0])
    advantages = [[0.0] * width for _ in range(batch)]
    returns = [[0.0] * width for _ in range(batch)]
    for i in range(batch):
        last = 0.0
        for step in reversed(range(lengths[i])):
            next_value = values[i][step + 1] if step + 1 < lengths[i] else 0.0
            delta = rewards[i][step] + gamma * next_value - values[i][step]
            last = delta + gamma * lam * last
            advantages[i][step] = last
            returns[i][step] = last + values[i][step]
    return advantages, returns


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # row 1's t=2 is padding: its reward 7 and value 9 must not matter
    rewards = t([[0.0, 0.0, 1.0], [0.1, 0.2, 7.0]])
    values = t([[0.5, 0.4, 0.3], [1.0, 2.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 0: delta2 = 1 - 0.3 = 0.7 (episode ends, V3 = 0)     A2 = 0.7
    #        delta1 = 0 + 0.9 * 0.3 - 0.4 = -0.13             A1 = -0.13 + 0.72 * 0.7 = 0.374
    #        delta0 = 0 + 0.9 * 0.4 - 0.5 = -0.14             A0 = -0.14 + 0.72 * 0.374 = 0.12928
    # row 1: delta1 = 0.2 + 0 - 2.0 = -1.8 (V2 is padding)    A1 = -1.8
    #        delta0 = 0.1 + 0.9 * 2.0 - 1.0 = 0.9             A0 = 0.9 + 0.72 * -1.8 = -0.396
    assert_close(advantages, [[0.12928, 0.374, 0.7], [-0.396, -1.8, 0.0]])
    # returns = A + V: 0.62928, 0.774, 1.0 ; 0.604, 0.2, 0 (pad)
    assert_close(returns, [[0.62928, 0.774, 1.0], [0.604, 0.2, 0.0]])


def random_ragged(seed, width=7):
    """(generator, lengths, mask, rewards) of 6 rows: always an empty row and a full row, the
    rest random."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [0, width] + torch.randint(0, width + 1, (4,), generator=gen).tolist()
    return gen, lengths, ragged_mask(lengths, width), torch.randn(6, width, generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gae_matches_python_loop_on_ragged_masks(seed):
    gen, lengths, mask, rewards = random_ragged(seed)
    width = mask.shape[1]
    values = torch.randn(6, width, generator=gen)
    gamma, lam = [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)][seed]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = gae_reference(
        rewards.tolist(), values.tolist(), lengths, gamma, lam
    )
    assert_close(advantages, expected_adv, atol=1e-5)
    assert_close(returns, expected_ret, atol=1e-5)


def test_gae_outputs_carry_no_gradient():
    values = torch.randn(2, 3, requires_grad=True)
    rewards = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae(rewards, values, torch.ones(2, 3), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- policy_loss


def test_policy_loss_ratio_is_exactly_one_when_logprobs_equal_old():
    gen = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(4, 5, generator=gen) * 5
    logprobs = old_logprobs.clone().requires_grad_(True)
    advantages = torch.randn(4, 5, generator=gen)
    mask = ragged_mask([5, 2, 0, 4], 5)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    assert stats["ratio"] == 1.0
    assert stats["clipfrac"] == 0.0
    assert stats["approx_kl"] == 0.0
    # ratio 1: loss = -masked mean of advantages
    assert_close(loss, -advantages[mask.bool()].mean())
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_clipping_by_hand():
    ratios = t([[1.5, 0.5, 1.1], [0.7, 1.3, 2.0]])
    old_logprobs = torch.zeros(2, 3)
    logprobs = ratios.log().requires_grad_(True)
    advantages = t([[1.0, 1.0, -1.0], [-1.0, -1.0, 2.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # token   ratio  A   -A*ratio  -A*clamp(ratio, 0.8, 1.2)  max
    # (0,0)   1.5    1   -1.5      -1.2                        -1.2  clipped  (A > 0, too high)
    # (0,1)   0.5    1   -0.5      -0.8                        -0.5  unclipped
    # (0,2)   1.1   -1    1.1       1.1                         1.1  in range
    # (1,0)   0.7   -1    0.7       0.8                         0.8  clipped  (A < 0, too low)
    # (1,1)   1.3   -1    1.3       1.2                         1.3  unclipped
    # (1,2)   padding
    # loss = (-1.2 - 0.5 + 1.1 + 0.8 + 1.3) / 5 = 1.5 / 5 = 0.3
    assert_close(loss, 0.3)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    assert stats["ratio"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.3) / 5)
    logs = [math.log(r) for r in (1.5, 0.5, 1.1, 0.7, 1.3)]
    assert stats["approx_kl"] == pytest.approx(sum(0.5 * x * x for x in logs) / 5)
    # d loss / d logprob = -A * ratio / 5 on unclipped tokens, 0 where the clip is active:
    # (0,1): -0.5 / 5 = -0.1 ; (0,2): 1.1 / 5 = 0.22 ; (1,1): 1.3 / 5 = 0.26
    loss.backward()
    assert_close(logprobs.grad, [[0.0, -0.1, 0.22], [0.0, 0.26, 0.0]])
    # an explicit num_tokens replaces the count: 1.5 / 10
    loss10, _ = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, num_tokens=10)
    assert_close(loss10, 0.15)


def test_policy_loss_padding_with_huge_log_ratio_gives_no_nan():
    logprobs = t([[0.0, 500.0]]).requires_grad_(True)  # exp(500) = inf at the pad
    loss, stats = policy_loss(logprobs, torch.zeros(1, 2), t([[1.0, 0.0]]), t([[1, 0]]), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert math.isfinite(stats["ratio"])


def test_losses_reject_non_positive_num_tokens():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(x, x, x, torch.ones(1, 2), 0.2, num_tokens=0)
    with pytest.raises(ValueError, match="num_tokens"):
        value_loss(x, x, x, torch.ones(1, 2), 0.2, num_tokens=0)


# ---------------------------------------------------------------- rollout_is_weights (TIS)


def test_rollout_is_weights_by_hand_with_cap_and_garbage_on_padding():
    old = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 9.0]])
    sampler = t([[-1.0, -2.5, -2.0], [-0.5, -1.0, math.nan]])  # (1, 2) is padding
    mask = t([[1, 1, 1], [1, 1, 0]])
    # old - sampler:  0     0.5        1.5        |  0.2        -0.2        pad
    # exp:            1     1.6487213  4.4816891  |  1.2214028  0.8187308   -
    # min(., cap 2):  1     1.6487213  2 (capped) |  1.2214028  0.8187308   0
    weights, stats = rollout_is_weights(old.requires_grad_(True), sampler, mask, cap=2.0)
    assert_close(weights, [[1.0, 1.6487213, 2.0], [1.2214028, 0.8187308, 0.0]])
    assert not weights.requires_grad
    # |old - sampler| over 5 tokens: (0 + 0.5 + 1.5 + 0.2 + 0.2) / 5 = 0.48
    assert stats["logprob_abs_diff"] == pytest.approx(0.48)
    assert stats["capped_frac"] == pytest.approx(1 / 5)
    # k1 of KL(sampler || trainer) per row, sum of sampler - old: row 0: 0 - 0.5 - 1.5 = -2;
    # row 1: 0.2 - 0.2 = 0 -> mean over rows -1
    assert stats["mismatch_kl"] == pytest.approx(-1.0)
    # a cap above every ratio cuts nothing
    weights5, stats5 = rollout_is_weights(old, sampler, mask, cap=5.0)
    assert_close(weights5[0, 2], 4.4816891)
    assert stats5["capped_frac"] == 0.0


def test_rollout_is_weights_equal_logprobs_give_one_and_empty_rows_count_for_nothing():
    logprobs = t([[-0.7, -1.9, -3.0], [-0.1, -2.2, -0.4]])
    mask = t([[1, 1, 0], [0, 0, 0]])  # row 1 has no real token (e.g. dropped)
    weights, stats = rollout_is_weights(logprobs, logprobs.clone(), mask)
    assert torch.equal(weights, t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert stats == {"logprob_abs_diff": 0.0, "capped_frac": 0.0, "mismatch_kl": 0.0}
    # the KL averages over rows with tokens: row 0 alone, sampler - old = 0.5 + 0.5 = 1
    _, stats = rollout_is_weights(logprobs, logprobs + 0.5, mask)
    assert stats["mismatch_kl"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cap"):
        rollout_is_weights(logprobs, logprobs, mask, cap=0.0)


def test_policy_loss_is_weights_of_one_change_nothing():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(2, 3, generator=gen) * 3
    sampler = old.clone()
    logprobs = (old + 0.3 * torch.randn(2, 3, generator=gen)).requires_grad_(True)
    advantages, mask = torch.randn(2, 3, generator=gen), t([[1, 1, 1], [1, 0, 0]])
    weights, _ = rollout_is_weights(old, sampler, mask)
    plain, plain_stats = policy_loss(logprobs, old, advantages, mask, 0.2)
    (plain_grad,) = torch.autograd.grad(plain, logprobs)
    weighted, weighted_stats = policy_loss(logprobs, old, advantages, mask, 0.2,
                                           is_weights=weights)
    (weighted_grad,) = torch.autograd.grad(weighted, logprobs)
    assert torch.equal(plain, weighted) and torch.equal(plain_grad, weighted_grad)
    assert plain_stats == weighted_stats


def test_policy_loss_is_weights_by_hand_with_nan_weight_on_padding():
    # the tokens of test_policy_loss_clipping_by_hand: per-token clipped terms
    #   -1.2 (clipped)  -0.5  1.1  |  0.8 (clipped)  1.3  padding
    ratios = t([[1.5, 0.5, 1.1], [0.7, 1.3, 2.0]])
    logprobs = ratios.log().requires_grad_(True)
    advantages = t([[1.0, 1.0, -1.0], [-1.0, -1.0, 2.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    is_weights = t([[2.0, 0.5, 1.0], [0.0, 1.0, math.nan]])
    loss, _ = policy_loss(logprobs, torch.zeros(2, 3), advantages, mask, 0.2,
                          is_weights=is_weights)
    # (-1.2 * 2 - 0.5 * 0.5 + 1.1 * 1 + 0.8 * 0 + 1.3 * 1) / 5 = -0.25 / 5 = -0.05
    assert_close(loss, -0.05)
    # d / d logprob = -A * ratio * w / 5 where unclipped: (0,1) -0.5 * 0.5 / 5 = -0.05;
    # (0,2) 1.1 / 5 = 0.22; (1,1) 1.3 / 5 = 0.26; clipped and padding (NaN weight): 0
    loss.backward()
    assert_close(logprobs.grad, [[0.0, -0.05, 0.22], [0.0, 0.26, 0.0]])


# ---------------------------------------------------------------- value_loss


def test_value_loss_clipping_by_hand():
    values = t([[1.5, 0.9, 1.5], [-0.5, 0.1, 5.0]]).requires_grad_(True)
    old_values = t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    returns = t([[2.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # token  v     old  v_clip  R    (v-R)^2  (v_clip-R)^2  max
    # (0,0)  1.5   1    1.2     2    0.25     0.64          0.64  clipped larger
    # (0,1)  0.9   1    0.9     2    1.21     1.21          1.21
    # (0,2)  1.5   1    1.2     0    2.25     1.44          2.25  unclipped larger
    # (1,0) -0.5   0   -0.2     0    0.25     0.04          0.25
    # (1,1)  0.1   0    0.1     1    0.81     0.81          0.81
    # (1,2)  padding
    # loss = 0.5 * (0.64 + 1.21 + 2.25 + 0.25 + 0.81) / 5 = 0.5 * 5.16 / 5 = 0.516
    assert_close(loss, 0.516)
    assert stats["clipfrac"] == pytest.approx(1 / 5)
    # d loss / d v = (v - R) / 5 on unclipped tokens, 0 through the active clamp:
    # (0,1): -1.1 / 5 = -0.22 ; (0,2): 1.5 / 5 = 0.3 ; (1,0): -0.5 / 5 = -0.1 ;
    # (1,1): -0.9 / 5 = -0.18
    loss.backward()
    assert_close(values.grad, [[0.0, -0.22, 0.3], [-0.1, -0.18, 0.0]])


def test_value_loss_bf16_values_compute_in_float32():
    values = t([[1.0, 2.0]]).bfloat16().requires_grad_(True)
    loss, _ = value_loss(values, t([[1.0, 2.0]]), t([[0.0, 0.0]]), t([[1, 1]]), 0.2)
    # 0.5 * (1 + 4) / 2 = 1.25
    assert loss.dtype == torch.float32
    assert_close(loss, 1.25)


# ---------------------------------------------------------------- sharding invariance

NUM_RANKS, NUM_MICRO = 2, 2


def sharded_gradient(loss_fn, leaf, others, mask, scale_for_deepspeed):
    """Accumulate the gradient of 8 rows split over 2 fake ranks x 2 micro-batches into leaf.

    With scale_for_deepspeed, mimic DeepSpeed: each piece's loss uses
    num_tokens / (ranks * micro-batches), and the accumulated gradient is averaged over
    ranks and accumulation steps.
    """
    num_tokens = mask.sum()
    pieces = NUM_RANKS * NUM_MICRO
    if scale_for_deepspeed:
        num_tokens = num_tokens / pieces
    leaf.grad = None
    for rows in torch.arange(8).chunk(pieces):  # rank r, micro-batch m -> 2 rows each
        loss, _ = loss_fn(
            leaf[rows], *[x[rows] for x in others], mask[rows], 0.2, num_tokens=num_tokens
        )
        loss.backward()
    grad = leaf.grad.clone()
    return grad / pieces if scale_for_deepspeed else grad


def make_minibatch():
    gen = torch.Generator().manual_seed(7)
    mask = ragged_mask([6, 1, 0, 3, 6, 2, 5, 4], 6)
    a, b, c = (torch.randn(8, 6, generator=gen) for _ in range(3))
    return mask, a, b, c


@pytest.mark.parametrize("scale_for_deepspeed", [False, True])
def test_policy_loss_gradient_is_invariant_to_sharding(scale_for_deepspeed):
    mask, old_logprobs, advantages, noise = make_minibatch()
    logprobs = (old_logprobs + 0.3 * noise).requires_grad_(True)  # some tokens get clipped
    full, _ = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    full.backward()
    expected = logprobs.grad.clone()
    got = sharded_gradient(
        policy_loss, logprobs, [old_logprobs, advantages], mask, scale_for_deepspeed
    )
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)
    # the test can fail: per-piece normalisation (num_tokens=None) differs on ragged masks
    logprobs.grad = None
    for rows in torch.arange(8).chunk(4):
        loss, _ = policy_loss(logprobs[rows], old_logprobs[rows], advantages[rows], mask[rows], 0.2)
        (loss / 4).backward()
    assert not torch.allclose(logprobs.grad, expected, atol=1e-4)


@pytest.mark.parametrize("scale_for_deepspeed", [False, True])
def test_value_loss_gradient_is_invariant_to_sharding(scale_for_deepspeed):
    mask, old_values, returns, noise = make_minibatch()
    values = (old_values + 0.3 * noise).requires_grad_(True)
    full, _ = value_loss(values, old_values, returns, mask, 0.2)
    full.backward()
    expected = values.grad.clone()
    got = sharded_gradient(value_loss, values, [old_values, returns], mask, scale_for_deepspeed)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    # KL too high: 9 / 6 - 1 = 0.5 -> clipped to 0.2; 0.1 * (1 + 0.2 * 1000 / 10000) = 0.102
    ctl.update(9.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.102)
    # KL too low: 3 / 6 - 1 = -0.5 -> clipped to -0.2; 0.102 * (1 - 0.02) = 0.09996
    ctl.update(torch.tensor(3.0), n_steps=1000)
    assert ctl.value == pytest.approx(0.09996)
    # inside the clip: 6.6 / 6 - 1 = 0.1; 0.09996 * (1 + 0.1 * 500 / 10000) = 0.1004598
    ctl.update(6.6, n_steps=500)
    assert ctl.value == pytest.approx(0.09996 * 1.005)


def test_adaptive_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(9.0, 1000)
    resumed = AdaptiveKLController(0.1, 6.0, 10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(2.0, 64)
    resumed.update(2.0, 64)
    assert resumed.value == ctl.value
    assert isinstance(ctl.state_dict()["value"], float)


def test_adaptive_kl_controller_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 6.0, 0)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
    ctl.load_state_dict({"value": 0.3})  # the configured coefficient wins on resume
    assert ctl.value == 0.05


# ---------------------------------------------------------------- logprobs_from_logits


def reference_logprobs(logits, labels, temperature):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]


def test_logprobs_from_logits_by_hand():
    logits = t([[[0.0, 0.0, math.log(2.0)]]])  # softmax = [1, 1, 2] / 4
    assert_close(logprobs_from_logits(logits, torch.tensor([[2]])), [[math.log(0.5)]])
    # T = 2: exp(logits / 2) = [1, 1, sqrt 2] -> p(0) = 1 / (2 + sqrt 2)
    out = logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0)
    assert_close(out, [[-math.log(2.0 + math.sqrt(2.0))]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_log_softmax_with_gradient(temperature):
    gen = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(3, 5, 11, generator=gen)).requires_grad_(True)
    logits = full[:, :-1]  # a non-contiguous slice, as a trainer passes it
    labels = torch.randint(0, 11, (3, 4), generator=gen)
    weights = torch.randn(3, 4, generator=gen)
    out = logprobs_from_logits(logits, labels, temperature)
    expected = reference_logprobs(logits, labels, temperature)
    assert out.dtype == torch.float32
    assert_close(out, expected.detach())
    (grad,) = torch.autograd.grad((out * weights).sum(), full)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), full)
    assert_close(grad, expected_grad)


def test_logprobs_from_logits_bf16():
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 4, 13, generator=gen)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 13, (2, 4), generator=gen)
    out = logprobs_from_logits(logits, labels, 0.9)
    assert out.dtype == torch.float32
    assert_close(out, reference_logprobs(logits, labels, 0.9).detach())
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logits = logits.detach().float().requires_grad_(True)
    reference_logprobs(ref_logits, labels, 0.9).sum().backward()
    assert_close(logits.grad.float(), ref_logits.grad, atol=1e-2)  # bf16 has ~3 digits


def test_logprobs_from_logits_leaves_input_alone_and_checks_shapes():
    logits = torch.randn(2, 3, 5)
    before = logits.clone()
    with torch.no_grad():
        logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.5)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


# ---------------------------------------------------------------- garbage (inf) on padding


def test_gae_and_value_loss_ignore_inf_on_padding():
    mask = t([[1, 1, 0], [1, 0, 0]])
    rewards, values = t([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), t([[0.5, 0.2, 0.0], [0.1, 0.0, 0.0]])
    inf_pad = torch.where(mask.bool(), 0.0, math.inf)
    clean = gae(rewards, values, mask, 1.0, 0.95)
    dirty = gae(rewards + inf_pad, values - inf_pad, mask, 1.0, 0.95)  # +inf and -inf
    for a, b in zip(clean, dirty, strict=True):
        assert_close(b, a)
    leaf = (values - inf_pad).requires_grad_(True)
    loss, _ = value_loss(leaf, values + inf_pad, rewards * inf_pad, mask, 0.2)
    loss.backward()  # (inf - inf) ** 2 on padding must reach neither the loss nor the grad
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()


# ---------------------------------------------------------------- critic-free estimators


def test_group_advantages_by_hand():
    scores = t([0.0, 1.0, 5.0, 2.0, 2.0, 4.0])  # two groups of 3
    # group 0: mean 2, deviations -2, -1, 3, var (4 + 1 + 9) / 2 = 7, std 2.6457513
    # group 1: mean 8 / 3 = 2.6666667, deviations -2/3, -2/3, 4/3,
    #          var (4/9 + 4/9 + 16/9) / 2 = 4/3, std 1.1547005
    grpo = group_advantages(scores, 3, "grpo", eps=0.0)
    assert_close(grpo, [-2 / 2.6457513, -1 / 2.6457513, 3 / 2.6457513,
                        -0.6666667 / 1.1547005, -0.6666667 / 1.1547005, 1.3333333 / 1.1547005])
    # eps is added to std: group 0, row 2: 3 / (2.6457513 + 1) = 0.8228756
    assert group_advantages(scores, 3, "grpo", eps=1.0)[2].item() == pytest.approx(0.8228756)
    dr_grpo = group_advantages(scores, 3, "dr_grpo")
    assert_close(dr_grpo, [-2.0, -1.0, 3.0, -0.6666667, -0.6666667, 1.3333333])
    # rloo: r - (sum_g - r) / 2; group 0 sum 6: 0 - 6/2 = -3, 1 - 5/2 = -1.5, 5 - 1/2 = 4.5
    #                            group 1 sum 8: 2 - 6/2 = -1, 2 - 6/2 = -1, 4 - 4/2 = 2
    rloo = group_advantages(scores, 3, "rloo")
    assert_close(rloo, [-3.0, -1.5, 4.5, -1.0, -1.0, 2.0])


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_all_equal_group_is_zero(estimator):
    # group 0: all 0.1 (std 0: grpo would divide round-off by eps); group 1: 0 and 1
    scores = t([0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(scores, 4, estimator)
    assert torch.isfinite(advantages).all()
    assert advantages[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert advantages[4:].abs().min() > 0.1


def test_group_advantages_dropped_rows_take_no_part_in_their_group():
    nan, inf = math.nan, math.inf
    scores = t([1.0, 1.0, nan, 1.0,     # the group: survivors equal -> all 0
                0.0, nan, 3.0, 6.0,     # 3 valid rows
                inf, 2.0, nan, -inf])   # 1 valid row: no group statistics -> all 0
    valid = torch.isfinite(scores)
    # group 1, valid rows 0, 3, 6: k = 3, sum 9, mean 3, deviations -3, 0, 3,
    #   var (9 + 0 + 9) / (3 - 1) = 9, std 3
    #   grpo (eps 0): -3/3, 0/3, 3/3 = -1, 0, 1; dr_grpo: -3, 0, 3
    #   rloo over the k - 1 = 2 others: 0 - (3 + 6)/2 = -4.5, 3 - (0 + 6)/2 = 0, 6 - (0 + 3)/2 = 4.5
    # (counting the dropped row as a 0, as before: grpo would give the group
    #  [0.5, 0.5, -1.5, 0.5])
    expected = {
        "grpo": [0.0] * 4 + [-1.0, 0.0, 0.0, 1.0] + [0.0] * 4,
        "dr_grpo": [0.0] * 4 + [-3.0, 0.0, 0.0, 3.0] + [0.0] * 4,
        "rloo": [0.0] * 4 + [-4.5, 0.0, 0.0, 4.5] + [0.0] * 4,
    }
    for estimator, want in expected.items():
        got = group_advantages(scores, 4, estimator, eps=0.0, valid=valid)
        assert got.tolist() == want, estimator  # exact, and no NaN/inf leaks
        # whatever an invalid row holds (here 0, as drop_rows leaves it) changes nothing
        zeroed = torch.where(valid, scores, 0.0)
        assert group_advantages(zeroed, 4, estimator, eps=0.0, valid=valid).tolist() == want
    # all rows valid: the same as valid=None
    finite = t([0.0, 1.0, 5.0, 2.0, 2.0, 4.0])
    for estimator in expected:
        assert torch.equal(group_advantages(finite, 3, estimator),
                           group_advantages(finite, 3, estimator, valid=torch.ones(6) > 0))


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(t([1.0, 2.0]), 1, "grpo")
    with pytest.raises(ValueError, match="dividing the 3 scores"):
        group_advantages(t([1.0, 2.0, 3.0]), 2, "grpo")
    with pytest.raises(ValueError, match="valid: grpo, dr_grpo, rloo"):
        group_advantages(t([1.0, 2.0]), 2, "ppo")


def test_discounted_returns_by_hand():
    rewards = t([[1.0, 2.0, 3.0], [4.0, 5.0, math.inf]])  # row 1's t=2 is padding
    mask = t([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5. row 0: G2 = 3, G1 = 2 + 0.5 * 3 = 3.5, G0 = 1 + 0.5 * 3.5 = 2.75
    #            row 1: G1 = 5 (episode ends), G0 = 4 + 0.5 * 5 = 6.5, G2 = 0 (padding)
    assert_close(discounted_returns(rewards, mask, 0.5), [[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discounted_returns_matches_python_loop_with_inf_on_padding(seed):
    _, lengths, mask, rewards = random_ragged(seed)
    width = mask.shape[1]
    gamma = [1.0, 0.99, 0.5][seed]
    expected = [[0.0] * width for _ in lengths]
    for i, length in enumerate(lengths):
        running = 0.0
        for step in reversed(range(length)):
            running = rewards[i, step].item() + gamma * running
            expected[i][step] = running
    garbage = torch.where(mask.bool(), rewards, math.inf)
    assert_close(discounted_returns(garbage, mask, gamma), expected, atol=1e-5)


def test_kl_loss_k3_by_hand_with_inf_on_padding():
    logprobs = t([[0.0, -1.0, math.inf]]).requires_grad_(True)  # t=2 is padding
    ref_logprobs = t([[0.0, 0.0, -math.inf]])
    mask = t([[1, 1, 0]])
    loss, stats = kl_loss(logprobs, ref_logprobs, mask)
    # log r = ref - logprobs = 0, 1 ; k3 = e^{log r} - 1 - log r = 0, e - 2 = 0.7182818
    # loss = (0 + 0.7182818) / 2 = 0.3591409
    assert_close(loss, 0.3591409)
    assert stats["kl"] == pytest.approx(0.3591409)
    # d k3 / d logprobs = 1 - e^{log r}: 0 and 1 - e = -1.7182818, over 2 tokens
    loss.backward()
    assert_close(logprobs.grad, [[0.0, -0.8591409, 0.0]])
    # k1 with num_tokens 4: (0 + 1) / 4 = 0.25 (k1 = logprobs - ref = 0, -1 -> sum -1)
    k1, _ = kl_loss(logprobs, ref_logprobs, mask, estimator="k1", num_tokens=4)
    assert_close(k1, -0.25)


def test_policy_loss_clip_eps_high_by_hand():
    logprobs = t([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    advantages, mask = t([[1.0, -1.0]]), t([[1, 1]])
    # token 0: A = 1, ratio 1.5: max(-1.5, -clamp(1.5, 0.8, 1 + high)) = -(1 + high)
    # token 1: A = -1, ratio 0.5: max(0.5, clamp(0.5, 0.8, ..)) = 0.8 (lower clip unchanged)
    # clip_eps_high 0.28: (-1.28 + 0.8) / 2 = -0.24 ; None = clip_eps 0.2: (-1.2 + 0.8) / 2
    high, stats = policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, 0.2,
                              clip_eps_high=0.28)
    assert_close(high, -0.24)
    assert stats["clipfrac"] == 1.0
    same, _ = policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, 0.2)
    assert_close(same, -0.2)


def test_loss_normalizer_by_hand():
    mask = ragged_mask([3, 1, 0], 4)  # this piece's rows; the minibatch has 10 tokens, 6 rows
    assert_close(loss_normalizer(mask, "token_mean", 10, 6, 4), 10.0)
    # seq_mean_token_mean: 6 rows x each row's length (the empty row counts as 1)
    assert_close(loss_normalizer(mask, "seq_mean_token_mean", 10, 6, 4), [[18.0], [6.0], [6.0]])
    # seq_mean_token_sum_norm: 6 rows x max_len 4 = 24
    assert_close(loss_normalizer(mask, "seq_mean_token_sum_norm", 10, 6, 4), 24.0)
    with pytest.raises(ValueError, match="valid: token_mean"):
        loss_normalizer(mask, "sum", 10, 6, 4)


@pytest.mark.parametrize("loss_name", ["policy_loss", "kl_loss"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean",
                                      "seq_mean_token_sum_norm"])
def test_loss_agg_gradient_is_invariant_to_sharding(loss_name, loss_agg):
    """2 fake ranks x 2 micro-batches with loss_normalizer's global denominators, scaled for
    DeepSpeed's averaging, give the gradient of loss_agg computed in one piece by hand."""
    mask, old, advantages, noise = make_minibatch()  # 8 rows, lengths 6 1 0 3 6 2 5 4
    leaf = (old + 0.3 * noise).requires_grad_(True)
    sampler = old - 0.8 * noise.flip(0)  # TIS weights computed per piece, some capped

    def loss_fn(rows, num_tokens):
        if loss_name == "policy_loss":
            is_weights, _ = rollout_is_weights(old[rows], sampler[rows], mask[rows])
            return policy_loss(leaf[rows], old[rows], advantages[rows], mask[rows], 0.2,
                               num_tokens=num_tokens, clip_eps_high=0.3,
                               is_weights=is_weights)[0]
        return kl_loss(leaf[rows], old[rows], mask[rows], "k3", num_tokens=num_tokens)[0]

    # one piece, the definitions written out
    if loss_agg == "token_mean":  # sum / 27 valid tokens
        full = loss_fn(torch.arange(8), None)
    elif loss_agg == "seq_mean_token_mean":  # the mean over 8 rows of each row's token mean
        full = sum(loss_fn(torch.tensor([i]), None) for i in range(8)) / 8
    else:  # sum / (8 rows x max_len 6)
        full = loss_fn(torch.arange(8), 48)
    full.backward()
    expected = leaf.grad.clone()

    leaf.grad = None
    pieces = NUM_RANKS * NUM_MICRO
    for rows in torch.arange(8).chunk(pieces):  # rank r, micro-batch m -> 2 rows each
        denominator = loss_normalizer(mask[rows], loss_agg, mask.sum(), 8, 6) / pieces
        loss_fn(rows, denominator).backward()
    torch.testing.assert_close(leaf.grad / pieces, expected, atol=1e-7, rtol=1e-6)
