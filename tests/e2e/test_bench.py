"""`ds-rlhf bench` on CPU ranks: one JSON line whose phases add up to the step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_deepspeed

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("nproc", [1, 2])
def test_bench_ppo_tiny_prints_one_json_line(nproc):
    proc = run_deepspeed(nproc, [
        "ds_rlhf", "bench", "ppo", "--preset", "tiny", "--batch", "4", "--prompt-len", "16",
        "--response-len", "16", "--steps", "2"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    result = json.loads(lines[0])
    assert result["world_size"] == nproc and result["rollout_batch"] == 4 * nproc
    assert result["samples_per_s"] > 0 and result["generated_tokens_per_s"] > 0
    assert result["train_tokens_per_s"] > 0
    assert set(result["time_split_s"]) == {
        "switch", "generate", "actor_logprobs", "ref_logprobs", "values", "reward",
        "advantages", "actor_train", "critic_train"}
    assert 0.95 <= result["time_split_sum_over_step"] <= 1.0
    assert len(result["peak_memory_gb_per_rank"]) == nproc
    assert all(m > 0.1 for m in result["peak_memory_gb_per_rank"])
