"""A NaN loss on one rank is seen by all ranks, which skip it together or stop together."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_rlhf.tracking import read_metrics
from tests.conftest import ppo_config, run_deepspeed, write_yaml

pytestmark = pytest.mark.dist


def _inject(assets, tmp_path, mode: str):
    out = tmp_path / mode
    cfg = write_yaml(ppo_config(assets, out, ppo={"steps": 3, "nonfinite": mode}),
                     tmp_path / f"{mode}.yaml")
    return out, run_deepspeed(2, ["tests/dist/nan_inject.py", "ppo", "--config", str(cfg)],
                              module=False, timeout=300)


def test_nan_loss_on_one_rank_is_skipped_on_all(assets, tmp_path):
    out, proc = _inject(assets, tmp_path, "skip")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    # rank 1's 3rd actor micro-batch is step 2's first: one micro-batch skipped on each rank.
    assert [m["train/skipped_microbatches"] for m in metrics] == [0.0, 1.0, 0.0]
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    actor = AutoModelForCausalLM.from_pretrained(out / "actor")
    assert all(torch.isfinite(p).all() for p in actor.parameters())


def test_nan_loss_on_one_rank_stops_all_with_exit_code_3(assets, tmp_path):
    out, proc = _inject(assets, tmp_path, "stop")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert log.count("stopped: non-finite loss on 1 rank(s)") == 1  # printed once, by rank 0
    assert "exits with return code = 3" in log
    assert len(read_metrics(out / "metrics.jsonl")) == 1  # step 1 logged, step 2 never
