"""DPO: algo.dpo_loss against hand-computed numbers (arithmetic in comments), its gradient
direction, the sequence log-probabilities of a pad == EOS batch against a direct computation,
and the config checks."""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers

from ds_rlhf import algo
from ds_rlhf.config import ConfigError, DPORunConfig, load_config, save_yaml
from ds_rlhf.data import PreferenceSet
from ds_rlhf.demo import EOS, VOCAB, tiny_model_config
from ds_rlhf.trainers.dpo import collate_pairs, sequence_logps
from tests.conftest import float32_tolerance


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


# Two pairs, beta = 0.5:
#   pair 0: chosen -1, rejected -2, ref -1.5 / -1.5: h = (-1 + 2) - (-1.5 + 1.5) = 1
#   pair 1: chosen -3, rejected -1, ref -2 / -2:     h = (-3 + 1) - (-2 + 2)     = -2
# so beta * h = [0.5, -1].
CHOSEN, REJECTED = [-1.0, -3.0], [-2.0, -1.0]
REF_CHOSEN, REF_REJECTED = [-1.5, -2.0], [-1.5, -2.0]
BETA = 0.5


def losses_of(loss_type: str, label_smoothing: float = 0.0):
    return algo.dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), BETA,
                         loss_type, label_smoothing)


def test_sigmoid_loss_by_hand():
    losses, chosen_rewards, rejected_rewards = losses_of("sigmoid")
    # -logsigmoid(x) = log(1 + exp(-x)):
    #   log(1 + exp(-0.5)) = log(1.60653066) = 0.47407698
    #   log(1 + exp(1))    = log(3.71828183) = 1.31326169
    assert_close(losses, [0.47407698, 1.31326169])
    # beta * (logps - ref_logps): 0.5 * [-1 + 1.5, -3 + 2] and 0.5 * [-2 + 1.5, -1 + 2]
    assert_close(chosen_rewards, [0.25, -0.5])
    assert_close(rejected_rewards, [-0.25, 0.5])


def test_conservative_dpo_label_smoothing_by_hand():
    losses, _, _ = losses_of("sigmoid", label_smoothing=0.2)
    # -(1 - ls) * logsigmoid(bh) - ls * logsigmoid(-bh), with -logsigmoid(-x) = x - logsigmoid(x):
    #   pair 0: 0.8 * 0.47407698 + 0.2 * (0.5 + 0.47407698) = 0.37926158 + 0.19481540 = 0.57407698
    #   pair 1: 0.8 * 1.31326169 + 0.2 * (-1 + 1.31326169) = 1.05060935 + 0.06265234 = 1.11326169
    assert_close(losses, [0.57407698, 1.11326169])


def test_ipo_loss_by_hand():
    losses, chosen_rewards, _ = losses_of("ipo")
    # (h - 1 / (2 * beta)) ** 2 = (h - 1) ** 2 = [(1 - 1) ** 2, (-2 - 1) ** 2] = [0, 9]
    assert_close(losses, [0.0, 9.0])
    assert_close(chosen_rewards, [0.25, -0.5])  # the same implicit rewards for every loss


def test_hinge_loss_by_hand():
    losses, _, _ = losses_of("hinge")
    # relu(1 - beta * h) = relu([1 - 0.5, 1 + 1]) = [0.5, 2]
    assert_close(losses, [0.5, 2.0])
    # A pair past the margin (beta * h = 0.5 * 4 = 2 > 1) costs nothing: relu(1 - 2) = 0.
    far, _, _ = algo.dpo_loss(t([0.0]), t([-4.0]), t([0.0]), t([0.0]), BETA, "hinge")
    assert_close(far, [0.0])


@pytest.mark.parametrize("loss_type, label_smoothing, slope", [
    # d loss / d chosen_logps at h = 0, beta = 0.5 (d h / d chosen = 1, d h / d rejected = -1):
    ("sigmoid", 0.0, -0.25),  # -beta * sigmoid(-beta h) = -0.5 * 0.5
    ("sigmoid", 0.2, -0.15),  # -(1 - ls) * beta * 0.5 + ls * beta * 0.5 = -0.2 + 0.05
    ("ipo", 0.0, -2.0),  # 2 * (h - 1 / (2 beta)) = 2 * (0 - 1)
    ("hinge", 0.0, -0.5),  # -beta while 1 - beta * h > 0
])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type, label_smoothing, slope):
    chosen = t([-2.0]).requires_grad_()
    rejected = t([-3.0]).requires_grad_()
    ref_chosen = t([-2.0]).requires_grad_()  # h = (-2 + 3) - (-2 + 3) = 0
    ref_rejected = t([-3.0]).requires_grad_()
    losses, chosen_rewards, rejected_rewards = algo.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, BETA, loss_type, label_smoothing)
    losses.sum().backward()
    assert_close(chosen.grad, [slope])  # descent raises the chosen log-prob ...
    assert_close(rejected.grad, [-slope])  # ... and lowers the rejected one
    assert ref_chosen.grad is None and ref_rejected.grad is None  # the reference is fixed
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_bad_arguments():
    args = t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED)
    with pytest.raises(ValueError, match="beta must be > 0"):
        algo.dpo_loss(*args, 0.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        algo.dpo_loss(*args, BETA, "kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        algo.dpo_loss(*args, BETA, "ipo", 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        algo.dpo_loss(*args, BETA, "sigmoid", 0.5)


# ---------------------------------------------------------------- sequence log-probabilities


def test_response_mask_from_lengths_by_hand():
    # pad == EOS == 0. Pair 0: prompt [5, 6], chosen [7, EOS], rejected [8, 9, 0, EOS], where
    # the rejected response holds an EOS-valued token before its end; pair 1: prompt [5],
    # chosen [EOS] alone, rejected [7, 8, EOS].
    pairs = PreferenceSet(chosen_ids=[[5, 6, 7, 0], [5, 0]],
                          rejected_ids=[[5, 6, 8, 9, 0, 0], [5, 7, 8, 0]],
                          prompt_lens=[2, 1], num_filtered=0)
    batch = collate_pairs(pairs, torch.tensor([0, 1]), pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0, 0], [5, 0, 0, 0, 0, 0],
                                        [5, 6, 8, 9, 0, 0], [5, 7, 8, 0, 0, 0]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0],
                                                  [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0],
                                             [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch.position_ids[1].tolist() == [0, 1, 1, 1, 1, 1]


def test_sequence_logps_of_a_pad_eos_batch_equal_a_direct_computation():
    eos = VOCAB[EOS]
    config = transformers.AutoConfig.for_model(**tiny_model_config(len(VOCAB)))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)

    def tokens(n):  # real words, and an EOS-valued token inside some responses
        return [eos if i == 1 else int(x) for i, x in enumerate(torch.randint(2, 100, (n,),
                                                                              generator=g))]

    prompts = [tokens(n) for n in (3, 7, 1)]
    chosen = [p + tokens(n) + [eos] for p, n in zip(prompts, (4, 1, 9), strict=True)]
    rejected = [p + tokens(n) + [eos] for p, n in zip(prompts, (8, 2, 0), strict=True)]
    pairs = PreferenceSet(chosen, rejected, [len(p) for p in prompts], 0)
    rows = torch.tensor([2, 0, 1])
    batch = collate_pairs(pairs, rows, pad_id=eos)
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch)

    # Directly: each sequence alone (no padding), full log-softmax, its response tokens.
    expected, expected_counts = [], []
    for side in (chosen, rejected):
        for i in rows.tolist():
            ids, start = torch.tensor([side[i]]), len(prompts[i])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            token = logprobs.gather(1, ids[0, 1:, None]).squeeze(1)  # token t at index t - 1
            expected.append(float(token[start - 1:].sum()))
            expected_counts.append(len(side[i]) - start)
    # Sums of ~10 log-probabilities (magnitude ~50, an ulp there 4e-6) from two batch shapes,
    # so two matmul blockings: a tolerance scaled by the magnitude, not 1e-5 (2.6 ulp).
    torch.testing.assert_close(sums, t(expected), atol=float32_tolerance(t(expected)), rtol=0)
    assert counts.tolist() == expected_counts  # response + EOS, never the padding


# ---------------------------------------------------------------- config


BASE = ["--policy.model.path=m", "--data.datasets=[{path: x.jsonl, format: preference}]"]


def test_dpo_config_defaults_and_round_trip(tmp_path):
    cfg = load_config(None, BASE, cls=DPORunConfig)
    assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.sft_coef,
            cfg.dpo.precompute_ref) == ("sigmoid", 0.1, 0.0, 0.0, False)
    assert cfg.ref.zero_stage == 3 and cfg.tracking.sample_every == 0
    # A tracking section of W&B fields keeps DPO's sample_every of 0.
    cfg = load_config(None, [*BASE, "--tracking={wandb_project: p}"], cls=DPORunConfig)
    assert cfg.tracking.wandb_project == "p" and cfg.tracking.sample_every == 0
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    assert load_config(path, cls=DPORunConfig) == cfg


@pytest.mark.parametrize("override, field, hint", [
    ("--dpo.beta=0", "dpo.beta", "must be > 0"),
    ("--dpo.beta=-0.1", "dpo.beta", "must be > 0"),
    ("--dpo.label_smoothing=0.5", "dpo.label_smoothing", "[0, 0.5)"),
    ("--dpo={loss_type: ipo, label_smoothing: 0.1}", "dpo.label_smoothing", "sigmoid only"),
    ("--dpo.sft_coef=-1", "dpo.sft_coef", "must be >= 0"),
    ("--dpo.loss_type=kto", "dpo.loss_type", "choose one of"),
    ("--data.datasets=[{path: x.jsonl, format: prompt}]", "data.datasets[0].format",
     "use one of preference, hh"),
    ("--data.datasets=[{path: x.jsonl, format: prompt_completion}]", "data.datasets[0].format",
     "cannot be read by `ds-rlhf dpo`"),
    ("--policy={model: {path: m}, lora_rank: 4}\n--ref.model.path=other", "ref.model",
     "adapters off"),
    ("--ref.zero_stage=2", "ref.zero_stage", "frozen model"),
    ("--policy.micro_batch_tokens=64", "policy.micro_batch_tokens", "batches by pairs"),
    ("--policy.model={}", "policy.model", "no weights given"),
    ("--tracking.sample_every=5", "tracking.sample_every", "no responses"),
    ("--tracking.log_every=3", "tracking.log_every", "train.log_every"),
    ("--checkpoint.export_critic=true", "checkpoint.export_critic", "no critic"),
])
def test_dpo_config_errors_name_the_field(override, field, hint):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: .*{re.escape(hint)}"):
        load_config(None, [*BASE, *override.split("\n")], cls=DPORunConfig)


def test_ipo_minimum_is_at_h_equal_one_over_two_beta():
    # IPO's minimum is at h = 1 / (2 beta): beta = 0.25 -> h = 2, loss 0 and zero gradient.
    chosen = t([0.0]).requires_grad_()
    loss, _, _ = algo.dpo_loss(chosen, t([-2.0]), t([0.0]), t([0.0]), 0.25, "ipo")
    loss.sum().backward()
    assert loss.item() == 0.0 and chosen.grad.item() == 0.0
    assert math.isclose(algo.dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), 0.25,
                                      "ipo")[0].item(), 4.0)  # (0 - 2) ** 2
