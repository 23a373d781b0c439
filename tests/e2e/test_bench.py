"""`ds-rlhf bench`: its inputs, and a critic-free run (the PPO runs are in
tests/e2e/test_gpu_check.py)."""

from __future__ import annotations

import json

import pytest

from ds_rlhf import bench
from tests.conftest import run_deepspeed

pytestmark = pytest.mark.e2e


def test_bench_refuses_a_critic_with_another_vocabulary(tmp_path, capsys):
    critic = {**bench.PRESETS["micro"]["actor"], "vocab_size": 1000}  # the actor's is 512
    (tmp_path / "critic.json").write_text(json.dumps(critic))
    code = bench.main(["ppo", "--preset", "micro", "--critic-config",
                       str(tmp_path / "critic.json")])
    assert code == 2  # before any engine or process group
    err = capsys.readouterr().err
    assert "vocab_size 1000" in err and "512" in err and "--critic-config" in err


def test_bench_refuses_a_config_without_model_type(tmp_path, capsys):
    (tmp_path / "actor.json").write_text(json.dumps({"hidden_size": 8, "vocab_size": 16}))
    assert bench.main(["ppo", "--config", str(tmp_path / "actor.json")]) == 2
    assert "model_type" in capsys.readouterr().err


def test_bench_refuses_a_negative_vs_hf(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.build_parser().parse_args(["ppo", "--vs-hf", "-1"])
    assert stop.value.code == 2
    assert "--vs-hf" in capsys.readouterr().err


def test_matched_tokenizer_decodes_every_id():
    tokenizer = bench.matched_tokenizer(300)
    assert len(tokenizer) == 300 and tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    ids = tokenizer("t2 t299 t150")["input_ids"]
    assert ids == [2, 299, 150]  # one word, one token
    assert tokenizer.decode([5, 299]) == "t5 t299"


def test_model_from_a_config_json(tmp_path):
    actor = {**bench.PRESETS["micro"]["actor"], "hidden_size": 48}
    (tmp_path / "actor.json").write_text(json.dumps(actor))
    assert bench.load_model_config(str(tmp_path / "actor.json"), None, "--config") == actor
    args = bench.build_parser().parse_args(
        ["ppo", "--config", str(tmp_path / "actor.json"), "--zero-stage", "2,3",
         "--micro-batch-tokens", "0,64"])
    assert args.zero_stage == [2, 3] and args.micro_batch_tokens == [0, 64]
    args.prompt_len, args.response_len, args.dtype, args.micro_batch = 8, 8, "fp32", 4
    args.gen_batch, args.batch = 4, 4
    cfg = bench._ppo_config(args, actor, actor, bench.Variant(3, 64), tmp_path,
                            tmp_path / "out")
    # The JSON's model with room for prompt + response; ZeRO-3 actor and critic, frozen
    # roles at ZeRO-3 too, every role packed by tokens.
    assert cfg["actor"]["model"]["init"] == {**actor, "max_position_embeddings": 64}
    assert [cfg[r]["zero_stage"] for r in ("actor", "critic", "ref", "reward")] == [3] * 4
    assert {cfg[r]["micro_batch_tokens"] for r in ("actor", "critic", "ref", "reward")} == {64}


def test_bench_grpo_builds_only_the_actor():
    """Critic-free, scored by a rule: the bench builds the actor alone and reports it."""
    proc = run_deepspeed(2, [
        "ds_rlhf", "bench", "ppo", "--preset", "tiny", "--batch", "4", "--prompt-len", "16",
        "--response-len", "16", "--steps", "2", "--estimator", "grpo", "--n-samples", "2",
        "--reward", "function", "--staleness", "0,1"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    result = json.loads(lines[0])
    assert result["rollout_batch"] == 4 * 2 * 2  # prompts per rank x ranks x samples
    assert (result["estimator"], result["n_samples"]) == ("grpo", 2)
    assert result["engines"] == ["actor"] and result["critic_params_m"] is None
    assert list(result["runs"]) == ["zero2", "zero2_lag1"]
    lagged = result["runs"].pop("zero2_lag1")  # rollout.staleness 1: the same ranks, ahead
    assert lagged["staleness"] == 1 and not lagged["on_policy_shortcut"]
    assert lagged["time_split_s"]["actor_logprobs"] > 0  # the old logprobs' own forward
    (run,) = result["runs"].values()
    assert run["staleness"] == 0
    assert list(run["engines"]) == ["actor"] and run["engines"]["actor"]["trained"]
    assert run["time_split_s"]["critic_train"] == 0.0
    # One optimizer step per rollout, no KL: the old logprobs come from the training forward
    assert run["on_policy_shortcut"] and run["time_split_s"]["actor_logprobs"] == 0.0
    # every phase, named as always, and the hf loop's two parts of generate
    assert set(run["time_split_s"]) == set(bench.PHASES) | {"prefill", "decode"}
    split = run["time_split_s"]
    assert 0 < split["prefill"] and 0 < split["decode"]
    assert split["prefill"] + split["decode"] <= split["generate"]
    assert run["finished_row_steps_share"] == 0.0  # fixed lengths: no row ends early
    assert run["share_prompt_prefill"] and run["compact_finished_rows"]  # the defaults
    assert run["trained_over_frozen_scoring"] is None  # no frozen engine to compare with
    assert run["samples_per_s"] > 0 and 0.95 <= run["time_split_sum_over_step"] <= 1.0
    assert len(result["peak_memory_gb_per_rank"]) == 2
