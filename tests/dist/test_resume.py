"""Checkpoints, exact resume and preemption of PPO on 2 CPU ranks, through the real launcher."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ds_rlhf.checkpoint import find_resume
from ds_rlhf.tracking import read_metrics
from tests.conftest import REPO, cpu_env, launcher_cmd, ppo_config, run_deepspeed, write_yaml

pytestmark = pytest.mark.dist
STEPS = 12
KEYS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg",
        "loss/value_avg", "policy/approxkl_avg", "response_length/mean")


def _launch(cfg_path, *extra) -> subprocess.Popen:
    cmd = launcher_cmd(2, ["ds_rlhf", "ppo", "--config", str(cfg_path), *extra])
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """An uninterrupted run of STEPS steps, and the same run preempted then resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    full = write_yaml(ppo_config(assets, tmp / "full", ppo={"steps": STEPS}), tmp / "full.yaml")
    proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(full)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cut = write_yaml(ppo_config(assets, tmp / "cut", ppo={"steps": STEPS},
                                checkpoint={"keep_last": 1}), tmp / "cut.yaml")
    launcher = _launch(cut)
    metrics = tmp / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
        time.sleep(0.05)
    # Preempt one worker only (rank 1), the way a scheduler's signal may reach one process.
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGUSR1)
    out, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, out[-3000:]
    assert "preempted: saved step" in out
    stopped_at = len(read_metrics(metrics))
    assert 2 <= stopped_at < STEPS, "the run finished before the signal; make steps slower"

    resumed = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(cut)])  # the same command
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {tmp / 'cut' / 'checkpoints' / f'step_{stopped_at}'}" in resumed.stdout
    return {"full": tmp / "full", "cut": tmp / "cut", "stopped_at": stopped_at, "tmp": tmp,
            "cut_yaml": cut}


def test_preempted_and_resumed_run_equals_uninterrupted_run(runs):
    full = read_metrics(runs["full"] / "metrics.jsonl")
    cut = read_metrics(runs["cut"] / "metrics.jsonl")
    assert [m["step"] for m in cut] == list(range(1, STEPS + 1))  # no step logged twice
    for a, b in zip(full, cut, strict=True):
        for key in KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit-identical in fp32


def test_checkpoint_layout_and_rotation(runs):
    root = runs["cut"] / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{STEPS}"
    steps = sorted(p.name for p in root.glob("step_*"))
    assert steps == [f"step_{STEPS}"]  # keep_last: 1, older ones deleted after the new one
    state = json.loads((root / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert state["consumed_prompts"] == STEPS * 8
    assert {"sampler", "kl_ctl"} <= state.keys()
    assert (runs["cut"] / "actor" / "config.json").is_file()  # HF export at the end


def test_other_world_size_converts_to_universal_and_resumes(runs):
    proc = subprocess.run([sys.executable, "-m", "ds_rlhf", "ppo", "--config",
                           str(runs["cut_yaml"])], cwd=REPO, env=cpu_env(), text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_dir = runs["cut"] / "checkpoints" / f"step_{STEPS}"
    assert f"{step_dir} was written by 2 ranks; converting it" in proc.stdout
    assert f"resumed from {step_dir} at step {STEPS}" in proc.stdout
    assert {"actor", "critic"} <= {p.name for p in (step_dir / "universal").iterdir()}
    assert (step_dir / "trainer_state.json").is_file()


def test_incomplete_latest_falls_back_to_previous_complete_step(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        (root / f"step_{step}" / "actor").mkdir(parents=True)
        if complete:
            (root / f"step_{step}" / "trainer_state.json").write_text("{}")
    (root / "latest").write_text("step_6")  # a crash after latest moved is impossible, but a
    assert find_resume(tmp_path) == root / "step_4"  # crash mid-save leaves step_6 like this
    (root / "latest").write_text("step_2")
    assert find_resume(tmp_path) == root / "step_2"
    assert find_resume(tmp_path / "nothing") is None


@pytest.mark.parametrize("placement", ["colocated", "separate"])
def test_a_lagged_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(
        assets, tmp_path, placement):
    """rollout.staleness 1, the whole job killed (SIGKILL, no chance to save) once step 2 is
    saved: the same command resumes from step 2 with the rollout of step 3 from its FIFO
    and ends with the metrics of the uninterrupted run, bit for bit. Separate: 1 training +
    1 generation rank, killed while the weights W_2 are in transit (step 3 sends them; the
    generation rank holds off taking them for 3 s, tests/dist/faulty_pool.py, and the kill
    comes in that window); the checkpoint had taken back what the pool made before."""
    steps = 4
    pool = {"placement": placement, "generation_ranks": 1} if placement == "separate" else {}
    (tmp_path / "reward_fn.py").write_text(  # a rule with spread inside groups, no model
        "def char_code(prompts, completions, **columns):\n"
        "    return [sum(map(ord, c)) % 7 / 7 for c in completions]\n")

    def config(name: str) -> Path:
        cfg = ppo_config(
            assets, tmp_path / name, rollout={"staleness": 1, **pool},
            ppo={"steps": steps, "rollout_batch_size": 8, "advantage_estimator": "rloo",
                 "rollout_correction": "tis", "kl_coef": 0.0},
            generation={"max_new_tokens": 8, "batch_size": 8, "n_samples_per_prompt": 2},
            rewards=[{"function": f"{tmp_path / 'reward_fn.py'}:char_code"}],
            checkpoint={"save_every": 1})
        del cfg["critic"], cfg["reward"]
        return write_yaml(cfg, tmp_path / f"{name}.yaml")

    full = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(config("full"))])
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    killed = config("killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    in_transit = tmp_path / "in_transit"
    module = placement == "colocated"  # ds_rlhf, or its faulty pool
    command = ["ds_rlhf" if module else "tests/dist/faulty_pool.py", "ppo", "--config",
               str(killed)]
    fault = {} if module else {"FAULT": "slow_weights", "SLOW_VERSION": "2",
                               "IN_TRANSIT": str(in_transit)}
    launcher = subprocess.Popen(launcher_cmd(2, command, module=module), cwd=REPO,
                                env=cpu_env(**fault), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (latest.exists() and latest.read_text().strip() == "step_2" and
               (module or in_transit.exists())):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
        time.sleep(0.02)
    for p in [*psutil.Process(launcher.pid).children(recursive=True), launcher]:
        p.kill()
    launcher.wait(timeout=60)
    if not module:  # killed in the transfer of step 3, before step 3 could be saved
        assert latest.read_text().strip() == "step_2"
        in_transit.unlink()
    resumed = run_deepspeed(2, command, module=module, **fault)  # the same command
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("full", "killed"))
    assert [m["step"] for m in b] == list(range(1, steps + 1))  # no step logged twice
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if not key.startswith(("timing/", "perf/", "weights/transfer_gb")):
                assert y[key] == value, (x["step"], key)
