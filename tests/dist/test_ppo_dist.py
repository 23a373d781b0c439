"""PPO on real DeepSpeed engines in 2 CPU processes (gloo), through the real launcher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_rlhf.config import ModelConfig
from ds_rlhf.models import build_causal_lm
from ds_rlhf.tracking import read_metrics
from tests.conftest import ppo_config, run_deepspeed, tiny_init, write_yaml

pytestmark = pytest.mark.dist


def _ppo(assets, tmp_path, name: str, nproc: int, **sections):
    out = tmp_path / name
    cfg = write_yaml(ppo_config(assets, out, **sections), tmp_path / f"{name}.yaml")
    proc = run_deepspeed(nproc, ["ds_rlhf", "ppo", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc


def _check_sensible(metrics: list[dict], steps: int) -> None:
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        for key, value in m.items():
            assert math.isfinite(value), (key, value)
        assert 1 <= m["response_length/mean"] <= 8
        assert m["timing/step"] >= m["timing/generate"] + m["timing/train"]
    first = metrics[0]
    # One epoch, one minibatch: the update sees exactly the policy that sampled.
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/clipfrac_avg"] == 0.0
    assert first["policy/approxkl_avg"] < 1e-10
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # actor == reference at step 1
    assert metrics[-1]["objective/kl"] != 0.0  # ... and no longer after an update


def _shm_buffers() -> set:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_ppo_zero2_two_ranks(assets, tmp_path):
    before = _shm_buffers()
    out, proc = _ppo(assets, tmp_path, "z2", 2, ppo={"steps": 3, "rollout_batch_size": 8})
    # DeepSpeed's CPU all-reduce never unlinks its /dev/shm segments; we do, or every run
    # would leak one per rank until memory runs out.
    assert _shm_buffers() <= before
    _check_sensible(read_metrics(out / "metrics.jsonl"), 3)
    assert "step 3/3" in proc.stdout
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8 and {s["step"] for s in samples} == {1, 2, 3}


# Micro-batches packed by token count: 24 = data.max_prompt_len 16 + max_new_tokens 8, room
# for one longest sequence, so the rows per pass vary with the lengths sampled.
BY_TOKENS = {"micro_batch_tokens": 24}


@pytest.fixture(scope="module")
def zero3_runs(assets, tmp_path_factory):
    """The same ZeRO-3 config (actor and critic at ZeRO-3) on 1 and on 2 ranks, one step;
    and on 2 ranks with every role's micro-batches packed by tokens ("tokens")."""
    tmp = tmp_path_factory.mktemp("zero3")
    z3 = {"zero_stage": 3}
    base = ppo_config(assets, tmp)
    runs = {}
    for name, nproc, packing in ((1, 1, {}), (2, 2, {}), ("tokens", 2, BY_TOKENS)):
        runs[name] = _ppo(assets, tmp, f"n{name}", nproc,
                          actor={**base["actor"], **z3, **packing},
                          critic={**base["critic"], **z3, **packing},
                          ref={**base["ref"], **packing}, reward={**base["reward"], **packing},
                          ppo={"steps": 1, "rollout_batch_size": 8})[0]
    return runs


def test_ppo_zero3_sensible(zero3_runs):
    metrics = read_metrics(zero3_runs[2] / "metrics.jsonl")
    assert len(metrics) == 1
    for value in metrics[0].values():
        assert math.isfinite(value)
    assert metrics[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("other", [2, "tokens"])
def test_one_rank_equals_two_ranks(zero3_runs, other):
    """2 ranks (micro-batches by rows, or packed by tokens: another number of passes on each
    rank, in another row order) take the same step as 1 rank: the loss is normalised by the
    global token count, not per pass."""
    def samples(out):
        rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        return {r["prompt_index"]: r for r in rows}

    one, two = samples(zero3_runs[1]), samples(zero3_runs[other])
    assert sorted(one) == sorted(two) and len(one) == 8
    for index in one:  # token-identical rollouts, scores equal up to float round-off
        assert one[index]["response_ids"] == two[index]["response_ids"]
        assert one[index]["score"] == pytest.approx(two[index]["score"], abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(zero3_runs[1] / "actor").state_dict()
    b = AutoModelForCausalLM.from_pretrained(zero3_runs[other] / "actor").state_dict()
    assert a.keys() == b.keys()
    for name, value in a.items():  # actor after the first update
        torch.testing.assert_close(value, b[name], atol=1e-5, rtol=0)
    m1 = read_metrics(zero3_runs[1] / "metrics.jsonl")[0]
    m2 = read_metrics(zero3_runs[other] / "metrics.jsonl")[0]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key


def test_update_moves_the_actor(assets, zero3_runs):
    cfg = ppo_config(assets, zero3_runs[1])
    init = build_causal_lm(ModelConfig(**cfg["actor"]["model"]), "actor", "fp32", cfg["seed"])
    after = AutoModelForCausalLM.from_pretrained(zero3_runs[1] / "actor").state_dict()
    change = max((after[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert 1e-5 < change < 0.1  # one AdamW step of lr 1e-3 moves a weight by about lr


@pytest.mark.parametrize("packing", [{}, BY_TOKENS], ids=["rows", "tokens"])
def test_reward_position_and_uneven_lengths_zero3(assets, tmp_path, packing):
    """Packed by tokens, rank 0's short rows fit one pass and rank 1's long rows need several:
    the ranks must still run equally many ZeRO-3 forwards, or they hang."""
    z3 = {"zero_stage": 3}
    base = ppo_config(assets, tmp_path / "out")
    tied = {"model": {**base["actor"]["model"],
                      "init": {**tiny_init(assets["vocab_size"]), "tie_word_embeddings": True}}}
    cfg = ppo_config(assets, tmp_path / "out", actor={**base["actor"], **z3, **packing, **tied},
                     critic={**base["critic"], **z3, **packing},
                     ref={**base["ref"], **packing}, reward={**base["reward"], **packing},
                     ppo={"steps": 2, "rollout_batch_size": 8})
    path = write_yaml(cfg, tmp_path / "cfg.yaml")
    result_path = tmp_path / "result.json"
    proc = run_deepspeed(2, ["tests/dist/ppo_checks.py", str(path), str(result_path)],
                         module=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(result_path.read_text())

    # P = 4: row 0 ends in EOS at response position 2 -> sequence index 4 - 1 + 3 = 6;
    # row 1 fills all 5 positions -> index 4 - 1 + 5 = 8 (the last one).
    pos = result["reward_position"]
    assert pos["scores"][0] == pytest.approx(pos["per_token"][0][6], abs=1e-6)
    assert pos["scores"][1] == pytest.approx(pos["per_token"][1][8], abs=1e-6)
    # The classic bug: with pad == EOS, "last token != pad" is the token before the EOS.
    assert pos["scores"][0] != pytest.approx(pos["per_token"][0][5], abs=1e-6)

    by_rank = result["uneven"]["lengths_by_rank"]
    for mode in ("gather=True", "gather=False"):
        assert by_rank[0][mode] == [1, 1, 1, 1]  # stopped at once
        assert by_rank[1][mode] == [8, 8, 8, 8]  # ran to the limit
    for value in result["uneven"]["metrics"].values():
        assert math.isfinite(value)

    # The HybridEngine's copy holds the training weights (also after an update), one storage
    # for the tied embedding and LM head, and nothing once generation mode is left.
    for key in ("hybrid_before", "hybrid_after"):
        assert result[key] == {"equal": True, "tied": True, "gathered": True,
                               "numel_after": 0}
    # Scoring forwards of the trained ZeRO-3 engines no longer break their prefetch traces.
    assert result["traces_complete"] == {"actor": True, "critic": True}
    # A step's all-gathers: one per trained engine after its optimizer step, of all its
    # (persistent) parameters' partitions at once; DeepSpeed issued one per parameter, and
    # the training forwards re-gathered what the scoring forwards had released.
    gathers = result["all_gathers"]
    assert sorted(gathers["calls"]) == sorted(gathers["persistent_numel"].values())
