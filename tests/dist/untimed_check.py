"""Coordinator.on_main_untimed outlasts the collective timeout: with a 3 s
distributed timeout, rank 0 works for 8 s while rank 1 waits for it, and both go on.

Run by tests/dist/test_run_safety.py under `deepspeed --num_gpus 2`; prints one line per rank.
"""

import time

from ds_rlhf.coordinator import exit_process, setup_distributed_env, start_distributed

setup_distributed_env()
coord = start_distributed(timeout_minutes=0.05)  # 3 s


def slow() -> str:
    time.sleep(8)
    return "converted"


start = time.time()
result = coord.on_main_untimed(slow)
coord.barrier()  # the ordinary group still works afterwards
print(f"rank {coord.rank}: {result} after {time.time() - start:.1f} s", flush=True)
exit_process(0)
