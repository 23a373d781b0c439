"""LoRA through PPO on 2 CPU ranks: merged generation equals unmerged, export is merged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_rlhf.config import ModelConfig
from ds_rlhf.models import build_causal_lm
from ds_rlhf.tracking import read_metrics
from tests.conftest import ppo_config, run_deepspeed, write_yaml

pytestmark = pytest.mark.dist


def test_lora_actor_through_ppo_zero3(assets, tmp_path):
    out = tmp_path / "out"
    base = ppo_config(assets, out)
    lora = {"zero_stage": 3, "lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-2}
    cfg = ppo_config(assets, out, actor={**base["actor"], **lora}, ppo={"steps": 3})
    path = write_yaml(cfg, tmp_path / "cfg.yaml")
    proc = run_deepspeed(2, ["tests/dist/lora_checks.py", str(path), str(tmp_path / "r.json")],
                         module=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "r.json").read_text())

    metrics = read_metrics(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(v) for m in metrics for v in m.values())
    assert metrics[-1]["objective/kl"] != 0.0  # the adapters moved the policy
    for rank in ranks:
        # Only the adapters train: a small share of the weights.
        assert 0 < rank["trainable"] < 0.25 * rank["total"]
        # Greedy generation with merged adapters == through the unmerged model, token for token.
        mask = torch.tensor(rank["merged_mask"]).bool()
        merged = torch.tensor(rank["merged"])
        unmerged = torch.tensor(rank["unmerged"])[:, :merged.shape[1]]
        assert torch.equal(merged[mask], unmerged[mask])

    exported = AutoModelForCausalLM.from_pretrained(out / "actor")
    assert not any("lora" in name for name in exported.state_dict())
    initial = build_causal_lm(ModelConfig(**cfg["actor"]["model"]), "actor", "fp32", cfg["seed"])
    changed = [name for name, value in initial.state_dict().items()
               if not torch.allclose(value, exported.state_dict()[name])]
    # Merged updates land in the adapted linear layers only; embeddings and norms are frozen.
    assert changed and all("proj" in name for name in changed)
    assert not any("embed" in name or "norm" in name for name in changed)
