"""A whole 2-rank GRPO run scored by a reward function and a real reward server (no reward
model): the server sees batched, authorised requests and the run logs what it answered; then
the function fails on one rank, and every rank ends with the same clear error, exit code 2,
no hang, and the last checkpoint intact."""

from __future__ import annotations

import pytest

from ds_rlhf.checkpoint import find_resume
from ds_rlhf.tracking import read_metrics
from tests.conftest import RewardServer, ppo_config, run_deepspeed, write_yaml

pytestmark = pytest.mark.dist

FLAKY = '''
import os

calls = 0

def words(prompts, completions, **columns):
    global calls
    calls += 1
    if calls == 2 and os.environ["RANK"] == "1":  # step 2, rank 1 only
        raise RuntimeError("the grader crashed")
    return [len(c.split()) for c in completions]
'''


def test_function_and_server_rewards_then_a_failure_on_one_rank(assets, tmp_path):
    fn = tmp_path / "flaky.py"
    fn.write_text(FLAKY)
    server = RewardServer()
    server.token = "s3cret"
    out = tmp_path / "run"
    cfg = ppo_config(
        assets, out, generation={"n_samples_per_prompt": 2},
        ppo={"steps": 3, "advantage_estimator": "grpo", "kl_coef": 0.0},
        checkpoint={"save_every": 1}, tracking={"sample_every": 0},
        rewards=[{"function": f"{fn}:words", "weight": 0.5},
                 {"url": server.url, "token_env": "RM_TOKEN", "batch_size": 3, "timeout": 30,
                  "max_retries": 0, "weight": 2.0}])
    del cfg["critic"], cfg["reward"]  # the function and the server are the whole reward
    path = write_yaml(cfg, tmp_path / "run.yaml")
    try:
        proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(path)], timeout=300,
                             RM_TOKEN="s3cret")
    finally:
        server.httpd.shutdown()
    log = proc.stdout + proc.stderr

    # Step 1: 8 prompts x 2 samples = 8 rows per rank, sent in requests of 3, 3, 2 rows, with
    # the token; the logged server mean is the mean of what the server answered.
    step1 = [body for _, body in server.requests[:6]]
    assert sorted(len(b["query"]) for b in step1) == [2, 2, 3, 3, 3, 3]
    assert all(h["Authorization"] == "Bearer s3cret" for h, _ in server.requests)
    answered = [float(len(q)) for b in step1 for q in b["query"]]
    metrics = read_metrics(out / "metrics.jsonl")
    assert len(metrics) == 1, log[-3000:]  # step 2 never finished
    m = metrics[0]
    assert m["rewards/server/mean"] == pytest.approx(sum(answered) / 16)
    assert m["objective/scores"] == pytest.approx(
        0.5 * m["rewards/words/mean"] + 2.0 * m["rewards/server/mean"])  # weights
    assert 0 <= m["rewards/all_equal_groups"] <= 1

    # Step 2: rank 1's function raises; both ranks stop with its message, exit code 2.
    assert proc.returncode != 0 and "exits with return code = 2" in log
    message = (f"error: reward function '{fn}:words' (rewards[0]) raised RuntimeError: the "
               "grader crashed on a batch of 8 rows (no single row raises alone) (on rank 1)")
    assert log.count(message) == 1  # both ranks stop with it; rank 0 prints it, once
    assert "Traceback" not in log  # a clean exit on both ranks: no abort, no stack trace
    assert find_resume(out).name == "step_1"  # the last checkpoint is complete
