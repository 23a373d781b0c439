"""Non-finite reward scores and losses on 2 CPU ranks, through the real launcher: NaN-scored
rows are dropped and counted (or stop the run); a minibatch whose every micro-batch
was skipped takes no optimizer step; a run that trains nothing stops; metrics.jsonl stays
strict JSON. The NaN run uses a GPT-2 (Conv1D, tied embeddings) LoRA actor at ZeRO-3 and
exports actor and critic, so GPT-2 LoRA through PPO and export, and the critic export read
the standard HF way, are checked on the same run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ds_rlhf.config import ModelConfig
from ds_rlhf.models import build_scalar_model, sequence_inputs
from tests.conftest import ppo_config, run_deepspeed, write_yaml

pytestmark = pytest.mark.dist


def _strict_rows(path) -> list[dict]:
    """JSON lines read by a strict parser: NaN / Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path}: non-JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _gpt2(vocab_size: int) -> dict:
    return {"model_type": "gpt2", "vocab_size": vocab_size, "n_embd": 32, "n_layer": 2,
            "n_head": 4, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}


def test_nan_scores_drop_rows_gpt2_lora_ppo_and_exports(assets, tmp_path):
    out = tmp_path / "skip"
    gpt2 = {"init": _gpt2(assets["vocab_size"]), "tokenizer": assets["tokenizer"]}
    base = ppo_config(assets, out)
    cfg = ppo_config(
        assets, out, ppo={"steps": 3, "nonfinite": "skip"},
        actor={**base["actor"], "model": gpt2, "zero_stage": 3, "lora_rank": 4,
               "lora_alpha": 8.0, "lr": 1e-2},
        critic={**base["critic"], "model": gpt2}, checkpoint={"export_critic": True})
    proc = run_deepspeed(2, ["tests/dist/score_inject.py", "ppo", "--config",
                             str(write_yaml(cfg, tmp_path / "skip.yaml"))], module=False,
                         timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = _strict_rows(out / "metrics.jsonl")
    samples = _strict_rows(out / "samples.jsonl")
    assert len(metrics) == 3
    for m in metrics:  # every NaN row counted once, over both ranks; the rest trained
        nan_rows = [s for s in samples if s["step"] == m["step"] and s["score"] is None]
        assert all(s["prompt_index"] % 6 == 0 for s in nan_rows)
        assert m["train/nonfinite_score_rows"] == len(nan_rows)
        assert m["train/skipped_minibatches"] == 0 and m["train/skipped_microbatches"] == 0
    assert sum(m["train/nonfinite_score_rows"] for m in metrics) > 0
    assert metrics[-1]["objective/kl"] != 0.0  # the LoRA actor moved

    # GPT-2 LoRA export: merged (no adapter names), loads with plain transformers, trained.
    actor = AutoModelForCausalLM.from_pretrained(out / "actor")
    assert not any("lora" in name for name in actor.state_dict())
    assert actor.lm_head.weight.data_ptr() == actor.transformer.wte.weight.data_ptr()
    initial = AutoModelForCausalLM.from_config(actor.config)
    assert initial.num_parameters() == actor.num_parameters()
    assert all(torch.isfinite(p).all() for p in actor.parameters())

    # The critic export, called the standard way on a right-padded batch of EOS-terminated
    # rows of different lengths (padded with the exported tokenizer's pad), scores the EOS,
    # as the training read (ScalarHeadModel at the last real token, found from lengths) does.
    tokenizer = AutoTokenizer.from_pretrained(out / "critic")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    classifier = AutoModelForSequenceClassification.from_pretrained(out / "critic").eval()
    assert classifier.config.pad_token_id == pad
    critic = build_scalar_model(ModelConfig(path=str(out / "critic")), "critic", "fp32", 0,
                                eos).eval()
    rows = [[5, 6, 7, eos], [8, 9, eos], [10, 11, 12, 13, 14, eos]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        standard = classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        per_token = critic(*sequence_inputs(ids[:, :0], mask[:, :0], ids, mask))
    training = per_token.gather(1, (mask.sum(1) - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(standard, training, atol=1e-5, rtol=1e-5)


def test_all_skipped_minibatch_takes_no_step_and_untrained_run_stops(assets, tmp_path):
    out = tmp_path / "checks"
    base = ppo_config(assets, out)
    warm = {"warmup_steps": 8}  # a scheduler whose every step changes the learning rate
    cfg = ppo_config(assets, out, actor={**base["actor"], **warm},
                     critic={**base["critic"], **warm}, ppo={"max_untrained_steps": 2})
    proc = run_deepspeed(2, ["tests/dist/nonfinite_checks.py",
                             str(write_yaml(cfg, tmp_path / "c.yaml")), str(tmp_path / "r.json")],
                         module=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in json.loads((tmp_path / "r.json").read_text()):
        skip, nxt, stopped = rank["skip"], rank["next"], rank["stopped"]
        # 1. Both actor micro-batches skipped on both ranks: no actor step at all.
        assert skip["skipped_minibatches"] == 1 and skip["skipped_microbatches"] == 2
        assert skip["identical"] and skip["scheduler_same"]
        assert skip["global_steps"] == [2, 2] and skip["lr"][0] == skip["lr"][1] > 0
        assert skip["critic_steps"] == 3  # the critic's loss was fine: it stepped
        # 2. The actor's third step, at the learning rate of a third step (the critic's).
        assert nxt["changed"] and nxt["global_steps"] == 3 and nxt["skipped_minibatches"] == 0
        assert nxt["lr"] == pytest.approx(skip["critic_lr"]) and nxt["lr"] > skip["lr"][0]
        # 3. All scores NaN: 2 steps that train nothing, then the stop.
        assert stopped is not None and stopped["steps"] == 2 and stopped["actor_steps"] == 3
        assert "no optimizer step in the last 2 PPO steps" in stopped["message"]
        # 4. ppo.nonfinite: stop: one NaN score on one rank stops both.
        assert rank["stop"] is not None
        assert "NaN/inf scores to 1 of 8 rows" in rank["stop"]
        assert "ppo.nonfinite: skip" in rank["stop"]
    metrics = _strict_rows(out / "metrics.jsonl")
    assert [m["train/nonfinite_score_rows"] for m in metrics] == [8, 8]  # steps 5, 6
    assert metrics[-1]["objective/scores"] is None  # no row left to average: null, not NaN


def test_bad_input_is_printed_once_on_two_ranks(assets, tmp_path):
    out = tmp_path / "bad"
    missing = str(tmp_path / "no_such_model")
    cfg = ppo_config(assets, out, reward={"model": {"path": missing}, "zero_stage": 3})
    proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config",
                             str(write_yaml(cfg, tmp_path / "bad.yaml"))], timeout=120)
    log = proc.stdout + proc.stderr
    assert "exits with return code = 2" in log, log[-3000:]
    assert log.count(f"reward.model.path: directory '{missing}' not found") == 1
    assert "Traceback" not in log and not out.exists()
