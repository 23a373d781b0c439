"""launch/slurm.sbatch on a real single-node Slurm cluster started on this machine
(shared/tools/slurm-local.sh, next to the repository): a 2-task PPO job runs to completion;
jobs told to stop with USR1 save, exit 0 and resume (by resubmission, or by requeueing
themselves) into exactly the metrics of the uninterrupted job."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_rlhf.tracking import read_metrics
from tests.conftest import REPO, cpu_env, ppo_config, write_yaml

pytestmark = pytest.mark.e2e
SLURM_LOCAL = REPO.parent / "shared" / "tools" / "slurm-local.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
STEPS = 24
KEYS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg",
        "loss/value_avg", "policy/approxkl_avg", "response_length/mean")
# Variables of launch/slurm.sbatch (sbatch exports the environment): only what a test sets.
SCRIPT_VARS = ("MODE", "LAUNCHER", "NPROC", "MASTER_ADDR", "MASTER_PORT", "REQUEUE", "REPO",
               "VENV", "SRUN_ARGS", "RANK", "LOCAL_RANK", "WORLD_SIZE")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm():
    """Start the local cluster (idempotent); skip when that is not possible here."""
    if not SLURM_LOCAL.is_file():
        pytest.skip(f"{SLURM_LOCAL} not found")
    try:
        proc = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm-local.sh start timed out")
    if proc.returncode != 0 or not shutil.which("sbatch"):
        pytest.skip(f"could not start a local Slurm cluster (needs root and apt): "
                    f"{(proc.stdout + proc.stderr)[-1500:]}")
    jobs: list[str] = []
    yield jobs
    for jid in jobs:  # nothing of ours stays queued, whatever happened
        subprocess.run(["scancel", jid], capture_output=True)


def submit(jobs: list, cfg: Path, out: Path, resources: list[str], **env) -> str:
    cmd = ["sbatch", "--parsable", "--export=ALL", f"--output={out}", f"--chdir={REPO}",
           *resources, str(SBATCH), "ppo", str(cfg)]
    base = {k: v for k, v in cpu_env().items() if k not in SCRIPT_VARS}
    proc = subprocess.run(cmd, cwd=REPO, env={**base, "GPU": "0", "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jid = proc.stdout.strip().split(";")[0]
    jobs.append(jid)
    return jid


def job(jid: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True,
                         text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(jid: str, until, out: Path, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while not until(info := job(jid)):
        assert time.time() < deadline, f"job {jid}: {info.get('JobState')}\n{log(out)}"
        time.sleep(0.25)
    return info


def ended(restarts: int = 0):
    return lambda info: (info.get("JobState") in ENDED
                         and int(info.get("Restarts", 0)) == restarts)


def log(out: Path) -> str:
    return out.read_text()[-4000:] if out.exists() else "(no output file)"


def wait_metrics(jid: str, metrics: Path, lines: int, out: Path) -> None:
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        state = job(jid).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.time() < deadline, \
            f"job {jid}: {state}\n{log(out)}"
        time.sleep(0.05)


def assert_ok(info: dict, out: Path) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log(out)


@pytest.fixture(scope="module")
def full(slurm, assets, tmp_path_factory):
    """The uninterrupted reference: MODE=per-gpu, two srun tasks (ranks), CPU."""
    tmp = tmp_path_factory.mktemp("slurm_full")
    cfg = write_yaml(ppo_config(assets, tmp / "run", ppo={"steps": STEPS}), tmp / "run.yaml")
    out = tmp / "job.out"
    jid = submit(slurm, cfg, out, ["--ntasks=2"], MODE="per-gpu")
    assert_ok(wait_for(jid, ended(), out), out)
    return {"run": tmp / "run", "out": out, "tmp": tmp}


def test_per_gpu_job_runs_to_completion(full):
    text = full["out"].read_text()
    assert "MODE=per-gpu" in text and f"step {STEPS}/{STEPS}" in text
    assert [m["step"] for m in read_metrics(full["run"] / "metrics.jsonl")] == \
        list(range(1, STEPS + 1))
    state = (full["run"] / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state  # SLURM_NTASKS became WORLD_SIZE
    assert (full["run"] / "actor" / "config.json").is_file()


def assert_same_metrics(reference: Path, resumed: Path) -> None:
    ref, got = read_metrics(reference), read_metrics(resumed)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # no step logged twice
    for a, b in zip(ref, got, strict=True):
        for key in KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_usr1_to_batch_shell_saves_then_resubmission_resumes(slurm, assets, full):
    """The path of `#SBATCH --signal=B:USR1@120`: USR1 reaches the batch shell only, which
    forwards it to the workers through srun."""
    tmp = full["tmp"]
    cfg = write_yaml(ppo_config(assets, tmp / "cut", ppo={"steps": STEPS}), tmp / "cut.yaml")
    out = tmp / "cut.out"
    jid = submit(slurm, cfg, out, ["--ntasks=2"], MODE="per-gpu")
    metrics = tmp / "cut" / "metrics.jsonl"
    wait_metrics(jid, metrics, 2, out)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=30)
    assert_ok(wait_for(jid, ended(), out), out)
    text = out.read_text()
    assert "slurm.sbatch: got SIGUSR1" in text and "preempted: saved step" in text, log(out)
    stopped_at = len(read_metrics(metrics))
    assert 2 <= stopped_at < STEPS, "the job finished before the signal; make steps slower"
    assert (tmp / "cut" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at}"

    again = submit(slurm, cfg, out, ["--ntasks=2"], MODE="per-gpu")  # the same command
    assert_ok(wait_for(again, ended(), out), out)
    assert f"resumed from {tmp / 'cut' / 'checkpoints' / f'step_{stopped_at}'}" in \
        out.read_text()
    assert_same_metrics(full["run"] / "metrics.jsonl", metrics)


def test_per_node_job_stopped_by_scancel_usr1_requeues_itself_and_resumes(slurm, assets, full):
    """MODE=per-node: one task runs `deepspeed --no_ssh --node_rank=0` with 2 local ranks.
    `scancel --signal=USR1 JOBID` signals every process of the step, the launchers included
    (which must survive it); with REQUEUE=1 the job requeues itself and resumes."""
    tmp = full["tmp"]
    cfg = write_yaml(ppo_config(assets, tmp / "pn", ppo={"steps": STEPS}), tmp / "pn.yaml")
    out = tmp / "pn.out"
    jid = submit(slurm, cfg, out, ["--nodes=1", "--ntasks=1", "--cpus-per-task=2"],
                 MODE="per-node", REQUEUE="1")
    metrics = tmp / "pn" / "metrics.jsonl"
    wait_metrics(jid, metrics, 2, out)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True, timeout=30)
    wait_for(jid, lambda i: int(i.get("Restarts", 0)) == 1 and i["JobState"] == "PENDING", out)
    stopped_at = len(read_metrics(metrics))
    assert 2 <= stopped_at < STEPS
    # Slurm holds a requeued job back for a while (Reason=BeginTime); let it start now, but
    # not within the second of the requeue: slurmd refuses job credentials that are not newer
    # than the revocation of the first run's ("Job credential revoked").
    deadline = time.time() + 60
    while subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                         timeout=30).stdout.strip() != "idle":
        assert time.time() < deadline, "the node did not become idle after the requeue"
        time.sleep(0.25)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True,
                   timeout=30)
    assert_ok(wait_for(jid, ended(restarts=1), out), out)
    text = out.read_text()
    assert "MODE=per-node" in text and "--node_rank=0" in text
    assert f"requeueing job {jid}" in text and "(restart 1)" in text
    assert f"resumed from {tmp / 'pn' / 'checkpoints' / f'step_{stopped_at}'}" in text
    assert_same_metrics(full["run"] / "metrics.jsonl", metrics)
