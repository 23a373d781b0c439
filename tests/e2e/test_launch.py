"""launch/single_node.sh and launch/multi_node.sh: a two-node run simulated on this machine
(two deepspeed launchers with --no_ssh --node_rank 0/1, one CPU rank each, meeting at
127.0.0.1) trains exactly like one node with two ranks."""

from __future__ import annotations

import subprocess
import sys

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

    # Two "nodes": node 0 gets a hostfile naming two aliases of this machine, node 1 lets the
    # script write its own ("node0 slots=1", "node1 slots=1"). With --no_ssh the names are
    # never contacted, only the slot counts matter, so both agree on ranks 0 and 1.
    multi = write_yaml(ppo_config(assets, tmp / "multi", ppo={"steps": STEPS}),
                       tmp / "multi.yaml")
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    common = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen(
        ["bash", str(REPO / "launch/multi_node.sh"), "ppo", str(multi)], cwd=tmp,
        env=_env(NODE_RANK=str(rank), **common, **({"HOSTFILE": str(hostfile)} if rank == 0
                                                    else {})),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{_tail(out)}"
    return {"single": tmp / "single", "multi": tmp / "multi", "outs": outs}


def test_each_launcher_ran_one_rank_of_a_two_node_world(runs):
    for rank, out in enumerate(runs["outs"]):
        assert f"--node_rank={rank}" in out  # what the runner handed deepspeed's launch.py
        assert "dist_world_size=2" in out
        assert "nnodes=2, num_local_procs=1" in out
    assert f"step {STEPS}/{STEPS}" in runs["outs"][0]  # rank 0 (on node 0) logs


def test_two_nodes_train_like_one_node_with_two_ranks(runs):
    single = read_metrics(runs["single"] / "metrics.jsonl")
    multi = read_metrics(runs["multi"] / "metrics.jsonl")
    assert [m["step"] for m in single] == [m["step"] for m in multi] == list(range(1, STEPS + 1))
    for a, b in zip(single, multi, strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=0, abs=1e-6), (a["step"], key)
    assert (runs["multi"] / "actor" / "config.json").is_file()
    assert (runs["multi"] / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"


def test_single_node_script_prints_usage_without_arguments():
    proc = subprocess.run(["bash", str(REPO / "launch/single_node.sh")], env=_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "COMMAND CONFIG" in proc.stderr


def test_multi_node_script_explains_missing_variables(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/multi_node.sh"), "ppo", "x.yaml"],
                          env=_env(NODE_RANK="0"), capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr
