"""The README's first command: launch/demo.sh runs SFT -> RM -> PPO, and DPO, on 2 CPU ranks."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, cpu_env

pytestmark = pytest.mark.e2e


def test_demo_pipeline_beats_sft_by_0_3(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", "launch/demo.sh"], cwd=REPO, capture_output=True, text=True,
                          env=cpu_env(OUTPUT_DIR=str(out)), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rm_eval_accuracy"] >= 0.85
    assert summary["gold_score_ppo"] - summary["gold_score_sft"] >= 0.3
    assert summary["gold_score_dpo"] - summary["gold_score_sft"] >= 0.3
    assert summary["dpo_eval_accuracy"] >= 0.85  # implicit-reward accuracy on held-out pairs
    assert summary["kl_final"] > 0 and summary["wall_s"] < 900
    assert "gold score, PPO policy" in proc.stdout  # the human summary
    assert "gold score, DPO policy" in proc.stdout
    for step in ("sft", "rm", "ppo", "dpo"):
        assert (out / step / "metrics.jsonl").is_file()
