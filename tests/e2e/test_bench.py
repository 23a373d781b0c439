"""`ds-rlhf bench` on CPU ranks: one JSON line whose phases add up to the step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_deepspeed

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("nproc, estimator, n", [(1, "gae", 1), (2, "gae", 1), (2, "grpo", 2)])
def test_bench_ppo_tiny_prints_one_json_line(nproc, estimator, n):
    proc = run_deepspeed(nproc, [
        "ds_rlhf", "bench", "ppo", "--preset", "tiny", "--batch", "4", "--prompt-len", "16",
        "--response-len", "16", "--steps", "2", "--estimator", estimator, "--n-samples",
        str(n), "--reward", "function" if estimator == "grpo" else "model"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    result = json.loads(lines[0])
    assert result["world_size"] == nproc and result["rollout_batch"] == 4 * nproc * n
    assert (result["estimator"], result["n_samples"]) == (estimator, n)
    if estimator == "gae":
        assert result["engines"] == ["actor", "critic", "ref", "reward"]
    else:  # no critic; no KL term in grpo's bench: no reference
        assert result["engines"] == ["actor"]  # and the rule scores: no reward engine
        assert result["critic_params_m"] is None
        assert result["time_split_s"]["critic_train"] == 0.0
    assert result["samples_per_s"] > 0 and result["generated_tokens_per_s"] > 0
    assert result["train_tokens_per_s"] > 0
    assert set(result["time_split_s"]) == {
        "switch", "generate", "actor_logprobs", "ref_logprobs", "values", "reward",
        "advantages", "actor_train", "critic_train"}
    assert 0.95 <= result["time_split_sum_over_step"] <= 1.0
    assert len(result["peak_memory_gb_per_rank"]) == nproc
    assert all(m > 0.1 for m in result["peak_memory_gb_per_rank"])
