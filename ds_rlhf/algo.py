"""PPO math for RLHF: pure torch functions, the contract of design/PPO_SPEC.md.

Tensors in, tensors (and a small dict of python-float stats) out; hyper-parameters are
arguments, never state. No deepspeed, torch.distributed or transformers import here, so the
math is tested on CPU in milliseconds (tests/unit/test_algo.py).

Shapes: every tensor is ``[B, R]`` (batch, response positions) unless said otherwise.
``mask`` is the response mask: 1 for real response tokens including EOS, 0 for the padding
after it. Position t of ``logprobs`` / ``values`` belongs to response token t.

All math runs in float32, even when the models run in bf16: inputs are cast with
``.float()`` on entry. Masked-out entries never leak into results, even when they hold
garbage (masking uses ``torch.where``, not a multiply, so a non-finite pad value stays out).

Stats dicts hold python floats (via ``_stat``), ready for logging; building them calls
``.item()``, i.e. one device sync per stat.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # group_advantages' estimators
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _stat(x: Tensor) -> float:
    """A detached 0-d tensor as a python float, for stats dicts (syncs the device)."""
    return float(x.detach().item())


def _check_num_tokens(num_tokens: float | Tensor | None, mask: Tensor) -> float | Tensor:
    # Default: normalise by this piece's own valid tokens; clamp so an all-padding piece
    # gives a zero loss instead of 0 / 0.
    if num_tokens is None:
        return mask.sum().clamp(min=1)
    if bool((torch.as_tensor(num_tokens) <= 0).any()):
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return num_tokens


def _aggregate(per_token: Tensor, mask: Tensor, num_tokens: float | Tensor | None) -> Tensor:
    """sum(per_token * mask / num_tokens): num_tokens is a number or per-row [B, 1]
    denominators (see loss_normalizer). Padding is selected out, never multiplied."""
    num_tokens = _check_num_tokens(num_tokens, mask)
    if isinstance(num_tokens, Tensor) and num_tokens.dim() > 0:
        return torch.where(mask, per_token / num_tokens, 0.0).sum()
    return torch.where(mask, per_token, 0.0).sum() / num_tokens


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1.

    x, mask: same shape. dim=None reduces everything to a 0-d tensor; an int reduces that
    dimension only. Where no entry is masked in, the mean is 0 (not NaN): an empty
    response must not poison a logged average.
    """
    mask = mask.bool()
    x = torch.where(mask, x.float(), 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the masked entries.

    ``(x - mean) / sqrt(var + eps)`` with the Bessel-corrected (unbiased) variance;
    ``shift_mean=False`` adds the mean back (only the scale changes, as TRL does for
    rewards). Entries where mask == 0 come back as 0. With fewer than 2 masked entries the
    variance is taken as 0 (no NaN).
    """
    mask = mask.bool()
    x = x.float()
    mean = masked_mean(x, mask)
    centered = x - mean
    num = mask.sum()
    var = torch.where(mask, centered**2, 0.0).sum() / (num - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    The estimators of J. Schulman, "Approximating KL divergence" (2020), with
    ``log r = ref_logprobs - logprobs``:
      k1 = -log r                    unbiased, high variance, can be negative
      k2 = 0.5 * (log r) ** 2        biased, low variance, >= 0
      k3 = (r - 1) - log r           unbiased, low variance, >= 0
    logprobs, ref_logprobs: [B, R] -> [B, R] float32.
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # expm1(x) = exp(x) - 1 without cancellation when the policies are close.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown kl estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every token plus the sequence score on the last.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2:
    ``R(x, y) = r(x, y) - beta * KL``, with the KL spread over tokens and the score given at
    the end of the episode.
      scores: [B], one per sequence; logprobs, ref_logprobs, mask: [B, R].
    Returns ``(rewards, kl)``, both [B, R] float32 and 0 where mask == 0:
      kl = kl_per_token(logprobs, ref_logprobs, kl_estimator) * mask
      rewards = -kl_coef * kl;  rewards[i, last_i] += scores[i]
    where last_i is the index of the last 1 in mask[i] (the EOS, or the last position when
    the response hit the length limit). Rows with an all-zero mask get no score.
    """
    mask = mask.bool()
    kl = torch.where(mask, kl_per_token(logprobs, ref_logprobs, kl_estimator), 0.0)
    rewards = -kl_coef * kl
    # Last real position from the mask, never from token ids (pad may equal EOS):
    # argmax of (t + 1) over masked-in positions is the largest such t.
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (positions * mask).argmax(dim=1, keepdim=True)
    score = torch.where(mask.any(dim=1), scores.float(), 0.0)
    rewards = rewards.scatter_add(1, last, score.unsqueeze(1))
    return rewards, kl


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16), per response token.

    The episode ends at the last real token, so values after it count as 0:
      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
      returns = A + V   (the TD(lambda) target for the critic)
    rewards, values, mask: [B, R]. Returns ``(advantages, returns)``, [B, R] float32, both 0
    where mask == 0 and carrying no gradient (they are targets, not functions of the policy).
    The loop runs backwards over the R positions, vectorised over the batch.
    """
    mask = mask.bool()
    # Select, never multiply: inf * 0 on padding would be NaN and flow back through A_{t+1}.
    rewards = torch.where(mask, rewards.float(), 0.0)
    values = torch.where(mask, values.float(), 0.0)
    # m_{t+1} and V_{t+1} * m_{t+1} (values are 0 after the last real token); position R has
    # neither (zero-padded on the right).
    next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1)).float()
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_advantage = deltas[:, t] + gamma * lam * next_mask[:, t] * next_advantage
        advantages[:, t] = next_advantage
    returns = advantages + values
    return torch.where(mask, advantages, 0.0), torch.where(mask, returns, 0.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    num_tokens: float | Tensor | None = None,
    clip_eps_high: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7), negated to be minimised, summed over tokens:
      ratio     = exp(logprobs - old_logprobs)
      per_token = max(-A * ratio, -A * clamp(ratio, 1 - clip_eps, 1 + clip_eps_high)) * w
      loss      = sum(per_token * mask / num_tokens)
    logprobs (with grad), old_logprobs, advantages, mask: [B, R]; loss: 0-d float32.
    ``clip_eps_high`` (None: clip_eps) is DAPO's "clip-higher" (Yu et al. 2025, eq. 10): a
    wider upper clip lets unlikely tokens with positive advantage gain more per step.
    ``is_weights`` w ([B, R], no gradient; None: 1) reweights each token's clipped term, e.g.
    the truncated importance weights of :func:`rollout_is_weights`.

    ``num_tokens`` defaults to mask.sum(). The trainer passes the valid-token count of the
    whole optimizer mini-batch across ranks (scaled for DeepSpeed's gradient averaging), or
    per-row ``[B, 1]`` denominators from :func:`loss_normalizer`, so any split into ranks
    and micro-batches sums to the same gradient.

    stats (python floats, over this piece's masked tokens):
      clipfrac  share of tokens where the clipped branch is taken (strictly larger)
      approx_kl masked mean of 0.5 * (logprobs - old_logprobs) ** 2 (k2 estimator)
      ratio     masked mean of ratio
    """
    mask = mask.bool()
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = torch.where(mask, advantages.detach().float(), 0.0)
    # Mask the log-ratio before exp: a padding position with a huge log-ratio would give
    # ratio = inf and inf * 0 = NaN in the loss or its gradient.
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.detach().float(), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        # Selected to 0 on padding first: a NaN weight there would make 0 * NaN gradients.
        per_token = per_token * torch.where(mask, is_weights.detach().float(), 0.0)
    loss = _aggregate(per_token, mask, num_tokens)
    stats = {
        "clipfrac": _stat(masked_mean((clipped > unclipped).float(), mask)),
        "approx_kl": _stat(masked_mean(0.5 * log_ratio**2, mask)),
        "ratio": _stat(masked_mean(ratio, mask)),
    }
    return loss, stats


@torch.no_grad()
def rollout_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor,
                       cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS) for the sampler/trainer mismatch (Yao et al. 2025,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the tokens were
    drawn by the sampler (e.g. vLLM), whose probabilities differ slightly from the trainer's at
    the same weights, so each token's policy-gradient term is reweighted by
      w_t = min(exp(old_logprobs_t - sampler_logprobs_t), cap)
    on real tokens, 0 on padding. old_logprobs: the trainer's at sampling time (log pi_old,
    log_softmax(logits / temperature) over the full vocabulary); sampler_logprobs: log mu, the
    behaviour policy's, of the distribution that drew each token: temperature, then top-k /
    top-p renormalised over the kept tokens (generation.behaviour_logprobs; both backends
    store this), so w is the importance weight pi_old / mu of the real draw. With top-k /
    top-p, mu puts all its mass on the kept tokens and w <= (their mass under pi_old) on
    average: the filter's share of the gap, not a mismatch. Both [B, R]. Returns
    ``(weights, stats)``, weights [B, R] float32 without gradient. ``cap`` > 0.

    stats (python floats, over this piece):
      logprob_abs_diff  masked mean of |old_logprobs - sampler_logprobs| per token
      capped_frac       share of real tokens whose weight the cap cut (exp(..) > cap)
      mismatch_kl       KL(sampler || trainer) per sequence: the k1 estimate
                        sum_t (sampler_logprobs_t - old_logprobs_t) over a row's tokens (the
                        tokens are the sampler's draws), averaged over the rows that have
                        at least one real token
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    mask = mask.bool()
    # Selected before exp: garbage on padding must not become inf or NaN.
    log_ratio = torch.where(mask, old_logprobs.float() - sampler_logprobs.float(), 0.0)
    ratio = torch.exp(log_ratio)
    weights = torch.where(mask, ratio.clamp(max=cap), 0.0)
    nonempty = mask.any(dim=1)
    kl_per_row = (-log_ratio).sum(dim=1)  # k1 of KL(sampler || trainer); 0 on padding
    stats = {
        "logprob_abs_diff": _stat(masked_mean(log_ratio.abs(), mask)),
        "capped_frac": _stat(masked_mean((ratio > cap).float(), mask)),
        "mismatch_kl": _stat(masked_mean(kl_per_row, nonempty)),
    }
    return weights, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (the PPO baselines' value clipping, Schulman et al. 2017 code;
    "The 37 Implementation Details of PPO", detail 9):
      v_clip = old_values + clamp(values - old_values, -clip_eps, clip_eps)
      loss   = 0.5 * sum(max((values - R)^2, (v_clip - R)^2) * mask / num_tokens)
    values (with grad), old_values, returns, mask: [B, R]; loss: 0-d float32.
    ``num_tokens`` as in :func:`policy_loss`.

    stats (python floats): clipfrac, the share of masked tokens where the clipped branch is
    strictly larger.
    """
    mask = mask.bool()
    # Select padding out of every input: a square of inf there would give a NaN gradient.
    values = torch.where(mask, values.float(), 0.0)
    old_values = torch.where(mask, old_values.detach().float(), 0.0)
    returns = torch.where(mask, returns.detach().float(), 0.0)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    per_token = torch.maximum(unclipped, clipped)
    loss = 0.5 * _aggregate(per_token, mask, num_tokens)
    stats = {"clipfrac": _stat(masked_mean((clipped > unclipped).float(), mask))}
    return loss, stats


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL(policy || reference) as a loss term, GRPO's ``beta * D_KL`` (Shao et al. 2024,
    "DeepSeekMath", eq. 3-4, which uses k3), instead of a penalty in the reward:
      per_token = kl_per_token(logprobs, ref_logprobs, estimator)
      loss      = sum(per_token * mask / num_tokens)     (aggregated as policy_loss)
    logprobs (with grad), ref_logprobs, mask: [B, R]; differentiable in logprobs.
    stats: kl, the masked mean of per_token over this piece.
    """
    mask = mask.bool()
    # Zero both sides on padding: the estimator of equal logprobs is 0 for k1, k2 and k3.
    per_token = kl_per_token(torch.where(mask, logprobs.float(), 0.0),
                             torch.where(mask, ref_logprobs.detach().float(), 0.0), estimator)
    loss = _aggregate(per_token, mask, num_tokens)
    return loss, {"kl": _stat(masked_mean(per_token, mask))}


def loss_normalizer(mask: Tensor, loss_agg: str, num_tokens: float, num_sequences: int,
                    max_len: int) -> Tensor:
    """Denominators (pass them as the losses' ``num_tokens``) that turn
    sum(per_token / denominator) over every piece of a minibatch into ``loss_agg`` of the
    whole minibatch, however it is split over ranks and micro-batches:
      token_mean               num_tokens                    sum / valid tokens (DAPO)
      seq_mean_token_mean      num_sequences * len_i         mean of each row's token mean
                                                             (GRPO, Shao et al. 2024)
      seq_mean_token_sum_norm  num_sequences * max_len       sum / (rows x max_len)
                                                             (Dr. GRPO, Liu et al. 2025)
    mask: [B, R] rows of this piece; num_tokens and num_sequences: counts of the WHOLE
    minibatch (all ranks), rows dropped from the update (no valid tokens) not counted;
    max_len: generation.max_new_tokens. len_i = mask[i].sum(), clamped to 1 so an empty row
    divides nothing by 0. Returns a 0-d tensor when every row
    shares the denominator, else ``[B, 1]``.
    """
    if loss_agg == "token_mean":
        return torch.tensor(float(num_tokens))
    if loss_agg == "seq_mean_token_mean":
        lengths = mask.float().sum(1, keepdim=True).clamp(min=1)
        return float(num_sequences) * lengths
    if loss_agg == "seq_mean_token_sum_norm":
        return torch.tensor(float(num_sequences * max_len))
    raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGGS)}")


@torch.no_grad()
def group_advantages(scores: Tensor, group_size: int, estimator: str, eps: float = 1e-6,
                     valid: Tensor | None = None) -> Tensor:
    """One advantage per row from the scores of its group, no critic.

    Rows g*n .. g*n+n-1 (n = group_size) are the n samples of one prompt. With mean_g and
    std_g (Bessel-corrected) over the k valid scores r of the group:
      grpo     (r - mean_g) / (std_g + eps)         Shao et al. 2024 (DeepSeekMath), eq. 4-5
      dr_grpo  r - mean_g                           Liu et al. 2025 (Dr. GRPO): no std
      rloo     r - (sum_g - r) / (k - 1)            Ahmadian et al. 2024: leave-one-out mean
    ``valid`` ([N] bool, None: all) marks the rows in the update: an invalid row (its score
    NaN/inf, dropped) takes no part in its group's statistics and gets 0, whatever its score
    holds (selected out, never multiplied). A group with fewer than 2 valid rows, or whose
    valid scores are all equal, teaches nothing: its rows get exactly 0 (no NaN, no
    round-off residue). scores: [N] -> [N] float32, N a multiple of group_size >= 2.
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group_advantages needs group_size >= 2 dividing the {scores.numel()} "
                         f"scores, got {group_size}")
    if valid is None:
        valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    valid = valid.bool().reshape(-1, group_size)
    r = torch.where(valid, scores.float().reshape(-1, group_size), 0.0)
    k = valid.sum(1, keepdim=True)
    total = r.sum(1, keepdim=True)
    mean = total / k.clamp(min=1)
    if estimator == "grpo":
        var = torch.where(valid, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (k - 1).clamp(min=1)
        advantages = (r - mean) / (var.sqrt() + eps)
    elif estimator == "dr_grpo":
        advantages = r - mean
    elif estimator == "rloo":
        advantages = r - (total - r) / (k - 1).clamp(min=1)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}; valid: "
                         f"{', '.join(GROUP_ESTIMATORS)}")
    # All valid scores equal: the largest equals the smallest (true for k <= 1 too).
    all_equal = (torch.where(valid, r, -torch.inf).amax(1, keepdim=True)
                 == torch.where(valid, r, torch.inf).amin(1, keepdim=True))
    teaches_nothing = ~valid | (k < 2) | all_equal
    return torch.where(teaches_nothing, 0.0, advantages).reshape(-1)


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Returns-to-go of per-token rewards, the REINFORCE++ advantage before whitening
    (Hu 2025, "REINFORCE++", eq. 7):
      G_t = r_t + gamma * m_{t+1} * G_{t+1}
    rewards, mask: [B, R] -> [B, R] float32, 0 where mask == 0, no gradient. Padding never
    leaks, even when it holds inf or NaN (selected out, not multiplied).
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards.float(), 0.0)
    next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1)).float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * next_mask[:, t] * running
        returns[:, t] = running
    return torch.where(mask, returns, 0.0)


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, section 2.2):
      proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
      value *= 1 + proportional_error * n_steps / horizon
    ``n_steps`` is the number of samples (sequences) seen since the last update, so
    ``horizon`` is counted in samples, as in the paper (10k).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController needs init_kl_coef, target (kl_target) and horizon > 0, "
                f"got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # Only the learned coefficient; target and horizon come from the config.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient with the AdaptiveKLController interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Keeps the configured value: for a fixed coefficient the config is the truth, so a
        resumed run may change kl_coef."""


def _scaled_row(row: Tensor, temperature: float) -> Tensor:
    """row / temperature in float32; at temperature 1 the row itself when it is float32 (a
    division by 1 is exact: no [T, V] copy)."""
    row = row.float()
    return row if temperature == 1.0 else row / temperature


class _LogprobsFromLogits(torch.autograd.Function):
    """log softmax(logits / T) gathered at labels, one batch row at a time, forward and
    backward, so neither pass holds more than one row of float32 [.., V] activations.

    (A plain row loop would still keep every row's float32 copy alive for autograd.)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        logprobs = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logprobs)
        for i in range(logits.shape[0]):
            row = _scaled_row(logits[i], temperature)  # never written to
            lse[i] = row.logsumexp(-1)
            logprobs[i] = row.gather(-1, labels[i].unsqueeze(-1)).squeeze(-1) - lse[i]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        for i in range(logits.shape[0]):
            # d logprob / d logit_v = (1[v == label] - softmax_v) / T
            probs = (_scaled_row(logits[i], temperature) - lse[i].unsqueeze(-1)).exp_()
            g = grad_logprobs[i].float().unsqueeze(-1) / temperature
            row_grad = probs.mul_(-g).scatter_add_(-1, labels[i].unsqueeze(-1), g)
            grad_logits[i] = row_grad  # cast back to the logits dtype
        return grad_logits, None, None


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, labels)`` in float32, without
    materialising a float32 [B, T, V] tensor.

    logits: [B, T, V] (any float dtype, e.g. bf16); labels: [B, T] -> [B, T] float32.
    ``logprob = logit[label] / T - logsumexp(logits / T)``, computed row by row in float32.
    Use the sampling temperature: the ratio must compare the distribution that sampled.
    Differentiable in ``logits``; the gradient has the dtype of ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    return _LogprobsFromLogits.apply(logits, labels.long(), float(temperature))


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Offline preference losses on (chosen, rejected) pairs, one per pair.

    Inputs are [N], one log-probability per sequence: the response tokens' logprobs summed
    (the trainer averages them over tokens for "ipo", as the IPO paper does). With
      h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    the losses are
      "sigmoid": -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)
                 DPO, Rafailov et al. 2023, eq. 7; ls = label_smoothing, the conservative
                 DPO of Mitchell 2023 (ls is the assumed share of flipped labels)
      "ipo":     (h - 1 / (2 * beta)) ** 2          IPO, Azar et al. 2023 (empirical loss)
      "hinge":   relu(1 - beta * h)                 SLiC-HF, Zhao et al. 2023 (calibration loss)
    Returns ``(losses, chosen_rewards, rejected_rewards)``, each [N] float32; the implicit
    rewards beta * (logps - ref_logps) (Rafailov et al. 2023, section 5) carry no gradient.
    The reference log-probabilities never carry gradient. The trainer averages ``losses``
    over the global batch of pairs.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
        raise ValueError(f"label_smoothing must be in [0, 0.5) and is defined for loss_type "
                         f"'sigmoid' only, got {label_smoothing} with {loss_type!r}")
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    ref_chosen_logps = ref_chosen_logps.detach().float()
    ref_rejected_logps = ref_rejected_logps.detach().float()
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        logsigmoid = torch.nn.functional.logsigmoid
        losses = (-(1 - label_smoothing) * logsigmoid(beta * h)
                  - label_smoothing * logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
