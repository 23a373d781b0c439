"""What happens when things go wrong around a run, through the real launcher on CPU ranks:
a damaged checkpoint, a second run on the same output_dir, a stalled rank, a full disk, another
world size on resume, the `deepspeed` command itself being stopped, a variable missing on one
rank and a failed write of rank 0 during a save.

One 2-rank PPO run with a checkpoint every step (`base`) serves several checks: copies of its
output_dir are damaged, locked, or resumed on 1 rank.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_rlhf.checkpoint import find_resume
from ds_rlhf.demo.task import all_prompts
from ds_rlhf.tracking import read_metrics
from tests.conftest import (
    REPO,
    cpu_env,
    free_port,
    ppo_config,
    run_deepspeed,
    tiny_init,
    write_yaml,
)

pytestmark = pytest.mark.dist
STEPS = 3
SAME = ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg",
        "loss/value_avg", "policy/approxkl_avg", "response_length/mean")


def _popen(nproc: int, args: list[str], log: Path, **env) -> subprocess.Popen:
    """The deepspeed command in the background, its output to `log`."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), "--module", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(**env), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc: subprocess.Popen | None, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"exited before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _workers(launcher_pid: int) -> list[psutil.Process]:
    """The rank processes under a deepspeed command, by rank."""
    procs = [p for p in psutil.Process(launcher_pid).children(recursive=True)
             if "--local_rank=" in " ".join(p.cmdline())]
    return sorted(procs, key=lambda p: " ".join(p.cmdline()).split("--local_rank=")[1])


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*") if p.is_file()}


def _same_actor(a: Path, b: Path, atol: float) -> None:
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        torch.testing.assert_close(value, sb[name], atol=atol, rtol=0)


def _resume_copy(src: Path, dst: Path, step: int) -> None:
    """dst as src's run was when preempted at `step`: that checkpoint and the metrics to it."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")
    (dst / "checkpoints" / "latest").write_text(f"step_{step}")
    rows = (src / "metrics.jsonl").read_text().splitlines()[:step]
    (dst / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory) -> dict:
    """PPO, 2 ranks, STEPS steps, a checkpoint after every step (all kept)."""
    tmp = tmp_path_factory.mktemp("safety")
    cfg = ppo_config(assets, tmp / "base", ppo={"steps": STEPS},
                     checkpoint={"save_every": 1, "keep_last": STEPS})
    proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(write_yaml(cfg, tmp / "b.yaml"))])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "out": tmp / "base", "cfg": cfg}


def test_damaged_checkpoint_falls_back_and_a_second_run_is_refused(base, assets):
    tmp, out = base["tmp"], base["tmp"] / "damaged"
    shutil.copytree(base["out"], out,  # without the export, which the run writes again
                    ignore=lambda d, _: ["actor", "run.lock"] if Path(d) == base["out"] else [])
    broken = out / "checkpoints" / f"step_{STEPS}" / "actor" / "mp_rank_00_model_states.pt"
    size = broken.stat().st_size
    with broken.open("r+b") as f:  # an interrupted copy: the second half is gone
        f.truncate(size // 2)
    metrics = out / "metrics.jsonl"
    metrics.write_text("".join(x + "\n" for x in metrics.read_text().splitlines()[:2]))
    cfg = write_yaml({**base["cfg"], "output_dir": str(out)}, tmp / "damaged.yaml")

    log = tmp / "first.log"
    first = _popen(2, ["ds_rlhf", "ppo", "--config", str(cfg)], log)
    _wait_for(lambda: "resumed from" in log.read_text(), first, "the resume")
    ranks = _workers(first.pid)
    for p in ranks:  # hold the first run still while the second one tries
        p.send_signal(signal.SIGSTOP)
    try:
        before = _snapshot(out)
        second = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(cfg)], timeout=240)
        assert _snapshot(out) == before  # nothing read-and-rewritten, truncated or deleted
    finally:
        for p in ranks:
            p.send_signal(signal.SIGCONT)
    text = second.stdout + second.stderr
    refusal = (f"is in use by another run: PID {ranks[0].pid} on host "
               f"{socket.gethostname()}")
    assert text.count(refusal) == 1, text[-3000:]  # one line, from rank 0 only
    assert "exits with return code = 2" in text and "Traceback" not in text

    assert first.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("skipping damaged") == 1
    assert f"{broken} has {size // 2} bytes, the manifest says {size}" in text
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in text
    full, resumed = read_metrics(base["out"] / "metrics.jsonl"), read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed, strict=True):
        for key in SAME:
            assert a[key] == b[key], (a["step"], key)  # same world size: bit-identical
    assert (out / "run.lock").read_text() == ""  # released at the end


def test_ppo_resumes_on_another_world_size(base):
    """Preempted at step 1 on 2 ranks, resumed on 1: the same run as uninterrupted on 2."""
    out = base["tmp"] / "elastic"
    _resume_copy(base["out"], out, 1)
    cfg = write_yaml({**base["cfg"], "output_dir": str(out)}, base["tmp"] / "elastic.yaml")
    proc = run_deepspeed(1, ["ds_rlhf", "ppo", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "was written by 2 ranks; converting it to DeepSpeed's universal format" in proc.stdout
    full, resumed = read_metrics(base["out"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed, strict=True):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    _same_actor(base["out"] / "actor", out / "actor", atol=1e-5)
    state = json.loads((out / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["sampler"] == json.loads(
        (base["out"] / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text()
    )["sampler"]


def test_sft_resumes_on_another_world_size(assets, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": f" {item}"}) + "\n"
                            for p, item in all_prompts()[:64]))

    def config(out: Path) -> Path:
        return write_yaml({
            "output_dir": str(out), "seed": 3,
            "model": {"model": {"init": tiny_init(assets["vocab_size"]),
                                "tokenizer": assets["tokenizer"]},
                      "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-2},
            "data": {"datasets": [{"path": str(data), "format": "prompt_completion"}],
                     "max_prompt_len": 16, "max_len": 24},
            "train": {"max_steps": STEPS, "batch_size": 8, "log_every": 1},
            "checkpoint": {"save_every": 1, "keep_last": STEPS}}, out.with_suffix(".yaml"))

    two = run_deepspeed(2, ["ds_rlhf", "sft", "--config", str(config(tmp_path / "two"))])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    _resume_copy(tmp_path / "two", tmp_path / "one", 1)
    one = run_deepspeed(1, ["ds_rlhf", "sft", "--config", str(config(tmp_path / "one"))])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(
        tmp_path / "one" / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        assert y["train/loss"] == pytest.approx(x["train/loss"], abs=1e-5), x["step"]
    _same_actor(tmp_path / "two" / "model", tmp_path / "one" / "model", atol=1e-5)


def test_stalled_rank_ends_every_rank_within_the_timeout(assets, tmp_path):
    timeout_s = 12
    cfg = write_yaml(ppo_config(assets, tmp_path / "out", ppo={"steps": 50},
                                distributed={"timeout_minutes": timeout_s / 60}),
                     tmp_path / "c.yaml")
    log = tmp_path / "stall.log"
    launcher = _popen(2, ["ds_rlhf", "ppo", "--config", str(cfg)], log)
    metrics = tmp_path / "out" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, launcher,
              "step 1")
    rank0, rank1 = _workers(launcher.pid)
    rank1.send_signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        rank0.wait(timeout=timeout_s + 30)
        waited = time.time() - stopped
    finally:
        rank1.send_signal(signal.SIGCONT)  # back, it finds its peer gone and leaves as well
    assert launcher.wait(timeout=60) != 0
    text = log.read_text()
    assert timeout_s - 1 < waited < timeout_s + 30, waited
    assert "rank 0 gave up waiting for the other ranks in phase 'step " in text, text[-3000:]
    assert "distributed.timeout_minutes=0.2" in text and "exits with return code = 4" in text


def test_full_disk_stops_with_the_path_and_the_space(assets, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        out = disk / "run"
        cfg = write_yaml(ppo_config(assets, out, checkpoint={"save_every": 1}),
                         tmp_path / "c.yaml")
        proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(cfg)], timeout=240)
        text = proc.stdout + proc.stderr
        step_dir = out / "checkpoints" / "step_1"
        assert proc.returncode != 0 and "exits with return code = 2" in text, text[-3000:]
        assert text.count(f"error: saving {step_dir} failed (") == 1, text[-3000:]
        assert f"free on {out / 'checkpoints'} (no space left" in text
        assert "No checkpoint was saved before" in text and "Traceback" not in text
        assert not step_dir.exists()  # the partial save is removed, freeing its space
        assert len(read_metrics(out / "metrics.jsonl")) == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_stopping_the_deepspeed_command_stops_the_run(assets, tmp_path):
    """SIGTERM to `deepspeed` ends it at once (it forwards nothing in a single-node run); its
    workers notice at the next step boundary. Here that is before the first step."""
    out = tmp_path / "out"
    cfg = write_yaml(ppo_config(assets, out), tmp_path / "c.yaml")
    log = tmp_path / "log"
    runner = _popen(1, ["ds_rlhf", "ppo", "--config", str(cfg)], log)
    lock = out / "run.lock"
    _wait_for(lambda: lock.is_file() and lock.read_text(), runner, "the run's start")
    [worker] = _workers(runner.pid)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == -signal.SIGTERM
    worker.wait(timeout=120)
    text = log.read_text()
    assert f"the launching command (PID {runner.pid}) is gone" in text, text[-3000:]
    assert "preempted: stopped before the first step; nothing to save" in text
    assert "saved step" not in text and not (out / "checkpoints").exists()


def test_a_variable_missing_on_one_rank_stops_every_rank_with_its_name(assets, tmp_path):
    """Rank 1 lacks the reward server's token variable (as a node the deepspeed launcher did
    not forward it to): every rank stops at the start with exit code 2, and rank 0 prints
    the missing variable once, naming rank 1 and its host. Before, rank 1 exited silently."""
    cfg = ppo_config(assets, tmp_path / "out", ppo={"advantage_estimator": "grpo", "kl_coef": 0.0},
                     generation={"n_samples_per_prompt": 2},
                     rewards=[{"url": "http://127.0.0.1:9/score", "token_env": "RM_TOKEN"}])
    del cfg["critic"], cfg["reward"]
    start = time.time()
    proc = run_deepspeed(2, ["tests/dist/fault_inject.py", "ppo", "--config",
                             str(write_yaml(cfg, tmp_path / "c.yaml"))], module=False,
                         timeout=240, RM_TOKEN="s3cret", UNSET_ON_RANK="1", VARS="RM_TOKEN")
    text = proc.stdout + proc.stderr
    message = (f"ds-rlhf ppo: error: rank 1 (host {socket.gethostname()}): environment "
               "variable RM_TOKEN (rewards[0].token_env) not set or empty; export it on every "
               "node")
    assert text.count(message) == 1, text[-3000:]
    assert "exits with return code = 2" in text and "Traceback" not in text
    assert "deepspeed.initialize" not in text  # no engine was built
    assert time.time() - start < 200  # seconds of work, not distributed.timeout_minutes


def test_a_failed_manifest_write_stops_every_rank_and_keeps_the_last_checkpoint(
        assets, tmp_path):
    """Rank 0's manifest write of step 2 fails (full disk): before, rank 0 died with a
    traceback while rank 1 waited at the barrier; now every rank stops with one message and
    step 1 stays the checkpoint to resume from."""
    out = tmp_path / "out"
    cfg = write_yaml(ppo_config(assets, out, ppo={"steps": 3}, checkpoint={"save_every": 1}),
                     tmp_path / "c.yaml")
    proc = run_deepspeed(2, ["tests/dist/fault_inject.py", "ppo", "--config", str(cfg)],
                         module=False, timeout=300, FAIL_MANIFEST_STEP="2")
    text = proc.stdout + proc.stderr
    root = out / "checkpoints"
    message = (f"ds-rlhf ppo: error: saving {root / 'step_2'} failed (rank 0: [Errno 28] No "
               f"space left on device: '{root / 'step_2' / 'manifest.json'}');")
    assert text.count(message) == 1, text[-3000:]
    assert f"The previous checkpoint {root / 'step_1'} is intact" in text
    assert "exits with return code = 2" in text and "Traceback" not in text
    assert find_resume(out) == root / "step_1" and not (root / "step_2").exists()
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_work_of_rank_0_outlasts_the_collective_timeout_when_untimed():
    """The universal conversion of a large checkpoint runs on rank 0 inside
    Coordinator.on_main_untimed: the others wait past distributed.timeout_minutes for it."""
    proc = run_deepspeed(2, ["tests/dist/peer_checks.py", "untimed"], module=False,
                         timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (the two ranks' lines may interleave)
    waited = [float(s) for s in re.findall(r"rank [01]: converted after ([\d.]+) s", proc.stdout)]
    assert len(waited) == 2 and min(waited) > 7.5, proc.stdout[-3000:]


@pytest.mark.parametrize("group", ["engine", "vllm_tp"])
def test_a_rank_stalled_in_any_group_of_the_run_ends_the_others_within_the_timeout(group):
    """The process groups a run makes besides the world's give up after
    distributed.timeout_minutes (3 s here) too, not after torch's default 30 minutes for new
    groups: DeepSpeed's clone of the world group, over which the engines reduce gradients
    and gather ZeRO-3 weights, and the vLLM backend's tensor-parallel groups. Rank 1 stalls
    for 25 s while rank 0 waits in one of them (torch's default would hold it 30 minutes)."""
    proc = run_deepspeed(2, ["tests/dist/peer_checks.py", group], module=False, timeout=240)
    text = proc.stdout + proc.stderr
    waited = re.findall(r"rank 0: gave up after ([\d.]+) s: .*Timed out", proc.stdout)
    assert len(waited) == 1 and 2.5 < float(waited[0]) < 20, text[-3000:]
    assert "exits with return code = 4" in text and "done after" not in text, text[-3000:]


@pytest.mark.parametrize("teller", [0, 1])
def test_a_rank_that_failed_alone_stops_the_others_through_the_store(teller):
    """A rank blocked where it cannot notice a peer's exit (an NCCL collective; here a busy
    rank) is stopped within seconds by its watcher once another rank said it failed; also
    when that rank is rank 0, which hosts the store."""
    start = time.time()
    proc = run_deepspeed(2, ["tests/dist/peer_checks.py", f"told{teller}"], module=False,
                         timeout=240)
    text = proc.stdout + proc.stderr
    assert "exits with return code = 4" in text and "not stopped" not in text, text[-3000:]
    assert time.time() - start < 120  # the busy rank would take 150 s (plus the start)
    if teller == 1:  # rank 0 repeats the message
        assert text.count("ds-rlhf: stopping every rank: rank 1 (host h1) failed: the grader "
                          "crashed") == 1, text[-3000:]


def test_too_many_failed_episodes_stop_every_rank_with_exit_3(assets, tmp_path):
    """tests/e2e/test_ppo_cli.py's 3 failed episodes of 16 on 2 ranks (8 rows each): the
    ranks count them together, every rank stops at step 1, the message printed once."""
    from tests.e2e.test_ppo_cli import FAILED_3_OF_16, flaky_config

    cfg = write_yaml(flaky_config(assets, tmp_path, failing=3), tmp_path / "c.yaml")
    proc = run_deepspeed(2, ["ds_rlhf", "ppo", "--config", str(cfg)], timeout=300)
    text = proc.stdout + proc.stderr
    assert "exits with return code = 3" in text and "Traceback" not in text, text[-3000:]
    assert text.count(FAILED_3_OF_16.format(env=tmp_path / "flaky.py:Flaky")) == 1, text[-3000:]


def test_an_error_of_one_rank_alone_is_printed_by_it(assets, tmp_path):
    """Rank 1 alone fails in its first step, outside any agreement of the ranks: it prints
    its error naming its rank and host and exits at once (before, only rank 0 printed, so
    the message was lost)."""
    cfg = write_yaml(ppo_config(assets, tmp_path / "out"), tmp_path / "c.yaml")
    proc = run_deepspeed(2, ["tests/dist/fault_inject.py", "ppo", "--config", str(cfg)],
                         module=False, timeout=300, RAISE_ON_RANK="1")
    text = proc.stdout + proc.stderr
    message = (f"ds-rlhf ppo: error: rank 1 (host {socket.gethostname()}): prompt 3: cannot "
               "be read on this rank")
    assert text.count(message) == 1, text[-3000:]
    assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]
    # rank 0 sees rank 1's connections close (exit 4), unless the launcher stops it first
    assert re.search(r"exits with return code = [24]\b", text), text[-3000:]


def test_a_generation_rank_that_raises_ends_the_run(assets, tmp_path):
    """rollout.placement separate, 1 training + 1 generation rank: the generation rank raises
    when it samples step 2's rollout. It prints its error (rank and host) and the training
    rank stops within seconds (exit 4), rank 0 repeating the message once; the launcher's
    exit is non-zero, and the checkpoint of step 1 is there to resume from."""
    cfg = ppo_config(assets, tmp_path / "run", rollout={"placement": "separate",
                                                        "generation_ranks": 1},
                     ppo={"steps": 4, "rollout_batch_size": 4},
                     checkpoint={"save_every": 1})
    start = time.time()
    proc = run_deepspeed(2, ["tests/dist/faulty_pool.py", "ppo", "--config",
                             str(write_yaml(cfg, tmp_path / "c.yaml"))], module=False,
                         timeout=300, FAIL_AT_STEP="2")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - start < 200, text[-3000:]
    error = "RuntimeError: the generation rank's accelerator fell off the bus"
    assert re.search(rf"ds-rlhf ppo: error: generation rank 1 \(host [^)]+\): {error}", text)
    assert text.count("ds-rlhf: stopping every rank: generation rank 1") == 1, text[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_1").is_dir()


def test_a_stalled_generation_rank_ends_the_run_within_the_timeout(assets, tmp_path):
    """The generation rank hangs when it samples step 2's rollout: the training rank, waiting
    for those rows, gives up after distributed.timeout_minutes (6 s here), names the phase
    and exits 4; the checkpoint of step 1 is there to resume from."""
    cfg = ppo_config(assets, tmp_path / "run", rollout={"placement": "separate",
                                                        "generation_ranks": 1},
                     ppo={"steps": 4, "rollout_batch_size": 4},
                     checkpoint={"save_every": 1}, distributed={"timeout_minutes": 0.1})
    proc = run_deepspeed(2, ["tests/dist/faulty_pool.py", "ppo", "--config",
                             str(write_yaml(cfg, tmp_path / "c.yaml"))], module=False,
                         timeout=300, FAIL_AT_STEP="2", FAULT="stall")
    text = proc.stdout + proc.stderr
    gave_up = re.findall(r"rank 0 gave up waiting for the other ranks in phase '([^']+)'", text)
    assert gave_up == ["step 2 generate"], text[-3000:]
    assert "exits with return code = 4" in text and "accelerator fell off" not in text
    assert (tmp_path / "run" / "checkpoints" / "step_1").is_dir()


def test_a_generation_rank_that_dies_ends_the_run(assets, tmp_path):
    """The generation rank is killed (SIGKILL: no word to anyone) when it samples step 2's
    rollout: the training rank, waiting for those rows, sees its connection close and stops
    at once (exit 4), naming the phase; the checkpoint of step 1 is there to resume from."""
    cfg = ppo_config(assets, tmp_path / "run", rollout={"placement": "separate",
                                                        "generation_ranks": 1},
                     ppo={"steps": 4, "rollout_batch_size": 4}, checkpoint={"save_every": 1})
    proc = run_deepspeed(2, ["tests/dist/faulty_pool.py", "ppo", "--config",
                             str(write_yaml(cfg, tmp_path / "c.yaml"))], module=False,
                         timeout=300, FAIL_AT_STEP="2", FAULT="die")
    text = proc.stdout + proc.stderr
    gave_up = re.findall(r"rank 0 gave up waiting for the other ranks in phase '([^']+)': "
                         r"another rank stalled for longer than [^ ]+ or died", text)
    assert gave_up == ["step 2 generate"], text[-3000:]
    assert "exits with return code = " in text and proc.returncode != 0
    assert (tmp_path / "run" / "checkpoints" / "step_1").is_dir()
