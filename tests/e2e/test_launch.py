"""launch/single_node.sh and launch/multi_node.sh: a two-node run simulated on this machine
(two deepspeed launchers with --no_ssh --node_rank 0/1, one CPU rank each, meeting at
127.0.0.1, each in its own working directory, one shared output_dir), killed after a
checkpoint and resumed, trains exactly like one node with two ranks. A node that lacks a
variable or sees another output_dir stops both nodes at the start, saying which."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ds_rlhf.tracking import read_metrics
from tests.conftest import REPO, cpu_env, free_port, ppo_config, write_yaml

pytestmark = pytest.mark.e2e
STEPS = 4
KEYS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg",
        "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "val/ratio",
        "response_length/mean")


# Variables of the launch scripts: only what a test sets may reach them.
SCRIPT_VARS = ("NPROC", "NNODES", "NODE_RANK", "HOSTFILE", "MASTER_ADDR", "MASTER_PORT",
               "LAUNCHER", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def _env(**extra) -> dict:
    env = {k: v for k, v in cpu_env().items() if k not in SCRIPT_VARS}
    return {**env, "GPU": "0", "PYTHON": sys.executable, **extra}


def _tail(text: str) -> str:
    return text[-3000:]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    single = write_yaml(ppo_config(assets, tmp / "single", ppo={"steps": STEPS}),
                        tmp / "single.yaml")
    proc = subprocess.run(
        ["bash", str(REPO / "launch/single_node.sh"), "ppo", str(single)], cwd=tmp,
        env=_env(NPROC="2", MASTER_PORT=str(free_port())), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, _tail(proc.stdout) + _tail(proc.stderr)

    # The "nodes" run in their own working directories and share only the output_dir.
    multi = write_yaml(ppo_config(assets, tmp / "multi", ppo={"steps": STEPS},
                                  checkpoint={"save_every": 1}), tmp / "multi.yaml")
    nodes = _start_nodes(tmp, multi)
    latest = tmp / "multi" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text() == "step_2"):
        assert all(node.poll() is None for node in nodes), _outputs(nodes)
        assert time.time() < deadline, "no checkpoint of step 2"
        time.sleep(0.05)
    for p in [nodes[1], *psutil.Process(nodes[1].pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)  # node 1 is lost: its launcher and its rank
    killed = _outputs(nodes, timeout=120)
    assert nodes[0].returncode != 0 and "exits with return code = 4" in killed[0], killed[0]
    outs = _outputs(_start_nodes(tmp, multi), check=True)  # the same commands: resume
    return {"single": tmp / "single", "multi": tmp / "multi", "outs": outs}


def _start_nodes(tmp: Path, config: Path, envs: tuple[dict, dict] = ({}, {})
                 ) -> list[subprocess.Popen]:
    """launch/multi_node.sh on two "nodes", each in its own working directory. Node 0 gets a
    hostfile naming two aliases of this machine, node 1 lets the script write its own
    ("node0 slots=1", "node1 slots=1"). With --no_ssh the names are never contacted, only
    the slot counts matter, so both agree on ranks 0 and 1."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    common = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    nodes = []
    for rank in (0, 1):
        cwd = tmp / f"node{rank}"
        cwd.mkdir(exist_ok=True)
        env = _env(NODE_RANK=str(rank), **common, **envs[rank],
                   **({"HOSTFILE": str(hostfile)} if rank == 0 else {}))
        nodes.append(subprocess.Popen(
            ["bash", str(REPO / "launch/multi_node.sh"), "ppo", str(config)], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return nodes


def _outputs(nodes: list[subprocess.Popen], timeout: float = 300,
             check: bool = False) -> list[str]:
    outs = []
    for node in nodes:
        try:
            outs.append(node.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for n in nodes:
                for p in psutil.Process(n.pid).children(recursive=True):
                    p.kill()
                n.kill()
            raise
    for rank, (node, out) in enumerate(zip(nodes, outs, strict=True)):
        assert not check or node.returncode == 0, f"node {rank}:\n{_tail(out)}"
    return outs


def test_each_launcher_ran_one_rank_of_a_two_node_world(runs):
    for rank, out in enumerate(runs["outs"]):
        assert f"--node_rank={rank}" in out  # what the runner handed deepspeed's launch.py
        assert "dist_world_size=2" in out
        assert "nnodes=2, num_local_procs=1" in out
    assert f"step {STEPS}/{STEPS}" in runs["outs"][0]  # rank 0 (on node 0) logs


def test_two_nodes_killed_and_resumed_train_like_one_node_with_two_ranks(runs):
    single = read_metrics(runs["single"] / "metrics.jsonl")
    multi = read_metrics(runs["multi"] / "metrics.jsonl")
    assert [m["step"] for m in single] == [m["step"] for m in multi] == list(range(1, STEPS + 1))
    for a, b in zip(single, multi, strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=0, abs=1e-6), (a["step"], key)
    assert (runs["multi"] / "actor" / "config.json").is_file()
    assert (runs["multi"] / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    assert f"resumed from {runs['multi'] / 'checkpoints' / 'step_2'} at step 2" in \
        runs["outs"][0]


def test_a_node_without_a_variable_stops_both_nodes_at_once(assets, tmp_path):
    """Node 1 lacks the reward server's token: both nodes stop within seconds, exit code 2,
    node 0 (rank 0) naming rank 1 and the variable. Before, node 1 exited silently and node 0
    waited for it for distributed.timeout_minutes."""
    cfg = ppo_config(assets, tmp_path / "out", ppo={"advantage_estimator": "grpo", "kl_coef": 0.0},
                     generation={"n_samples_per_prompt": 2},
                     rewards=[{"url": "http://127.0.0.1:9/score", "token_env": "RM_TOKEN"}])
    del cfg["critic"], cfg["reward"]
    config = write_yaml(cfg, tmp_path / "c.yaml")
    start = time.time()
    nodes = _start_nodes(tmp_path, config, ({"RM_TOKEN": "s3cret"}, {"RM_TOKEN": ""}))
    outs = _outputs(nodes, timeout=240)
    assert [node.returncode for node in nodes] != [0, 0]
    assert all("exits with return code = 2" in out for out in outs), outs
    assert outs[0].count(f"error: rank 1 (host {socket.gethostname()}): environment variable "
                         "RM_TOKEN (rewards[0].token_env) not set or empty") == 1, outs[0]
    assert time.time() - start < 200  # seconds of work (more on a loaded machine), not the
    # 30 minutes of distributed.timeout_minutes


def test_an_output_dir_that_the_nodes_do_not_share_is_refused(assets, tmp_path):
    """A relative output_dir names another directory on each node (their working
    directories differ), as an output_dir on a node-local disk would: refused before any
    engine is built, in one line."""
    config = write_yaml(ppo_config(assets, Path("out")), tmp_path / "c.yaml")
    outs = _outputs(_start_nodes(tmp_path, config), timeout=240)
    assert all("exits with return code = 2" in out for out in outs), outs
    assert outs[0].count("error: output_dir 'out' is not the same directory on every node: "
                         f"rank 0 (host {socket.gethostname()}) wrote .shared-check-") == 1
    assert "rank 1 (host" in outs[0] and "must be on a file system shared by all nodes" in outs[0]
    assert "deepspeed.initialize" not in outs[0]
    assert not any((tmp_path / f"node{rank}" / "out" / "checkpoints").exists()
                   for rank in (0, 1))


def test_single_node_script_prints_usage_without_arguments():
    proc = subprocess.run(["bash", str(REPO / "launch/single_node.sh")], env=_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "COMMAND CONFIG" in proc.stderr


def test_multi_node_script_explains_missing_variables(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/multi_node.sh"), "ppo", "x.yaml"],
                          env=_env(NODE_RANK="0"), capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr
