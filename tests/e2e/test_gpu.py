"""GPU-only checks (skipped without CUDA): bf16 PPO with a compiled, static-cache decode step."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from ds_rlhf.tracking import read_metrics
from tests.conftest import REPO, ppo_config, write_yaml

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


def test_bf16_ppo_with_compiled_static_cache_generation(assets, tmp_path):
    base = ppo_config(assets, tmp_path / "out")
    gpu = {"dtype": "bf16", "zero_stage": 3}
    cfg = ppo_config(assets, tmp_path / "out", actor={**base["actor"], **gpu},
                     critic={**base["critic"], **gpu},
                     generation={**base["generation"], "reuse_copy": True,
                                 "static_cache": True, "compile": True})
    path = write_yaml(cfg, tmp_path / "run.yaml")
    proc = subprocess.run([sys.executable, "-m", "ds_rlhf", "ppo", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert all(math.isfinite(v) for m in metrics for v in m.values())
