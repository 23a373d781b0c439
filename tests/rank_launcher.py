"""What `deepspeed --num_gpus N` does on one node (deepspeed.launcher.launch), for the tests:
start N ranks with the environment the launcher gives them (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT, LOCAL_SIZE, CROSS_RANK/SIZE, CUDA_VISIBLE_DEVICES) and `--local_rank=i`;
once a rank exits non-zero, stop the others and their children (SIGTERM, SIGKILL 30 s
later) and exit with its code, saying so as the launcher does ("... exits with return code
= N").

The standard library only: no torch import before the ranks start (1 s) and no 1 s polling
loop after they end, about 2.5 s less per launch over the ~100 launches of the suite. The
`deepspeed` command itself, with its launcher, is what the launch, demo and Slurm tests run.

    python tests/rank_launcher.py --nproc 2 --master_port P [--module] SCRIPT ARGS...
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to every rank still running and its children, SIGKILL to those alive 30 s
    later (the launcher's terminate_process_tree)."""
    import psutil

    procs = []
    for p in processes:
        if p.poll() is None:
            print(f"rank_launcher: killing subprocess {p.pid}", flush=True)
            try:
                rank = psutil.Process(p.pid)
                procs += [*rank.children(recursive=True), rank]
            except psutil.NoSuchProcess:
                pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    for proc in alive:
        proc.kill()
    for p in processes:
        p.wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("--module", action="store_true")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.master_port),
               WORLD_SIZE=str(args.nproc), LOCAL_SIZE=str(args.nproc), CROSS_RANK="0",
               CROSS_SIZE="1", CUDA_VISIBLE_DEVICES=",".join(map(str, range(args.nproc))))
    processes, cmd = [], []
    for rank in range(args.nproc):
        cmd = [sys.executable, "-u", *(["-m"] if args.module else []), args.script,
               f"--local_rank={rank}", *args.args]
        processes.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank),
                                                    "LOCAL_RANK": str(rank)}))

    def on_signal(signum, frame):
        _stop(processes)
        sys.exit(1)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while any(p.poll() is None for p in processes):
        failed = [p for p in processes if p.returncode not in (None, 0)]
        if failed:
            code = failed[0].returncode
            _stop(processes)
            print(f"rank_launcher: {failed[0].args} exits with return code = {code}",
                  flush=True)
            return code
        time.sleep(0.05)
    failed = [p for p in processes if p.returncode != 0]
    if failed:
        print(f"rank_launcher: {failed[0].args} exits with return code = "
              f"{failed[0].returncode}", flush=True)
        return failed[0].returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
