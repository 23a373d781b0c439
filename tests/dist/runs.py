"""Run by tests/dist/test_grpo_dist.py under `deepspeed --num_gpus N` on CPU ranks.

    python tests/dist/runs.py A.yaml B.yaml ...

Several whole PPO runs (`ds_rlhf.trainers.ppo.run`, as `ds-rlhf ppo` does) one after the
other in one launch: the engines of each run are built fresh, the process group is shared,
so a test pays the launcher and import cost once.
"""

import sys

from ds_rlhf.config import load_config
from ds_rlhf.coordinator import exit_process, stop_distributed
from ds_rlhf.trainers.ppo import run


def main() -> None:
    for path in (a for a in sys.argv[1:] if not a.startswith("--local_rank")):
        run(load_config(path))
    stop_distributed()
    exit_process(0)  # see its docstring


if __name__ == "__main__":
    main()
